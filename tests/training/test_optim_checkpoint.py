"""Optimiser groups, the warmup-cosine schedule and atomic checkpoint bookkeeping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fusionzoo.errors import CheckpointError
from fusionzoo.training.checkpoint import CheckpointManager, run_metadata, write_json_atomic
from fusionzoo.training.optim import build_optimizer, parameter_groups
from fusionzoo.training.step import LearningRates, plan_steps


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Linear(4, 4)
        self.text = nn.Embedding(10, 4)
        self.fusion = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.temperature = nn.Parameter(torch.tensor(0.07))


def test_parameter_groups_split_decay_and_encoders() -> None:
    model = Toy()
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, weight_decay=0.1)}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    assert ids["fusion_head_decay"] == {id(model.fusion[0].weight)}
    assert ids["fusion_head_no_decay"] == {id(model.fusion[0].bias), id(model.fusion[1].weight),
                                          id(model.fusion[1].bias), id(model.temperature)}
    assert ids["encoder_decay"] == {id(model.vision.weight), id(model.text.weight)}
    assert groups["encoder_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["fusion_head_no_decay"]["weight_decay"] == 0.0
    model.vision.requires_grad_(False)
    model.text.requires_grad_(False)
    names = {g["name"] for g in parameter_groups(model, 1e-3, 0.1)}
    assert names == {"fusion_head_decay", "fusion_head_no_decay"}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, 1e-3, 0.1)


def test_warmup_cosine_values() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    plan = plan_steps(5, epochs=2, warmup_ratio=0.2)
    assert (plan.per_epoch, plan.total, plan.warmup) == (5, 10, 2)
    rates = LearningRates(opt, plan)
    lrs = []
    for step in range(10):
        assert rates.set(step) == opt.param_groups[0]["lr"]
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * lrs[-1])  # every group scaled from its own base
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx(expected)


def test_plan_steps_counts_as_both_loops_did() -> None:
    # a fraction of an epoch rounds the steps up; the warmup rounds to the nearest step
    assert plan_steps(7, epochs=1.5, warmup_ratio=0.1) == plan_steps(7, epochs=1.5, warmup_ratio=0.1)
    plan = plan_steps(7, epochs=1.5, warmup_ratio=0.1)
    assert (plan.per_epoch, plan.total, plan.warmup) == (7, 11, 1)
    plan = plan_steps(9, epochs=1, warmup_ratio=0.3, grad_accum=2)  # 5 steps of 2 batches (the last one 1)
    assert (plan.per_epoch, plan.total, plan.warmup) == (5, 5, 2)
    assert plan_steps(9, epochs=3, warmup_ratio=0.0, max_steps=4).total == 4
    assert plan_steps(1, epochs=0.01, warmup_ratio=0.5).total == 1  # at least one step


def test_write_json_atomic_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "m.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_run_metadata_has_versions() -> None:
    meta = run_metadata({"lr": 1})
    assert meta["config"] == {"lr": 1}
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])


def test_checkpoint_manager_save_prune_resume(tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(3, 3))
    # An earlier run's checkpoint in the same folder is never pruned by this run.
    CheckpointManager(tmp_path, keep_last=1, run_id="earlier").save(
        accelerator, 5, {"step": 5, "epoch": 0, "batches_in_epoch": 5})
    manager = CheckpointManager(tmp_path, keep_last=2, run_id="this")
    for step in (10, 20, 30):
        manager.save(accelerator, step, {"step": step, "epoch": 0, "batches_in_epoch": step})
    names = [p.name for p in manager.checkpoints()]
    assert names == ["step-00000005", "step-00000020", "step-00000030"]
    assert CheckpointManager.read_progress(manager.root / "step-00000030")["run_id"] == "this"
    # An interrupted write (no progress.json) is never picked up for resuming.
    (manager.root / ".tmp-step-00000040").mkdir()
    (manager.root / "step-00000050").mkdir()
    assert manager.resolve_resume("auto").name == "step-00000030"
    assert CheckpointManager.read_progress(manager.latest())["step"] == 30
    with pytest.raises(CheckpointError, match="not a complete fusionzoo checkpoint"):
        manager.resolve_resume(str(manager.root / "step-00000050"))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        manager.resolve_resume(str(tmp_path / "nope"))
    # The saved weights are safetensors, loadable without pickle.
    assert (manager.latest() / "model.safetensors").is_file()
    del model


def test_a_kill_at_any_point_of_a_save_leaves_nothing_the_next_save_keeps(tmp_path: Path) -> None:
    """A SIGKILL while a run saves and prunes, then the resumed run (same run id) saves again."""
    import shutil

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(nn.Linear(3, 3))

    def fresh() -> CheckpointManager:
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
        manager = CheckpointManager(tmp_path, keep_last=2, run_id="run")
        for step in (3, 6, 9):
            manager.save(accelerator, step, {"step": step, "epoch": 0, "batches_in_epoch": step})
        return manager

    cases = {
        # killed while writing step 12 (its staging folder half written)
        "writing": lambda m: (m.root / ".tmp-step-00000012").mkdir(),
        # killed after step 12 was renamed into place, before the prune removed step 6
        "before prune": lambda m: shutil.copytree(m.root / "step-00000009", m.root / "step-00000012")
        or shutil.copytree(m.root / "step-00000006", m.root / "step-00000003"),
        # killed while deleting an old checkpoint: its progress.json gone, other files left
        "deleting, old layout": lambda m: (m.root / "step-00000006" / "progress.json").unlink(),
        # the same with today's prune, which renames the folder out of step-* before deleting it
        "deleting": lambda m: (m.root / "step-00000006").rename(m.root / ".tmp-deleting-step-00000006"),
    }
    for name, kill in cases.items():
        manager = fresh()
        assert [p.name for p in manager.root.iterdir()] and len(manager.checkpoints()) == 2
        kill(manager)
        resumed = CheckpointManager(tmp_path, keep_last=2, run_id="run")
        for step in (15, 18):
            resumed.save(accelerator, step, {"step": step, "epoch": 0, "batches_in_epoch": step})
        assert sorted(p.name for p in resumed.root.iterdir()) == ["step-00000015", "step-00000018"], name


def test_build_optimizer_updates_like_the_reference_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    reference = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    fast = build_optimizer(model, 1e-2, 0.1)
    # The plain per-parameter loop, with the same decay groups.
    slow = torch.optim.AdamW(parameter_groups(reference, 1e-2, 0.1), betas=(0.9, 0.999), eps=1e-8,
                             foreach=False, fused=False)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4):
        assert fast.param_groups[0]["fused"]  # the fused CPU kernel exists from torch 2.4
    for _ in range(3):
        x = torch.randn(4, 6)
        for net, opt in ((model, fast), (reference, slow)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_warmup_cosine_factor_values() -> None:
    from fusionzoo.training.optim import warmup_cosine_factor

    # 2 warmup steps of 10: 1/2, 2/2, then cos from step 2 (progress 0) to step 10 (progress 1).
    assert warmup_cosine_factor(0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine_factor(1, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine_factor(6, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert warmup_cosine_factor(10, 10, 2) == pytest.approx(0.0)
    assert warmup_cosine_factor(50, 10, 2) == pytest.approx(0.0)  # past the end: stays at the floor


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launch_on_the_cpu_is_a_clear_error(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionzoo.training.config import ConfigError, TrainConfig
    from fusionzoo.training.loop import make_accelerator

    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match="only on GPUs"):
        make_accelerator(TrainConfig(cpu=True, log_with="none"))
