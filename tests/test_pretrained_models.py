"""All 18 task x fusion models on the offline pretrained encoders (efficientnet-lite0 + minilm-l6).

Builds every pair offline, runs predict / generate on a real photo (the shared COCO
slice when present, else an easy-VQA image) and checks the save/load round trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import fusionzoo
from conftest import SHARED_DATA

TASKS = ["vqa", "classification", "captioning"]
BUILTIN = ["early_concat", "late_voting", "attention_weighted", "co_attention", "merged_transformer", "albef"]
SMALL = {"dim": 64, "num_layers": 1, "num_heads": 4}


def _photo() -> Image.Image:
    coco = SHARED_DATA / "coco-vqa-mini" / "images" / "val2014" / "COCO_val2014_000000000133.jpg"
    if coco.is_file():
        return Image.open(coco).convert("RGB")
    from fusionzoo.data.vqa import load_easy_vqa

    return Image.open(load_easy_vqa(splits=["test"])["test"][0]["image_path"]).convert("RGB")


def _build(task: str, fusion: str) -> fusionzoo.FusionModel:
    vocab = {"vqa": {"answers": ["yes", "no", "2", "red"]},
             "classification": {"labels": ["match", "mismatch"]}}.get(task, {})
    return fusionzoo.create_model(task, fusion, vision="efficientnet-lite0", text="minilm-l6",
                                  freeze_encoders=True, fusion_kwargs=dict(SMALL), **vocab)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_every_fusion_builds_offline_and_answers(task: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    photo = _photo()
    for i, fusion in enumerate(BUILTIN):
        model = _build(task, fusion)
        assert model.vision.spec and model.text.out_dim == 384
        if task == "captioning":
            out = model.generate([photo], max_new_tokens=4, num_beams=2)
        else:
            out = model.predict([photo], ["is there a dog in the picture?"])
            assert out[0] in model.vocabulary
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
        if i == TASKS.index(task):  # one save/load per task here; tests/test_model.py covers every pair
            model.save_pretrained(tmp_path / fusion)
            again = fusionzoo.load_model(tmp_path / fusion)
            if task == "captioning":
                assert again.generate([photo], max_new_tokens=4, num_beams=2) == out
            else:
                assert again.predict([photo], ["is there a dog in the picture?"]) == out
        del model
