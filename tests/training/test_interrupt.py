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


def _last_step_logged(log: Path) -> int:
    """The last step in ``log`` so far (0 before the first); a line still being written is not read."""
    lines = log.read_text().split("\n")[:-1] if log.is_file() else []
    return max((json.loads(x)["step"] for x in lines if '"train/loss"' in x), default=0)


def _interrupt(setup: dict[str, Path], out: Path, processes: int, sig: signal.Signals, at_step: int,
               resume: bool = False) -> int:
    """Start (or resume) the run, send ``sig`` once it has logged step ``at_step``; the step it stopped at.

    The run must stop with the resume hint and no ``final/``, having saved one checkpoint more.
    """
    args = [*_args(setup, out, 8 // processes), *(["resume=auto"] if resume else [])]
    before = sorted((out / "checkpoints").iterdir()) if resume else []
    proc = subprocess.Popen([*_command(setup, processes), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and _last_step_logged(out / "train_log.jsonl") < at_step:
        time.sleep(0.02)
    proc.send_signal(sig)  # to the single process, or to torchrun, which passes it to both workers
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0, stderr[-3000:]
    if processes == 1:
        assert proc.returncode == 130
    assert "interrupted at step" in stderr and "continue with resume=auto" in stderr, stderr[-3000:]
    if resume:
        assert f"resume=auto: continuing from {before[-1]}" in stdout
    assert not (out / "final").exists()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == len(before) + 1 and checkpoints[:-1] == before
    stopped_at = json.loads((checkpoints[-1] / "progress.json").read_text())["step"]
    assert at_step <= stopped_at < STEPS
    return stopped_at


def _resume(setup: dict[str, Path], out: Path, processes: int, stops: list[int]) -> dict[int, dict[str, float]]:
    """Resume the run stopped at ``stops`` (one step a stop) to its end; its training log by step."""
    last = sorted((out / "checkpoints").iterdir())[-1]
    resumed = subprocess.run([*_command(setup, processes), *_args(setup, out, 8 // processes), "resume=auto"],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume=auto: continuing from {last}" in resumed.stdout
    events = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if '"event"' in x]
    assert [e["event"] for e in events] == ["start"] + ["resume"] * len(stops)
    assert [e["step"] for e in events[1:]] == stops
    assert len({e["run_id"] for e in events}) == 1
    return train_log(out)


def test_one_process_interrupted_by_sigint_and_by_sigterm_resumes_to_the_uninterrupted_run(
        setup: dict[str, Path], reference: dict[int, dict[str, float]], tmp_path: Path) -> None:
    """Stopped by SIGINT (Ctrl-C) at step 5 or later, resumed and stopped again by SIGTERM 3 steps on, resumed
    to the end: each stop exits 130 with one checkpoint more, and the losses are the uninterrupted run's."""
    out = tmp_path / "run"
    first = _interrupt(setup, out, 1, signal.SIGINT, 5)
    second = _interrupt(setup, out, 1, signal.SIGTERM, first + 3, resume=True)
    resumed = _resume(setup, out, 1, [first, second])
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step


def test_two_processes_stop_together_and_resume_to_the_uninterrupted_run(
        setup: dict[str, Path], reference: dict[int, dict[str, float]], tmp_path: Path) -> None:
    out = tmp_path / "run"
    stopped_at = _interrupt(setup, out, 2, signal.SIGTERM, 5)  # a cluster's preemption
    resumed = _resume(setup, out, 2, [stopped_at])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in reference:
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step
