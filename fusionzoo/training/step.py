"""One training step, one schedule, one precision rule and one non-finite check, for every loop.

``fusionzoo train`` / ``fusionzoo pretrain`` (:func:`fusionzoo.training.loop.run`, on Accelerate)
and the bench's one-process loop over cached features (:mod:`fusionzoo.bench.loop`) drive
differently -- checkpoints and processes on one side, many small rows on the other -- but take
their step from here, so a change to how a step is taken is made once:

* :func:`resolve_precision` -- what ``mixed_precision`` / ``--mixed-precision`` become;
  :func:`autocast` -- the context a resolved precision runs the forward pass in.
* :func:`seed_everything` -- the random generators seeded before a model is built.
* :func:`plan_steps` -- optimizer steps per epoch, in all, and of warmup;
  :class:`LearningRates` -- the warmup-cosine rate set on the optimizer before each step.
* :func:`check_finite` -- the one error (:class:`NonFiniteLossError`) for a NaN or infinite loss.
* :func:`optimizer_step` -- backward, clipping, the update, zeroed gradients; on Accelerate's
  ``Accelerator`` or on :class:`LocalAccelerator`, the few parts of it that one process on one
  device needs (the bench trains rows in threads, one per GPU, where Accelerate's process-wide
  state cannot follow).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, TrainingStopped
from ..hardware import auto_mixed_precision
from ..processes import OneProcess
from .optim import warmup_cosine_factor

#: The values of ``mixed_precision`` (``fusionzoo train``) and ``--mixed-precision`` (``fusionzoo bench``).
PRECISIONS = ("auto", "no", "bf16", "fp16")


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN or infinite (on some process); the last good state was kept."""


# --------------------------------------------------------------------------------------
# Precision and seeds
# --------------------------------------------------------------------------------------
#: Fusions that ``auto`` trains in float32 where it would choose bf16, and why. A fusion stays off
#: this list only when its bf16 runs agree with float32 within the seeds' spread.
BF16_UNSAFE: dict[str, str] = {
    "albef": "in bf16 ALBEF stayed on Sort-of-CLEVR's position plateau (77.0 against 88.1 in float32 on "
             "the same machine, left/right questions 51.0 against 95.8)",
}


def resolve_precision(value: str, device_type: str, *, key: str = "mixed_precision", fusion: str | None = None) -> str:
    """``auto`` made concrete (:func:`fusionzoo.hardware.auto_mixed_precision`); other values checked.

    Args:
        value: ``auto``, ``no``, ``bf16`` or ``fp16``.
        device_type: where the step runs (``cpu``, ``cuda``).
        key: the option's name in error messages (``--mixed-precision`` for the bench).
        fusion: the fusion trained: ``auto`` keeps one of :data:`BF16_UNSAFE` in float32 (``no``)
            where it would choose bf16; an explicit ``bf16`` is kept.

    Raises:
        ConfigError: an unknown value, or ``fp16`` on the CPU (torch has no fp16 autocast there).
    """
    if value not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    if value == "auto":
        chosen = auto_mixed_precision(on_cuda=device_type == "cuda")
        return "no" if chosen == "bf16" and fusion in BF16_UNSAFE else chosen
    if value == "fp16" and device_type == "cpu":
        raise ConfigError(f"{key} fp16 needs a CUDA device; on the CPU use bf16 or no")
    return value


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (``no``: plain float32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed``, as ``accelerate.utils.set_seed`` does.

    ``device``: a CUDA device whose generator alone is seeded (with the CPU's), leaving the
    other GPUs' streams alone; None seeds every GPU's.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if not torch.cuda.is_available():
        return
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device is None:
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes.

    Attributes:
        per_epoch: optimizer steps in one epoch.
        total: optimizer steps in the run.
        warmup: steps of linear warmup at the start of ``total``.
    """

    per_epoch: int
    total: int
    warmup: int


def plan_steps(batches_per_epoch: int, *, epochs: float, warmup_ratio: float, grad_accum: int = 1,
               max_steps: int | None = None) -> StepPlan:
    """The one rule for counting steps: ``ceil(epochs x steps per epoch)``, warmup ``round(ratio x total)``.

    Args:
        batches_per_epoch: batches one process reads in an epoch.
        epochs: passes over the data (fractions allowed; at least one step is taken).
        warmup_ratio: fraction of the steps spent warming the learning rate up.
        grad_accum: batches per optimizer step.
        max_steps: the run's steps, given (then ``epochs`` only names the epoch length).
    """
    per_epoch = max(1, math.ceil(batches_per_epoch / max(1, grad_accum)))
    total = max_steps or max(1, math.ceil(epochs * per_epoch))
    return StepPlan(per_epoch=per_epoch, total=total, warmup=round(warmup_ratio * total))


class LearningRates:
    """The warmup-cosine learning rate of each optimizer step, set on the optimizer's groups.

    A pure function of the step (:func:`~fusionzoo.training.optim.warmup_cosine_factor`) times
    each group's base rate: a resumed run, or one on several processes, sets the rates a
    one-process run sets, with no scheduler state to save.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        self.optimizer, self.plan = optimizer, plan
        self.base = [group["lr"] for group in optimizer.param_groups]

    def set(self, step: int) -> float:
        """Set the rates of optimizer step ``step`` (0-based); return the first group's."""
        factor = warmup_cosine_factor(step, self.plan.total, self.plan.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor
        return self.base[0] * factor


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------
def check_finite(loss: Tensor, losses: dict[str, Tensor], *, finite: bool | None = None, where: str,
                 advice: str, saved: str | None = None) -> None:
    """Raise :class:`NonFiniteLossError` when the loss is NaN or infinite.

    Args:
        loss: the scalar about to be backpropagated; losses: its parts (named in the message).
        finite: the decision when it was taken together with other processes (None: this loss's).
        where: which step of which run (``"at step 12 (epoch 0, batch 12)"``).
        advice: what to try (each driver names its own options).
        saved: where the last good state was saved, if it was.
    """
    if finite is None:
        finite = bool(torch.isfinite(loss.detach()).all())
    if finite:
        return
    if bool(torch.isfinite(loss.detach()).all()):
        what = "the loss of another process is not finite"
    else:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        what = f"loss is {loss.item()}" + (f" ({parts})" if parts else "")
    kept = f"; the last good state was saved to {saved}" if saved else ""
    raise NonFiniteLossError(f"{what} {where}{kept}. {advice}")


def optimizer_step(accelerator: Any, model: nn.Module, optimizer: Any, loss: Tensor,
                   max_grad_norm: float | None) -> None:
    """Backpropagate ``loss``, clip the gradients to ``max_grad_norm`` (0/None: no clipping), update, zero.

    ``accelerator`` is Accelerate's ``Accelerator`` (gradient accumulation: clipping waits for
    the batch that syncs) or a :class:`LocalAccelerator`; ``optimizer`` the one it prepared.
    """
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _ScaledOptimizer:
    """An optimizer whose ``step`` goes through a GradScaler (fp16), as Accelerate's prepared optimizer does."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class LocalAccelerator(OneProcess):
    """What :func:`optimizer_step` and evaluation ask of an ``Accelerator``, for one process on one device.

    A :class:`~fusionzoo.processes.OneProcess` (identity gathers) whose ``autocast`` is
    :func:`autocast` of the precision; ``prepare_optimizer`` wraps the optimizer as
    Accelerate does for fp16 (a GradScaler); ``backward`` scales the loss,
    ``clip_grad_norm_`` unscales before clipping. No gradient accumulation: every batch syncs.
    """

    sync_gradients = True

    def __init__(self, precision: str, device: torch.device) -> None:
        super().__init__(device, autocast=lambda: autocast(precision, self.device))
        self.precision = precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._optimizer: torch.optim.Optimizer | None = None

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        self._optimizer = optimizer
        return _ScaledOptimizer(optimizer, self.scaler) if self.scaler.is_enabled() else optimizer

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_grad_norm_(self, parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
        if self.scaler.is_enabled() and self._optimizer is not None:
            self.scaler.unscale_(self._optimizer)
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
