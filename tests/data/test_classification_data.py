"""Classification JSONL (Hateful Memes schema) and the caption-match builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusionzoo.registry import DATASETS
from fusionzoo.data.captions import load_karpathy_captions
from fusionzoo.data.classification import (
    ClassificationData,
    build_caption_match,
    load_caption_match,
    load_classification_jsonl,
)


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
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_memes(root: Path) -> None:
    """Hateful Memes layout: <root>/img/<id>.png, train.jsonl, dev_seen.jsonl, test_seen.jsonl (no labels)."""
    for i in range(8):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (30 * i, 0, 0)).save(root / "img" / f"{i:05d}.png")
    rows = [{"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": f"meme text {i}"} for i in range(8)]
    write_jsonl(root / "train.jsonl", rows[:5])
    write_jsonl(root / "dev_seen.jsonl", rows[5:])
    write_jsonl(root / "test_seen.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in rows[5:]])


def write_karpathy(root: Path, per_split: int = 4) -> None:
    images = []
    for k in range(2 * per_split):
        image_id = 300 + k
        filename = f"{image_id}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (0, 20 * k, 0)).save(root / "images" / filename)
        sentences = [{"raw": f"photo {image_id} caption {s}", "sentid": 10 * image_id + s, "tokens": []}
                     for s in range(2 + k % 2)]
        images.append({"filepath": "images", "filename": filename, "imgid": k, "cocoid": image_id,
                       "split": "train" if k < per_split else "test", "sentences": sentences,
                       "sentids": [s["sentid"] for s in sentences]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


# -- JSONL ---------------------------------------------------------------------------------
def test_hateful_memes_schema_int_labels(tmp_path: Path) -> None:
    write_memes(tmp_path)
    data = load_classification_jsonl(tmp_path)
    assert isinstance(data, ClassificationData)
    assert sorted(data.split_names) == ["dev_seen", "test_seen", "train"]
    assert data.label_names == ["0", "1"] and data.num_labels == 2
    assert data.metric == "roc_auc"
    assert data["train"][3] == {"id": "3", "image_path": str(tmp_path / "img" / "00003.png"),
                                "text": "meme text 3", "label": 1}
    assert data["test_seen"]["label"] == [-1, -1, -1]  # unlabeled split
    assert DATASETS.get("classification-jsonl") is load_classification_jsonl


def test_string_labels_multiclass_and_given_names(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / "im").mkdir(exist_ok=True)
        Image.new("RGB", (6, 6)).save(tmp_path / "im" / f"{i}.png")
    labels = ["dog", "cat", "bird", "cat"]
    rows = [{"id": f"x{i}", "img": f"im/{i}.png", "text": "t", "label": lab} for i, lab in enumerate(labels)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", rows[:2])
    data = load_classification_jsonl(tmp_path)
    assert data.label_names == ["bird", "cat", "dog"]
    assert data.metric == "accuracy"
    assert data["train"]["label"] == [2, 1, 0, 1]
    named = load_classification_jsonl(tmp_path, label_names=["cat", "dog", "bird", "fish"], splits="val")
    assert named.split_names == ["val"] and named["val"]["label"] == [1, 0]


def test_classification_collate(tmp_path: Path) -> None:
    write_memes(tmp_path)
    data = load_classification_jsonl(tmp_path, splits=["train"]).with_image_transform(to_tensor)
    batch = data.collator(fake_tokenize, max_length=8)([data["train"][i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 5)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 0]
    assert batch["id"] == ["0", "1", "2"]


# -- caption match ---------------------------------------------------------------------------
def test_caption_match_balanced_seeded(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    captions = load_karpathy_captions(tmp_path)
    match = build_caption_match(captions, seed=3)
    assert match.label_names == ["mismatch", "match"] and match.metric == "accuracy"
    refs = captions.references("train")
    train = match["train"]
    n_captions = sum(len(v) for v in refs.values())
    assert len(train) == 2 * n_captions
    assert train["label"].count(1) == train["label"].count(0) == n_captions
    by_path = {p: i for i, p in zip(captions["train"]["image_id"], captions["train"]["image_path"])}
    for row in train:
        own = refs[by_path[row["image_path"]]]
        assert (row["text"] in own) == (row["label"] == 1)  # negatives come from another image
    again = build_caption_match(captions, seed=3)
    assert again["train"]["text"] == train["text"]  # deterministic
    other = build_caption_match(captions, seed=4)
    assert other["train"]["text"] != train["text"]
    capped = build_caption_match(captions, max_captions_per_image=1)
    assert len(capped["train"]) == 2 * len(captions["train"])


def test_caption_match_registered_loader(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    data = DATASETS.get("caption-match")(tmp_path, source="karpathy-captions", splits=["test"])
    assert data.split_names == ["test"]
    assert data.with_image_transform(to_tensor)["test"][0]["pixel_values"].shape == (3, 8, 8)
    assert load_caption_match(tmp_path, splits="test")["test"]["id"] == data["test"]["id"]


def test_caption_match_on_coco_mini(coco_mini: Path) -> None:
    data = load_caption_match(coco_mini, source="karpathy-captions", splits=["val"])
    assert len(data["val"]) == 2 * sum(len(v) for v in load_karpathy_captions(coco_mini, splits="val")
                                       .references("val").values())


# -- metrics -------------------------------------------------------------------------------------
