"""``fusionzoo pretrain`` from webdataset shards: a streamed source trains by max_steps and resumes exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fusionzoo.training.config import ConfigError, load_config
from fusionzoo.training.pretrain import pretrain, pretrain_base_config
from fusionzoo.training.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from image_text_fixtures import write_shards  # noqa: E402

FUSION = ['fusion_kwargs={"dim": 32, "embed_dim": 16, "num_layers": 1, "num_heads": 2}']


def _log(run: Path) -> dict[int, dict[str, float]]:
    records = map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "event" not in r}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    write_shards(root / "shards", 4, 5)
    write_shards(root / "val", 1, 4, start=100)
    return root


def _common(shards: Path) -> list[str]:
    return [f"data_dir={shards}", "data=webdataset",
            "data_files={train: 'shards/{0000..0003}.tar', val: 'val/0000.tar'}", "vision=tiny", "text=tiny",
            "freeze_encoders=true", *FUSION, "batch_size=4", "max_steps=6", "lr=1e-3", "log_every=1",
            "log_with=none", "seed=0", "max_eval_samples=8", "data_kwargs.shuffle_buffer=8"]


def test_pretrain_streams_shards_by_max_steps_and_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    result = pretrain(load_config(None, [*_common(shards), "save_every=3", f"output_dir={a}"],
                                  base=pretrain_base_config()))
    assert result["step"] == 6 and set(result["train"]) >= {"loss", "itc", "itm", "mlm"}
    assert result["eval"]["num_samples"] == 8.0  # two full batches of the val stream
    assert sorted(_log(a)) == [1, 2, 3, 4, 5, 6]  # 20 pairs, 24 read: the stream went round again

    checkpoint = a / "checkpoints" / "step-00000003"
    shutil.copytree(checkpoint, b / "checkpoints" / checkpoint.name)
    pretrain(load_config(None, [*_common(shards), "resume=auto", f"output_dir={b}"], base=pretrain_base_config()))
    log_a, log_b = _log(a), _log(b)
    assert sorted(log_b) == [4, 5, 6]
    for step in log_b:  # the resumed stream re-read its first 3 batches and gave the same next ones
        for key in ("loss", "itc", "itm", "mlm"):
            assert log_b[step][f"train/{key}"] == pytest.approx(log_a[step][f"train/{key}"], rel=1e-5, abs=1e-6)
    final_a = safetensors.torch.load_file(str(a / "final" / "model.safetensors"))
    final_b = safetensors.torch.load_file(str(b / "final" / "model.safetensors"))
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-6)


def test_streamed_data_needs_max_steps_and_a_pretraining_recipe(shards: Path, tmp_path: Path) -> None:
    overrides = [o for o in _common(shards) if not o.startswith("max_steps")]
    with pytest.raises(ConfigError, match="is streamed and has no length; set max_steps"):
        pretrain(load_config(None, [*overrides, f"output_dir={tmp_path / 'a'}"], base=pretrain_base_config()))
    with pytest.raises(ConfigError, match="key 'batch_size': .* 4 is not a multiple of 3"):
        pretrain(load_config(None, [*_common(shards), "num_workers=3", f"output_dir={tmp_path / 'w'}"],
                             base=pretrain_base_config()))
    with pytest.raises(ConfigError, match="task=captioning trains and evaluates on map-style data"):
        train(load_config(None, [*_common(shards), "task=captioning", "fusion=merged_transformer",
                                 'fusion_kwargs={"dim": 32, "num_layers": 1, "num_heads": 2}',
                                 f"output_dir={tmp_path / 'b'}"]))
