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
* :class:`CompiledModules` -- ``compile`` / ``train_model(compile=...)``: the trained modules
  compiled in place for the step, eager again where compiling fails or the step is not taken.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar, get_args

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, FusionZooError, TrainingStopped
from ..hardware import auto_mixed_precision
from ..processes import OneProcess
from .config import CompileMode
from .optim import warmup_cosine_factor

logger = logging.getLogger(__name__)

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
    "albef": "in bf16, ALBEF fine-tuned with its in-batch ITC loss stayed on Sort-of-CLEVR's position plateau "
             "for one seed in three (test 82.8 +- 8.9 against 88.3 +- 0.4 in float32 on the same machine, "
             "left/right at chance for that seed); without ITC (itc_weight=0) the two precisions agree",
}
#: Per fusion of :data:`BF16_UNSAFE`: the fusion keyword arguments under which bf16 was measured to
#: agree with float32, so ``auto`` may choose bf16 for them.
BF16_SAFE_WITH: dict[str, Callable[[dict[str, Any]], bool]] = {
    "albef": lambda kwargs: kwargs.get("itc_weight") == 0,
}


def bf16_unsafe(fusion: str | None, fusion_kwargs: dict[str, Any] | None = None) -> str | None:
    """Why ``auto`` keeps ``fusion`` (built with ``fusion_kwargs``) out of bf16, or None where bf16 is safe."""
    if fusion not in BF16_UNSAFE:
        return None
    safe = BF16_SAFE_WITH.get(fusion)
    return None if safe is not None and safe(dict(fusion_kwargs or {})) else BF16_UNSAFE[fusion]


def resolve_precision(value: str, device_type: str, *, key: str = "mixed_precision", fusion: str | None = None,
                      fusion_kwargs: dict[str, Any] | None = None) -> str:
    """``auto`` made concrete (:func:`fusionzoo.hardware.auto_mixed_precision`); other values checked.

    Args:
        value: ``auto``, ``no``, ``bf16`` or ``fp16``.
        device_type: where the step runs (``cpu``, ``cuda``).
        key: the option's name in error messages (``--mixed-precision`` for the bench).
        fusion: the fusion trained: ``auto`` keeps one of :data:`BF16_UNSAFE` in float32 (``no``)
            where it would choose bf16 (:func:`bf16_unsafe`); an explicit ``bf16`` is kept.
        fusion_kwargs: the fusion's keyword arguments (some make bf16 safe: :data:`BF16_SAFE_WITH`).

    Raises:
        ConfigError: an unknown value, or ``fp16`` on the CPU (torch has no fp16 autocast there).
    """
    if value not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    if value == "auto":
        chosen = auto_mixed_precision(on_cuda=device_type == "cuda")
        return "no" if chosen == "bf16" and bf16_unsafe(fusion, fusion_kwargs) else chosen
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


# --------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------
#: The ``torch.compile`` modes that ``compile`` may name; ``true`` is ``default``.
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
#: The backend :class:`CompiledModules` compiles with (a test puts one here that fails).
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"
#: Graphs torch may compile for the modules before it runs them eager. Every ``nn.Module.compile``
#: compiles ``nn.Module._call_impl``, one code object, so all compiled modules of a process share
#: torch's budget (8 by default): a bench process that trains several fusions, each a fusion and a
#: head in a few shapes, needs more. Given where ``torch.compile`` takes ``recompile_limit``.
RECOMPILE_LIMIT = 64

StepResult = TypeVar("StepResult")


def compile_mode(value: bool | str | None, *, key: str = "compile") -> str | None:
    """The ``torch.compile`` mode that ``compile`` asks for: None when off, ``default`` for true.

    Raises:
        ConfigError: a string that is not one of :data:`COMPILE_MODES`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise ConfigError(f"{key} must be true, false or one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


def trained_children(model: nn.Module) -> dict[str, nn.Module]:
    """The children of ``model`` that hold a trainable parameter, by name: what ``compile`` compiles.

    A :class:`~fusionzoo.model.FusionModel` with frozen encoders gives its fusion and head (and
    alignment); with trained encoders, the encoders too; the bench's encoder-tails model, its
    tails and the model behind them. Frozen modules (encoders, momentum copies) stay eager: they
    take no gradient, and with the feature cache the encoders do not run in the step at all.
    """
    return {name: child for name, child in model.named_children()
            if any(p.requires_grad for p in child.parameters())}


def _compile_callbacks() -> Any | None:
    """torch's handler of compile start / end callbacks, or None where this torch has none."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return None
    return callback_handler if hasattr(callback_handler, "register_start_callback") else None


def _reason(exc: BaseException) -> str:
    """One line that names why compiling failed: the innermost exception's type and first line."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}"[:300] if lines else type(exc).__name__


class CompiledModules:
    """The trained children of a model, compiled in place (``nn.Module.compile``) for the training step.

    In place: the modules, their parameters and their ``state_dict`` keys stay the eager
    model's, so a checkpoint or saved model is the same whether the run compiled or not, and
    loads into either. Only the step runs compiled: evaluation runs eager inside
    :meth:`paused` (a switch to eval mode and no gradients would compile again, and generation
    would compile for its lengths), and :meth:`release` makes the modules eager for good.

    The first :meth:`step` compiles (the forward at its first call, the backward at its first
    backward pass). Where that fails -- no C++ compiler, an operation the compiler does not
    take, a dynamo error -- the modules become eager, the model's buffers and torch's random
    generators are put back as they were before the step, gradients are dropped, one warning
    names the reason, and the step is taken again eager: training goes on. A step that fails
    eager too raises its own error, and a :class:`~fusionzoo.errors.FusionZooError` raised by
    the step (a non-finite loss) is never taken for a failure to compile.

    ``compile_seconds`` adds up the seconds torch spent compiling inside :meth:`step`,
    recompiles for new shapes included, from torch's compile callbacks (where this torch has
    none: the first step's seconds); the callbacks are process-wide, so rows trained at once in
    threads count each other's. Drivers leave these seconds out of the step times they report.

    Args:
        model: the model whose trained children (:func:`trained_children`) are compiled.
        compile: false or None (nothing is compiled; :meth:`step` just takes the step), true,
            or a mode of :data:`COMPILE_MODES`.
    """

    def __init__(self, model: nn.Module, compile: bool | str | None) -> None:
        self.model = model
        self.mode = compile_mode(compile)
        self.modules = trained_children(model) if self.mode else {}
        self.failure: str | None = None
        self.compile_seconds = 0.0
        self._first = bool(self.modules)
        self._started: float | None = None
        self._callbacks = _compile_callbacks()
        if self.modules and not hasattr(nn.Module, "compile"):
            self._fall_back("this torch has no nn.Module.compile (torch 2.2 or later has)")
        options: dict[str, Any] = {"mode": None if self.mode == "default" else self.mode, "backend": COMPILE_BACKEND}
        if self.modules and "recompile_limit" in inspect.signature(torch.compile).parameters:
            options["recompile_limit"] = RECOMPILE_LIMIT
        for module in self.modules.values():
            module.compile(**options)
        self._compiled = {name: module._compiled_call_impl for name, module in self.modules.items()}

    def summary(self) -> dict[str, Any]:
        """What a run records: the mode, the modules compiled, seconds compiling, and why it fell back (or None)."""
        return {"mode": self.mode, "modules": list(self._compiled), "seconds": round(self.compile_seconds, 3),
                "fallback": self.failure}

    def step(self, take: Callable[[], StepResult]) -> StepResult:
        """``take()``: one training step (forward, backward, update); the first compiles, eager if that fails."""
        first, self._first = self._first, False
        if not self.modules:
            return take()
        if not first:
            with self._clock():
                return take()
        saved = self._state()
        start = time.perf_counter()
        try:
            with self._clock():
                result = take()
        except FusionZooError:
            raise
        except Exception as exc:  # any failure to compile; a real error raises again when taken eager
            self._fall_back(_reason(exc))
            self._restore(saved)
            return take()
        if self._callbacks is None:
            self.compile_seconds += time.perf_counter() - start
        return result

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The modules eager inside (evaluation during training), compiled again after."""
        for module in self.modules.values():
            module._compiled_call_impl = None
        try:
            yield
        finally:
            for name, module in self.modules.items():
                module._compiled_call_impl = self._compiled[name]

    def release(self) -> None:
        """Make the modules eager for good (training is over)."""
        for module in self.modules.values():
            module._compiled_call_impl = None
        self.modules = {}

    # -- inside -----------------------------------------------------------------------
    def _fall_back(self, reason: str) -> None:
        names = ", ".join(self.modules) or "the model"
        self.failure = reason
        logger.warning("torch.compile of %s failed (%s); training on eager", names, reason)
        self.release()

    @contextlib.contextmanager
    def _clock(self) -> Iterator[None]:
        """Count the seconds torch compiles inside the block into ``compile_seconds``."""
        if self._callbacks is None:
            yield
            return
        self._callbacks.register_start_callback(self._on_start)
        self._callbacks.register_end_callback(self._on_end)
        try:
            yield
        finally:
            self._callbacks.remove_start_callback(self._on_start)
            self._callbacks.remove_end_callback(self._on_end)

    def _on_start(self, args: Any) -> None:
        self._started = time.perf_counter()

    def _on_end(self, args: Any) -> None:
        if self._started is not None:
            self.compile_seconds += time.perf_counter() - self._started
            self._started = None

    def _state(self) -> tuple[list[Tensor], Tensor, list[Tensor] | None]:
        """The model's buffers and torch's generators before the first step, to take it again eager."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return [b.detach().clone() for b in self.model.buffers()], torch.get_rng_state(), cuda

    def _restore(self, saved: tuple[list[Tensor], Tensor, list[Tensor] | None]) -> None:
        buffers, cpu, cuda = saved
        with torch.no_grad():
            for buffer, value in zip(self.model.buffers(), buffers):
                buffer.copy_(value)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        self.model.zero_grad(set_to_none=True)
