"""``freeze_encoders=vision`` / ``text``: one encoder fixed (its features cached where it is the image's), the other trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusionzoo.errors import ConfigError
from fusionzoo.training.config import load_config
from fusionzoo.training.trainer import FinetuneRecipe, train

from fixtures import write_vqa_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqa_jsonl(tmp_path_factory.mktemp("freeze") / "vqa", {"train": 16, "test": 4})


def _config(data: Path, out: Path, frozen: str):
    return load_config(None, ["task=vqa", "data=vqa-jsonl", f"data_dir={data}", "vision=tiny", "text=tiny",
                              "fusion=early_concat", "batch_size=8", "max_steps=2", "lr=1e-2", "encoder_lr=1e-2",
                              "log_with=none", f"freeze_encoders={frozen}", f"output_dir={out}"])


@pytest.mark.parametrize("frozen, trained", [("vision", "text"), ("text", "vision")])
def test_one_encoder_frozen_the_other_trained(data: Path, tmp_path: Path, frozen: str, trained: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real_build = FinetuneRecipe.build_model

    def build(self, config, accelerator):
        model = real_build(self, config, accelerator)
        seen["model"] = model
        seen["before"] = {part: [p.detach().clone() for p in getattr(model, part).parameters()]
                          for part in ("vision", "text")}
        return model

    monkeypatch.setattr(FinetuneRecipe, "build_model", build)
    config = _config(data, tmp_path / "run", frozen)
    assert config.freeze_encoders == frozen
    train(config)
    model, before = seen["model"], seen["before"]
    assert getattr(model, frozen).frozen and not getattr(model, trained).frozen
    assert all(torch.equal(a, b) for a, b in zip(before[frozen], getattr(model, frozen).parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before[trained], getattr(model, trained).parameters()))
    run = json.loads((tmp_path / "run" / "final" / "run.json").read_text())
    assert ("feature_cache" in run) == (frozen == "vision")  # image tokens cached only when vision is frozen


def test_freeze_encoders_takes_true_false_vision_or_text(data: Path, tmp_path: Path) -> None:
    assert _config(data, tmp_path, "true").freeze_encoders is True
    assert _config(data, tmp_path, "false").freeze_encoders is False
    with pytest.raises(ConfigError, match="freeze_encoders"):
        _config(data, tmp_path, "fusion")
