"""Resumable checkpoints on top of ``Accelerator.save_state``, written atomically.

Layout under ``output_dir``::

    checkpoints/step-00000100/   accelerate state (model.safetensors, optimizer, scheduler,
                                 RNG states per process) + progress.json
    checkpoints/step-00000200/
    final/                       save_pretrained export of the trained model

A checkpoint is written into ``checkpoints/.tmp-step-...`` and renamed into place only
once every process has finished writing, so a run killed at any moment leaves either
a complete checkpoint or none (the previous ones stay). Only the last ``keep_last``
checkpoints *of this run* are kept: each checkpoint records the id of the run that wrote
it (a resumed run keeps the id of the checkpoint it continues), and pruning never removes
another run's checkpoints. ``progress.json`` holds the step, the epoch and the position in
the epoch (for ``skip_first_batches``), the run id, the full run config, the git commit
and the package versions. Nothing is ever unpickled beyond what ``torch.load(weights_only=True)``
allows (accelerate's own loader): no custom objects are registered for checkpointing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io import write_json_atomic

PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def git_commit() -> str | None:
    """The commit of the fusionzoo source tree, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    names = ["fusionzoo", "torch", "torchvision", "timm", "transformers", "accelerate",
             "datasets", "evaluate", "safetensors", "numpy"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint and result file carries: config, code version, packages."""
    return {"config": config, "git_commit": git_commit(), "versions": package_versions()}


class CheckpointManager:
    """Saves, finds and prunes step checkpoints of one run.

    Args:
        output_dir: the run folder; checkpoints go to ``output_dir/checkpoints``.
        keep_last: how many complete checkpoints to keep.
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 2, run_id: str | None = None) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.run_id = run_id

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / PROGRESS_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, accelerator: Any, step: int, progress: dict[str, Any]) -> Path:
        """Save the accelerator state and ``progress`` as checkpoint ``step``, atomically."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / PROGRESS_FILE, {**progress, "run_id": self.run_id})
            if final.exists():  # an earlier attempt at the same step (resumed run): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        """Remove this run's checkpoints but the last ``keep_last``, and what a killed run left half done.

        An old checkpoint is renamed out of the ``step-*`` names before it is deleted, so a kill
        during the deletion leaves a ``.tmp-*`` folder (removed by the next prune), never a
        ``step-*`` folder with part of its files."""
        own = [c for c in self.checkpoints() if self._run_of(c) == self.run_id]
        for old in own[: -self.keep_last]:
            doomed = self.root / f".tmp-deleting-{old.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        complete = set(self.checkpoints())
        for path in self.root.iterdir():
            broken = _STEP_DIR.match(path.name) and path.is_dir() and path not in complete  # no progress file
            if path.name.startswith(".tmp-") or broken:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _run_of(checkpoint: Path) -> str | None:
        try:
            return json.loads((checkpoint / PROGRESS_FILE).read_text()).get("run_id")
        except (OSError, ValueError):
            return None

    @staticmethod
    def read_progress(checkpoint: str | Path) -> dict[str, Any]:
        path = Path(checkpoint) / PROGRESS_FILE
        if not Path(checkpoint).is_dir():
            raise CheckpointError(f"resume={checkpoint}: no such checkpoint folder; expected resume=auto or a "
                                  f"checkpoints/step-N folder of a run")
        if not path.is_file():
            raise CheckpointError(
                f"{checkpoint} is not a complete fusionzoo checkpoint: {PROGRESS_FILE} is missing"
            )
        try:
            progress = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        missing = [k for k in ("step", "epoch", "batches_in_epoch") if k not in progress]
        if missing:
            raise CheckpointError(f"{path}: missing keys {missing}; expected a progress file written by fusionzoo")
        return progress

    def resolve_resume(self, resume: str | None) -> Path | None:
        """``None`` -> None; ``auto`` -> latest checkpoint or None; a path -> that checkpoint."""
        if resume is None or resume in ("", "no", "none", "false"):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        self.read_progress(path)  # raises a clear error if incomplete
        return path
