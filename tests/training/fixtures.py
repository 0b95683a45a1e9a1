"""Small task datasets drawn with PIL for the training tests: VQA JSONL, classification JSONL, captions.

Every image is a 32x32 PNG of one coloured square on white; questions, labels and
captions are about its colour, so a model can learn them in a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def _square(path: Path, colour: str, shift: tuple[int, int] = (0, 0)) -> None:
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    dx, dy = shift
    image.paste(COLOURS[colour], (6 + dx, 6 + dy, 26 + dx, 26 + dy))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_vqa_jsonl(root: Path, sizes: dict[str, int]) -> Path:
    """``root/{split}.jsonl`` with ``image``, ``question``, ``answers`` lines; images under ``root/images``
    (the loader's default image root, so ``image`` names the file alone)."""
    names = list(COLOURS)
    k = 0
    for split, count in sizes.items():
        records = []
        for _ in range(count):
            colour = names[k % len(names)]
            _square(root / "images" / f"{k:04d}.png", colour)
            records.append({"question_id": k, "image": f"{k:04d}.png", "question": "what colour is the square?",
                            "answers": [colour]})
            k += 1
        _write_jsonl(root / f"{split}.jsonl", records)
    return root


def write_classification_jsonl(root: Path, sizes: dict[str, int], labels: tuple[str, ...] = ("no", "yes"),
                               text_key: str = "text") -> Path:
    """``root/{split}.jsonl`` (``id``, ``img``, ``text``, ``label``): does the text name the square's colour?"""
    names = list(COLOURS)
    k = 0
    for split, count in sizes.items():
        records = []
        for _ in range(count):
            colour, named = names[k % len(names)], names[(k // 2) % len(names)]
            _square(root / "img" / f"{k:04d}.png", colour)
            truth = labels[1] if colour == named else labels[0]
            records.append({"id": str(k), "img": f"img/{k:04d}.png", text_key: f"the square is {named}",
                            "label": truth})
            k += 1
        _write_jsonl(root / f"{split}.jsonl", records)
    return root


def write_karpathy_captions(root: Path, sizes: dict[str, int]) -> Path:
    """A Karpathy-schema ``dataset_coco.json`` over squares, two captions an image.

    Every image and caption is distinct (the square shifted, the caption numbered, by image):
    retrieval ranks of exact duplicates would hang on float noise in the last bits, which
    differs between one process and several on some CPUs.
    """
    names = list(COLOURS)
    images, k = [], 0
    for split, count in sizes.items():
        for _ in range(count):
            colour = names[k % len(names)]
            filename = f"sq_{k:04d}.png"
            _square(root / "images" / filename, colour, (k % 5 - 2, k // 5 % 5 - 2))
            raws = [f"a {colour} square on white number {k}", f"the square is {colour} in picture {k}"]
            sentences = [{"raw": raw, "tokens": raw.split(), "imgid": k, "sentid": 2 * k + i}
                         for i, raw in enumerate(raws)]
            images.append({"filepath": "images", "filename": filename, "imgid": k, "split": split,
                           "cocoid": 1000 + k, "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
            k += 1
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def train_log(run: Path) -> dict[int, dict[str, float]]:
    """``train_log.jsonl`` by step (a step logged twice, after a resume, keeps its last record); events skipped."""
    records = map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "event" not in r}


def features_as_cached(forward):
    """A model's ``forward`` that rounds its frozen encoders' outputs to float16, padding zero, as the feature
    cache stores them: an uncached run then sees the features a cached run reads (``PretrainModel`` and
    ``FusionModel`` take the same keywords). Pretraining's masked captions stay live, as with the cache."""

    def rounded(self, *, pixel_values=None, image_states=None, input_ids, attention_mask, text_states=None, **kw):
        if pixel_values is not None:
            image_states, pixel_values = self.vision(pixel_values).tokens.half().float(), None
        if text_states is None:
            text_states = (self.text(input_ids, attention_mask).states * attention_mask[..., None]).half().float()
        return forward(self, image_states=image_states, input_ids=input_ids, attention_mask=attention_mask,
                       text_states=text_states, **kw)

    return rounded


def install_features_as_cached() -> None:
    """Patch ``PretrainModel`` and ``FusionModel`` with :func:`features_as_cached` for the rest of the process."""
    from fusionzoo.model import FusionModel
    from fusionzoo.training.pretrain_model import PretrainModel

    for model in (PretrainModel, FusionModel):
        model.forward = features_as_cached(model.forward)
