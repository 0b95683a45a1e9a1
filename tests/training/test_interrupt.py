"""SIGINT and SIGTERM during training: the step finishes, a checkpoint is saved, the run exits 130 with a
hint to resume, and resuming gives the uninterrupted run's losses -- on one process and on two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import train_log, write_vqa_jsonl
from fusionzoo.plugins import import_plugin
from fusionzoo.registry import FUSIONS
from fusionzoo.training.config import load_config
from fusionzoo.training.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 24

# Each training forward sleeps, so a run lasts long enough to be interrupted mid-way.
SLOW_PLUGIN = '''
import time

import fusionzoo
from fusionzoo.fusions.early_concat import EarlyConcatFusion


@fusionzoo.register_fusion("slow_concat", override=True)
class SlowConcat(EarlyConcatFusion):
    """Early concatenation that takes 60 ms longer per training forward."""

    def forward(self, *args, **kwargs):
        if self.training:
            time.sleep(0.06)
        return super().forward(*args, **kwargs)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    write_vqa_jsonl(root / "vqa", {"train": 200, "test": 8})  # 25 steps an epoch: no epoch-end checkpoint
    (root / "slow.py").write_text(SLOW_PLUGIN)
    return {"root": root, "data": root / "vqa", "plugin": root / "slow.py"}


def _args(setup: dict[str, Path], out: Path, batch: int) -> list[str]:
    return ["task=vqa", "fusion=slow_concat", "data=vqa-jsonl", f"data_dir={setup['data']}", "vision=tiny",
            "text=tiny", "fusion_kwargs.dim=16", "fusion_kwargs.dropout=0.0", "head_kwargs.dropout=0.0",
            f"batch_size={batch}", f"max_steps={STEPS}", "lr=3e-3", "warmup_ratio=0.2", "log_with=none",
            "log_every=1", "seed=2", "max_eval_samples=8", "eval_every=1000", f"output_dir={out}"]


@pytest.fixture(scope="module")
def reference(setup: dict[str, Path]) -> dict[int, dict[str, float]]:
    """One process at batch 8, uninterrupted (2 processes at batch 4 train the same model)."""
    import_plugin(str(setup["plugin"]))
    try:
        train(load_config(None, [*_args(setup, setup["root"] / "reference", 8), "cpu=true"]))
    finally:
        FUSIONS.unregister("slow_concat")
    return train_log(setup["root"] / "reference")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(setup: dict[str, Path], processes: int) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                     str(_free_port())]
    return [*launcher, "-m", "fusionzoo", "--import", str(setup["plugin"]), "train"]


def _interrupt_then_resume(setup: dict[str, Path], out: Path, processes: int, sig: signal.Signals) -> None:
    args = _args(setup, out, 8 // processes)
    proc = subprocess.Popen([*_command(setup, processes), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 120
    log = out / "train_log.jsonl"
    while proc.poll() is None and time.time() < deadline:  # wait for step 5 of 24
        if log.is_file() and len([x for x in log.read_text().splitlines() if '"train/loss"' in x]) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(sig)  # to the single process, or to torchrun, which passes it to both workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-3000:]
    if processes == 1:
        assert proc.returncode == 130
    assert "interrupted at step" in stderr and "continue with resume=auto" in stderr, stderr[-3000:]
    assert not (out / "final").exists()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / "progress.json").read_text())["step"]
    assert 5 <= stopped_at < STEPS

    resumed = subprocess.run([*_command(setup, processes), *args, "resume=auto"], capture_output=True, text=True,
                             timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume=auto: continuing from {checkpoints[0]}" in resumed.stdout
    events = [json.loads(x) for x in log.read_text().splitlines() if '"event"' in x]
    assert [e["event"] for e in events] == ["start", "resume"] and events[1]["step"] == stopped_at
    assert events[0]["run_id"] == events[1]["run_id"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_process_interrupted_and_resumed_equals_the_uninterrupted_run(
        setup: dict[str, Path], reference: dict[int, dict[str, float]], tmp_path: Path, sig: signal.Signals) -> None:
    _interrupt_then_resume(setup, tmp_path / "run", 1, sig)
    resumed = train_log(tmp_path / "run")
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step


def test_two_processes_stop_together_and_resume_to_the_uninterrupted_run(
        setup: dict[str, Path], reference: dict[int, dict[str, float]], tmp_path: Path) -> None:
    _interrupt_then_resume(setup, tmp_path / "run", 2, signal.SIGTERM)  # a cluster's preemption
    resumed = train_log(tmp_path / "run")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in reference:
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step
