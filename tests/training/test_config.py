"""Run configuration: YAML + overrides, types, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusionzoo.training.config import ConfigError, TrainConfig, from_dict, load_config, parse_overrides


def test_defaults_without_file() -> None:
    cfg = load_config(None, [])
    assert cfg == TrainConfig()


def test_yaml_then_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: captioning\nfusion: albef\nlr: 0.001\nbatch_size: 8\nfusion_kwargs: {dim: 64}\n")
    cfg = load_config(path, ["lr=3e-4", "max_steps=50", "mixed_precision=bf16", "freeze_encoders=false",
                             "fusion_kwargs.num_layers=3", "resume=auto", "eval_batch_size=null"])
    assert cfg.task == "captioning" and cfg.fusion == "albef"
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.max_steps == 50 and cfg.batch_size == 8
    assert cfg.mixed_precision == "bf16" and cfg.freeze_encoders is False
    assert cfg.fusion_kwargs == {"dim": 64, "num_layers": 3}
    assert cfg.resume == "auto" and cfg.eval_batch_size is None


def test_unknown_key_names_source_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"run.yaml, line 1: unknown key 'learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'batchsize'.*Did you mean 'batch_size'"):
        load_config(None, ["batchsize=4"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=many", "key 'batch_size' expects an integer, got 'many'"),
        ("lr=fast", "key 'lr' expects a number"),
        ("mixed_precision=fp8", "key 'mixed_precision' must be one of 'no', 'bf16', 'fp16'"),
        ("freeze_encoders=maybe", "key 'freeze_encoders' expects bool or 'vision' | 'text', got 'maybe'"),
        ("batch_size=0", "key 'batch_size' must be >= 1"),
        ("fusion_kwargs=3", "key 'fusion_kwargs' expects a mapping"),
    ],
)
def test_bad_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict() -> None:
    cfg = load_config(None, ["fusion=co_attention", "fusion_kwargs={\"dim\": 32}", "max_steps=7"])
    assert from_dict(cfg.to_dict()) == cfg


def test_example_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from conftest import REPO_ROOT

    fsdp = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    ds = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.num_processes == 8
    assert ds.distributed_type == DistributedType.DEEPSPEED and ds.num_machines == 2


def test_mixed_precision_auto_is_bf16_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusionzoo.hardware
    from fusionzoo.training.step import resolve_precision

    assert load_config(None, ["mixed_precision=auto"]).mixed_precision == "auto"
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"  # YAML would read a bare no as False
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["mixed_precision=fast"])
    for fast, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(fusionzoo.hardware, "cpu_has_bf16_instructions", lambda fast=fast: fast)
        assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("no", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="must be one of auto, no, bf16, fp16"):
        resolve_precision("fp8", "cuda")
