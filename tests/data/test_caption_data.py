"""Caption loaders: official COCO and Karpathy schemas on tiny fixtures, pairs, collate, coco-vqa-mini."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.registry import DATASETS
from fusionzoo.data.captions import CaptionData, load_coco_captions, load_karpathy_captions
from fusionzoo.data.checks import UnknownSplitError
from fusionzoo.data.common import IGNORE_INDEX, model_inputs


def fake_tokenize(texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """Whitespace tokenizer with [CLS]=1 ... [SEP]=2, padded with 0 to the longest text."""
    rows = [[1] + [3 + len(word) for word in text.split()][: max_length - 2] + [2] for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, 8, 8) float image, the shape a tiny encoder transform would give."""
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, fmt)


def write_coco(root: Path, subtype: str = "val2014", n_images: int = 3) -> Path:
    """COCO layout: <root>/<subtype>/COCO_<subtype>_<id>.jpg and annotations/captions_<subtype>.json."""
    images, annotations = [], []
    for k in range(n_images):
        image_id = 100 + k
        file_name = f"COCO_{subtype}_{image_id:012d}.jpg"
        write_image(root / subtype / file_name, (40 * k, 90, 10))
        images.append({"license": 1, "file_name": file_name, "coco_url": "", "height": 10, "width": 12,
                       "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id})
        for c in range(2 + k % 2):
            annotations.append({"image_id": image_id, "id": 1000 * image_id + c,
                                "caption": f" image {image_id} caption number {c} \n"})
    data = {"info": {"description": "fixture", "year": 2014}, "licenses": [{"id": 1, "name": "x", "url": ""}],
            "images": images, "annotations": annotations}
    path = root / "annotations" / f"captions_{subtype}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_karpathy(root: Path, splits: tuple[str, ...] = ("train", "restval", "val", "test")) -> Path:
    """Karpathy dataset_coco.json over images at <root>/val2014/..."""
    images = []
    for k, split in enumerate(splits):
        image_id = 200 + k
        filename = f"COCO_val2014_{image_id:012d}.jpg"
        write_image(root / "val2014" / filename, (10, 20 * k, 200))
        sentences = [{"tokens": ["a", "b"], "raw": f"Karpathy image {image_id} sentence {s}.", "imgid": k,
                      "sentid": 10 * k + s} for s in range(3)]
        images.append({"filepath": "val2014", "sentids": [s["sentid"] for s in sentences], "filename": filename,
                       "imgid": k, "split": split, "sentences": sentences, "cocoid": image_id})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_captions_official_schema(tmp_path: Path) -> None:
    write_coco(tmp_path, "val2014", n_images=3)
    write_coco(tmp_path, "train2014", n_images=2)
    data = load_coco_captions(tmp_path)
    assert isinstance(data, CaptionData)
    assert data.task == "captioning" and data.metric == "cider"
    assert sorted(data.split_names) == ["train", "val"]
    val = data["val"]
    assert len(val) == 3
    assert val[0]["image_id"] == 100
    assert val[0]["image_path"] == str(tmp_path / "val2014" / "COCO_val2014_000000000100.jpg")
    assert val[0]["captions"] == ["image 100 caption number 0", "image 100 caption number 1"]  # stripped
    assert val[1]["caption_ids"] == [101000, 101001, 101002]
    assert len(data.pairs("val")) == 2 + 3 + 2
    assert data.references("val")[101] == [f"image 101 caption number {c}" for c in range(3)]
    assert data.skipped == {"val": 0, "train": 0}
    with pytest.raises(UnknownSplitError, match="has no split 'test'; it has"):
        data["test"]


def test_coco_captions_explicit_files_and_image_root(tmp_path: Path) -> None:
    ann = write_coco(tmp_path / "coco", "val2014", n_images=2)
    data = load_coco_captions(files={"eval": ann}, image_root=tmp_path / "coco")
    assert data.split_names == ["eval"]
    assert Path(data["eval"][0]["image_path"]).exists()


def test_karpathy_schema_and_restval(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    data = load_karpathy_captions(tmp_path)
    assert data.split_names == ["train", "val", "test"]
    assert len(data["train"]) == 2  # train + restval
    assert data["train"]["image_id"] == [200, 201]
    assert data["val"][0]["captions"][0] == "Karpathy image 202 sentence 0."
    assert data["val"][0]["caption_ids"] == [20, 21, 22]
    kept = load_karpathy_captions(tmp_path, merge_restval=False, splits=["restval", "test"])
    assert kept.split_names == ["restval", "test"] and len(kept["restval"]) == 1


def test_registry_names() -> None:
    assert DATASETS.get("coco-captions") is load_coco_captions
    assert DATASETS.get("karpathy-captions") is load_karpathy_captions


def test_lazy_images_and_collate(tmp_path: Path) -> None:
    write_coco(tmp_path, "val2014", n_images=3)
    data = load_coco_captions(tmp_path).with_image_transform(to_tensor)
    item = data["val"][0]
    assert item["pixel_values"].shape == (3, 8, 8)
    collate = data.collator(fake_tokenize, max_length=6)
    pairs = data.pairs("val")
    batch = collate([pairs[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] <= 6
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])
    assert batch["image_id"].tolist() == [100, 100, 101, 101]
    assert set(model_inputs(batch)) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    image_rows = collate([data["val"][i] for i in range(3)])  # evaluation rows use the first caption
    assert image_rows["input_ids"].shape[0] == 3


def test_coco_mini_official_and_karpathy_agree(coco_mini: Path) -> None:
    official = load_coco_captions(coco_mini)
    karpathy = load_karpathy_captions(coco_mini)
    assert official.split_names == ["mini"]
    assert {s: len(karpathy[s]) for s in karpathy.split_names} == {"train": 844, "val": 95, "test": 74}
    refs_a = official.references("mini")
    refs_b = {k: v for split in karpathy.split_names for k, v in karpathy.references(split).items()}
    assert len(refs_a) == 1013 and sum(len(v) for v in refs_a.values()) == 5069
    assert refs_a.keys() == refs_b.keys()
    assert all(sorted(refs_a[k]) == sorted(refs_b[k]) for k in refs_a)
    paths_a = dict(zip(official["mini"]["image_id"], official["mini"]["image_path"]))
    paths_b = {i: p for s in karpathy.split_names for i, p in zip(karpathy[s]["image_id"], karpathy[s]["image_path"])}
    assert paths_a == paths_b
    first = official.with_image_transform(to_tensor)["mini"][0]  # decode a single real image
    assert first["pixel_values"].shape == (3, 8, 8)
