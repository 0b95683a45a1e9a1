"""The one training loop, on HF Accelerate: fine-tuning and ALBEF pretraining are recipes it runs.

A :class:`Recipe` says what is trained: how to build the model, which data it
reads, the loss of a batch, how to evaluate and how to export the result.
:func:`run` does everything else, once, for every recipe, following Accelerate's
examples: ``set_seed`` before building the model, one ``prepare`` call,
``accumulate`` + ``backward``, gradient clipping, ``save_state`` / ``load_state``
with ``skip_first_batches`` to resume mid-epoch, periodic evaluation, checkpoints
written atomically (:class:`~fusionzoo.training.checkpoint.CheckpointManager`) and
the export to ``output_dir/final``.

The same model on N processes as on one:

* **Learning rate.** The schedule is a pure function of the optimizer step
  (:func:`~fusionzoo.training.optim.warmup_cosine_factor`), set on the optimizer
  before each step. No scheduler is handed to ``prepare`` (a prepared scheduler
  steps once per process per optimizer step), so at every step every process
  uses the learning rate of a one-process run, and nothing about it needs saving.
* **Logged losses** are sums over every process's samples divided by their count:
  2 processes at batch 8 log what 1 process at batch 16 logs.
* **Non-finite loss.** Whether the loss is finite is decided together (one
  all-gather of a flag): if any process sees NaN or inf, every process saves the
  same checkpoint (the parameters are still the last good step's) and raises
  :class:`NonFiniteLossError`; no process waits for another in a collective.
* **Evaluation** gathers per-sample values with ``gather_for_metrics`` (the
  padding duplicates of the last batch dropped), so every metric and the loss
  equal a one-process evaluation (see :mod:`fusionzoo.tasks.base`).
* **DDP** runs with ``find_unused_parameters=False``: every trainable parameter
  of a zoo model gets a gradient in every step, so nothing is hidden (a recipe
  that knows it leaves parameters unused says so).
* At the end, every process's parameters are compared by checksum before the
  export.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..errors import OutputDirError, TrainingInterrupted
from ..model_card import write_model_card
from .checkpoint import CheckpointManager, run_metadata, write_json_atomic
from .config import ConfigError, TrainConfig
from .optim import build_optimizer
from ..processes import ProcessView
from .step import LearningRates, NonFiniteLossError, check_finite, optimizer_step, plan_steps, resolve_precision
from .step import CompiledModules, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "Recipe", "RecipeData", "StepContext", "StepOutput", "run"]


# -- what a recipe gives the loop ------------------------------------------------------


@dataclass
class StepContext:
    """Where the loop is when it asks a recipe for the loss of a batch.

    Attributes:
        step: optimizer steps done before this batch (0-based index of the step it belongs to).
        micro: micro-batch within that optimizer step (gradient accumulation).
        epoch: the epoch of this batch.
        steps_per_epoch: optimizer steps in one epoch.
        processes: the view of the other processes (gathers, shared decisions).
    """

    step: int
    micro: int
    epoch: int
    steps_per_epoch: int
    processes: ProcessView


@dataclass
class StepOutput:
    """A recipe's loss of one batch.

    Attributes:
        loss: scalar to backpropagate.
        losses: its parts for logging (``{"vqa": ...}``, ``{"itc": ..., "itm": ..., "mlm": ...}``).
        metrics: other scalars to log (temperature, ITM accuracy); not backpropagated.
        num_samples: samples of this process's batch (the weight of its logged values).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class RecipeData:
    """Datasets and batch functions of a run.

    Attributes:
        train: rows to train on; eval: rows to evaluate (None: no evaluation).
        collate, eval_collate: batch functions of the two loaders.
        drop_last: train on full batches only (every process then gathers one shape).
        eval_drop_last: evaluate full batches only.
        note: one line the main process prints once the data is ready (or None).
        eval_batches: for a streamed ``eval`` (an ``IterableDataset``), the batches each process
            evaluates (a stream has no end every process reaches together).
        feature_cache: what the run read from the feature cache (hits, misses, entries), written
            to ``final/run.json``; None when it reads none (:mod:`fusionzoo.training.features`).
        batches: the recipe's own source of training batches instead of a loader over ``train``
            (several loaders: :class:`~fusionzoo.training.multitask.TaskMixture`), already prepared
            for this process: ``len()`` batches per process per epoch, ``set_epoch(epoch)`` and
            ``skipping(n)`` (an iterator past the first ``n`` batches of the epoch).
        eval_loaders: with ``batches``, what the recipe's ``evaluate`` gets as its loader (None: no
            evaluation).

    ``train`` and ``eval`` may be ``torch.utils.data.IterableDataset`` s that read this
    process's share of a stream themselves (:class:`~fusionzoo.data.streaming.ImageTextStream`):
    the loop then needs ``max_steps``, does not hand their loaders to ``accelerator.prepare``
    (which would read them on one process, or have every process read all of them) and moves
    their batches to the device itself.
    """

    train: Any
    eval: Any | None
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    eval_collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    drop_last: bool = False
    eval_drop_last: bool = False
    note: str | None = None
    eval_batches: int | None = None
    feature_cache: dict[str, Any] | None = None
    batches: Any | None = None
    eval_loaders: Any | None = None


class Recipe:
    """What :func:`run` trains. Subclasses implement the methods that raise here.

    Attributes:
        label: progress-bar and log label (``"train vqa/albef"``, ``"pretrain albef"``).
        tracker_project: the Accelerate tracker's project name.
    """

    label: str = "train"
    tracker_project: str = "fusionzoo"

    def leaves_parameters_unused(self, config: TrainConfig) -> bool:
        """Whether some trainable parameters get no gradient under ``config`` (DDP must then look for them)."""
        return False

    def check(self, config: TrainConfig, accelerator: Any) -> None:
        """Reject a configuration before anything is loaded (unknown names, unsupported launchers)."""

    def build_model(self, config: TrainConfig, accelerator: Any) -> nn.Module:
        raise NotImplementedError

    def prepare_data(self, config: TrainConfig, model: nn.Module, accelerator: Any) -> RecipeData:
        raise NotImplementedError

    def forward(self, model: nn.Module, unwrapped: nn.Module, batch: dict[str, Any],
                context: StepContext) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, unwrapped: nn.Module) -> None:
        """Called on every process after each optimizer step (momentum updates)."""

    def log_extras(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        """Scalars the recipe adds to each training log line (the same on every process)."""
        return {}

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Any, config: TrainConfig) -> dict[str, float]:
        raise NotImplementedError

    def export(self, accelerator: Any, model: nn.Module, directory: Path) -> None:
        """Write the trained model to ``directory`` (called on every process; only the main one writes)."""
        raise NotImplementedError

    def result(self, final_eval: dict[str, Any], train_losses: dict[str, float], step: int) -> dict[str, Any]:
        """What :func:`run` returns."""
        return final_eval


# -- building blocks -------------------------------------------------------------------


def make_accelerator(config: TrainConfig, with_trackers: bool = True, find_unused_parameters: bool = False):
    """An Accelerator for this run (mixed precision, accumulation, seedable sampler, trackers)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None
    if with_trackers and config.log_with not in (None, "none", "no"):
        if config.log_with == "auto":
            try:
                import tensorboard  # noqa: F401

                log_with = "tensorboard"
            except ImportError:
                log_with = None
        else:
            log_with = config.log_with
    # Under torchrun / accelerate launch on a machine without a GPU, Accelerate forms a process
    # group (gloo, MULTI_CPU) only when told to use the CPU; otherwise each process trains alone.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = config.cpu or (launched and not torch.cuda.is_available())
    sharding = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                if os.environ.get(var, "").lower() in ("1", "true", "yes")]
    if sharding and (cpu or not torch.cuda.is_available()):
        # Accelerate forms FSDP and DeepSpeed only over GPUs (and similar devices): on the CPU it would fail
        # at start-up or quietly train with DDP instead. Say so rather than run something else.
        raise ConfigError(f"the Accelerate config asks for {sharding[0]}, which Accelerate runs only on GPUs; "
                          "on the CPU launch without --config_file (DDP over gloo: torchrun --nproc_per_node N "
                          "-m fusionzoo train ...)")
    return Accelerator(
        mixed_precision=resolve_precision(config.mixed_precision,
                                          "cuda" if not cpu and torch.cuda.is_available() else "cpu",
                                          fusion=config.fusion, fusion_kwargs=config.fusion_kwargs),
        cpu=cpu,
        gradient_accumulation_steps=config.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=str(Path(config.output_dir) / "logs")),
        # The shuffling order depends only on (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


class OnDevice:
    """The batches of a loader ``accelerator.prepare`` did not wrap, moved to ``device``."""

    def __init__(self, loader: Any, device: Any) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        from accelerate.utils import send_to_device

        for batch in self.loader:
            yield send_to_device(batch, self.device)


def _rows(samples: list[Any]) -> list[Any]:
    """A loader's collate that keeps a batch as its list of samples (collated after merging)."""
    return samples


class StreamBatches:
    """A stream's batches, made alike for every split of its readers over processes and workers.

    The readers of a stream are this process's DataLoader workers on every process (``P x W``,
    :mod:`fusionzoo.data.streaming`). Each batch of ``batch_size`` rows is ``W`` consecutive
    loader batches of ``batch_size / W`` samples, one from each worker in turn, collated together.
    So, at every step, the global batch (every process's batch in process order) is the same
    slice of every reader's samples in reader order, whether the readers are workers or
    processes: 1 process with 2 workers at batch 8 trains on what 2 processes with one reader
    each (``num_workers`` 0 or 1) at batch 4 do.

    Args:
        batches: yield at most this many batches (None: as many as the stream gives).

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the workers.
    """

    def __init__(self, stream: Any, batch_size: int, collate: Callable[[list[dict[str, Any]]], Any], *,
                 num_workers: int, generator: torch.Generator | None = None, key: str = "batch_size",
                 batches: int | None = None) -> None:
        self.workers = max(1, num_workers)
        if batch_size % self.workers:
            raise ConfigError(f"key {key!r}: streamed data gives each of a process's num_workers={num_workers} "
                              f"workers an equal share of its batch; {batch_size} is not a multiple of "
                              f"{self.workers} (use a batch size divisible by num_workers)")
        self.batch_size, self.collate, self.batches = batch_size, collate, batches
        self.loader = DataLoader(stream, batch_size=batch_size // self.workers, collate_fn=_rows,
                                 num_workers=num_workers, drop_last=True, generator=generator)

    def __iter__(self):
        return self.skipping(0)

    def skipping(self, skip: int):
        """The batches after the first ``skip``, which are read (the stream has no index) and dropped."""
        parts: list[Any] = []
        made = 0
        for part in self.loader:
            parts.extend(part)
            if len(parts) < self.batch_size:
                continue
            rows, parts = parts, []
            made += 1
            if made > skip:
                yield self.collate(rows)
            if self.batches is not None and made >= self.batches:
                return


def param_checksum(model: nn.Module) -> float:
    """A float64 fingerprint of all parameters (sum of each tensor weighted by its index)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        total += (i + 1) * p.detach().double().sum().item()
    return total


def evaluate_model(recipe: Recipe, model: nn.Module, loader: DataLoader, accelerator: Any,
                   config: TrainConfig) -> dict[str, float]:
    """``recipe.evaluate`` in eval mode; the model's mode is restored afterwards."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    model.eval()
    try:
        return recipe.evaluate(model, loader, accelerator, config)
    finally:
        if was_training:
            model.train()


class _Running:
    """Sums of logged values weighted by samples, reduced over processes when a log line is written.

    Each value counts its own samples: a value logged by some steps only (one task's loss in a
    multi-task run) is the mean over the samples of those steps.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor], samples: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float().item() * samples
            self.counts[name] = self.counts.get(name, 0) + samples

    def means(self, accelerator: Any) -> dict[str, float]:
        """Mean of each value over every process's samples since the last call."""
        names = sorted(self.sums)  # the same names on every process
        local = torch.tensor([self.sums[k] for k in names] + [float(self.counts[k]) for k in names],
                             dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
        sums, counts = total[:len(names)].tolist(), total[len(names):].tolist()
        self.sums, self.counts = {}, {}
        return {name: value / max(count, 1.0) for name, value, count in zip(names, sums, counts)}


def _record_eval(metrics: dict[str, Any], accelerator: Any, step: int, epoch: int, out_dir: Path,
                 run_id: str) -> dict[str, Any]:
    record = {"step": step, "epoch": epoch, **metrics}
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        path = out_dir / "metrics.json"
        history = json.loads(path.read_text())["history"] if path.is_file() else []
        history.append({**record, "run_id": run_id})
        write_json_atomic(path, {"latest": record, "history": history, "git_commit": run_metadata({})["git_commit"]})
        accelerator.print(f"eval step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return record


class StopRequests:
    """SIGINT and SIGTERM (Ctrl-C, a cluster's preemption) ask training to stop after the current step.

    The first signal is noted (:attr:`signal`) and the loop finishes its step, saves a
    checkpoint and stops; a second one stops at once (``KeyboardInterrupt``).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopRequests":
        for name in self.SIGNALS:
            number = getattr(signal, name)
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                pass
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None:
            self.uninstall()
            raise KeyboardInterrupt(f"second {signal.Signals(number).name}: stopping without a checkpoint")
        self.signal = signal.Signals(number).name
        logger.warning("%s: finishing the current step, then saving a checkpoint", self.signal)


def claim_output_dir(config: TrainConfig, accelerator: Any) -> tuple[Path | None, dict[str, Any] | None, str]:
    """The checkpoint to resume from and its progress (or None, None) and this run's id.

    Refuses to mix two runs in one folder.

    An ``output_dir`` that holds another run's checkpoints or ``final/`` is used only with
    ``resume=`` (continue it) or ``overwrite=true`` (its checkpoints, ``final/``, logs and
    metrics are removed first); otherwise nothing there is touched.
    """
    import shutil
    import uuid

    from accelerate.utils import broadcast_object_list

    out_dir = Path(config.output_dir)
    manager = CheckpointManager(out_dir, config.keep_last)
    resume_from = manager.resolve_resume(config.resume)
    if config.resume == "auto":
        accelerator.print(f"resume=auto: continuing from {resume_from}" if resume_from is not None else
                          f"resume=auto: no checkpoint in {manager.root}, starting fresh")
    earlier = manager.checkpoints()
    final = out_dir / "final"
    if resume_from is None and (earlier or final.exists()):
        found = ", ".join([p.name for p in earlier[-3:]] + (["final/"] if final.exists() else []))
        if not config.overwrite:
            raise OutputDirError(f"output_dir={out_dir} holds another run ({found}); pass resume=auto to continue "
                                 "it, overwrite=true to replace it, or another output_dir")
        if accelerator.is_main_process:
            for path in (manager.root, final):
                shutil.rmtree(path, ignore_errors=True)
            for name in ("train_log.jsonl", "metrics.json"):
                (out_dir / name).unlink(missing_ok=True)
            accelerator.print(f"overwrite=true: removed the earlier run in {out_dir} ({found})")
        accelerator.wait_for_everyone()
    progress = CheckpointManager.read_progress(resume_from) if resume_from is not None else None
    ids = [(progress or {}).get("run_id") or uuid.uuid4().hex[:12]]
    if accelerator.num_processes > 1:
        broadcast_object_list(ids)  # one id for every process
    return resume_from, progress, ids[0]


# -- the loop --------------------------------------------------------------------------


def run(recipe: Recipe, config: TrainConfig, *, end_process_group: bool = True) -> dict[str, Any]:
    """Train ``recipe`` as ``config`` says, on however many processes were launched; export to ``final/``.

    ``end_process_group=False`` keeps the process group of a multi-process launch for a
    further run in the same processes (several runs from one script).
    """
    from tqdm.auto import tqdm

    accelerator = make_accelerator(config, find_unused_parameters=recipe.leaves_parameters_unused(config))
    recipe.check(config, accelerator)
    out_dir = Path(config.output_dir)
    resume_from, progress, run_id = claim_output_dir(config, accelerator)  # before any data is loaded
    seed_everything(config.seed)
    meta = run_metadata(config.to_dict())
    processes = ProcessView.from_accelerator(accelerator)

    model = recipe.build_model(config, accelerator)
    data = recipe.prepare_data(config, model, accelerator)
    if data.note:
        accelerator.print(data.note)

    own = data.batches is not None  # the recipe's own batches (several tasks' loaders), prepared by it
    streamed = not own and isinstance(data.train, IterableDataset)  # reads its own share of a stream, without end
    if streamed and config.max_steps is None:
        raise ConfigError(f"key 'max_steps': data={config.data!r} is streamed and has no length, so epochs "
                          "cannot be counted; set max_steps=<optimizer steps>")
    # The loader draws its workers' base seed from its own generator, never from the global RNG
    # (which a resumed run restores before making its loader: one draw would shift every dropout mask).
    generator = torch.Generator().manual_seed(config.seed)
    if own:
        train_loader = data.batches
    elif streamed:  # every process's share, split over its workers the same way (a stream has full batches)
        train_loader = StreamBatches(data.train, config.batch_size, data.collate, num_workers=config.num_workers,
                                     generator=generator)
    else:
        train_loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, collate_fn=data.collate,
                                  num_workers=config.num_workers, generator=generator, drop_last=data.drop_last)
    eval_loader = None
    if own:
        eval_loader = data.eval_loaders
    elif isinstance(data.eval, IterableDataset):
        eval_loader = OnDevice(StreamBatches(data.eval, config.effective_eval_batch_size, data.eval_collate,
                                             num_workers=config.num_workers, key="eval_batch_size",
                                             batches=data.eval_batches), accelerator.device)
    elif data.eval is not None:
        eval_loader = DataLoader(data.eval, batch_size=config.effective_eval_batch_size, shuffle=False,
                                 collate_fn=data.eval_collate, num_workers=config.num_workers,
                                 drop_last=data.eval_drop_last)

    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.encoder_lr)
    if streamed:  # the whole run is one "epoch" (a stream repeats its passes itself)
        plan = plan_steps(config.max_steps, epochs=1, warmup_ratio=config.warmup_ratio, max_steps=config.max_steps)
    else:
        # Batches per process per epoch: prepare() shards the loader over processes (the recipe's own are sharded).
        if own:
            batches_per_epoch = len(train_loader)
        elif data.drop_last:
            batches_per_epoch = len(train_loader) // accelerator.num_processes
        else:
            batches_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
        plan = plan_steps(batches_per_epoch, epochs=config.epochs, warmup_ratio=config.warmup_ratio,
                          grad_accum=config.grad_accum, max_steps=config.max_steps)
    steps_per_epoch, total_steps = plan.per_epoch, plan.total
    rates = LearningRates(optimizer, plan)  # base rates read before prepare() wraps the optimizer

    if streamed or own:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if isinstance(eval_loader, DataLoader):
        eval_loader = accelerator.prepare(eval_loader)
    unwrapped = accelerator.unwrap_model(model)
    compiled = CompiledModules(unwrapped, config.compile)  # in place: the same state_dict, checkpoints

    manager = CheckpointManager(out_dir, config.keep_last, run_id)
    step, epoch, batches_done = 0, 0, 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step, epoch, batches_done = progress["step"], progress["epoch"], progress["batches_in_epoch"]
        accelerator.print(f"resumed from {resume_from} at step {step} (epoch {epoch}, batch {batches_done})")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "run.json", {**meta, "run_id": run_id})
        event = {"event": "resume" if resume_from is not None else "start", "step": step, "run_id": run_id,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "num_processes": accelerator.num_processes,
                 **({"from": str(resume_from)} if resume_from is not None else {})}
        with open(out_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
    if accelerator.trackers or config.log_with not in (None, "none", "no"):
        try:
            accelerator.init_trackers(recipe.tracker_project, config={
                k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})
        except Exception as exc:  # a tracker that cannot start must not stop training
            logger.warning("could not start trackers: %s", exc)

    def save(step_: int, epoch_: int, batches_: int) -> Path:
        return manager.save(accelerator, step_, {"step": step_, "epoch": epoch_, "batches_in_epoch": batches_,
                                                 "total_steps": total_steps, **meta})

    def evaluate_and_record(step_: int, epoch_: int) -> dict[str, Any]:
        with compiled.paused():
            metrics = evaluate_model(recipe, model, eval_loader, accelerator, config)
        return _record_eval(metrics, accelerator, step_, epoch_, out_dir, run_id)

    def take_step(batch: Any, context: StepContext) -> StepOutput:  # forward, finite check, backward, update
        with accelerator.autocast():
            out = recipe.forward(model, unwrapped, batch, context)
        if not processes.all_finite(out.loss):  # decided together: saving is a collective call
            path = save(step, epoch, batches_done)  # parameters are still the last good step's
            check_finite(out.loss, out.losses, finite=False, saved=str(path),
                         where=f"at step {step} (epoch {epoch}, batch {batches_done}; process "
                               f"{accelerator.process_index} of {accelerator.num_processes})",
                         advice="Try a lower lr, max_grad_norm, or mixed_precision=no.")
        optimizer_step(accelerator, model, optimizer, out.loss, config.max_grad_norm)
        return out

    bar = tqdm(total=total_steps, initial=step, desc=recipe.label, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    model.train()
    samples_seen, t0 = 0, time.perf_counter()
    running = _Running()
    last_logs: dict[str, float] = {}
    micro = 0
    lr = rates.set(step)
    saved: tuple[int, Path] | None = None  # the step and folder of the last checkpoint this run wrote
    done = step >= total_steps
    stops = StopRequests().install()
    try:
        while not done:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            # A resumed stream re-reads (and drops) the batches done: it gives the same batches in the same order.
            if own:
                loader = train_loader.skipping(batches_done)
            elif streamed:
                loader = OnDevice(train_loader.skipping(batches_done), accelerator.device)
            else:
                loader = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
            for batch in loader:
                context = StepContext(step, micro, epoch, steps_per_epoch, processes)
                with accelerator.accumulate(model):  # the first step compiles (eager where that fails)
                    out = compiled.step(functools.partial(take_step, batch, context))
                batches_done += 1
                micro += 1
                samples_seen += out.num_samples * accelerator.num_processes
                running.add({"loss": out.loss, **out.losses, **out.metrics}, out.num_samples)
                if not accelerator.sync_gradients:
                    continue
                recipe.after_optimizer_step(unwrapped)
                micro = 0
                step += 1
                bar.update(1)
                if step % config.log_every == 0 or step == total_steps:
                    logs = {f"train/{k}": v for k, v in running.means(accelerator).items()}
                    logs["train/lr"] = lr  # the rate this step used
                    logs.update({f"train/{k}": v for k, v in recipe.log_extras(step - 1, steps_per_epoch).items()})
                    seconds = time.perf_counter() - t0 - compiled.compile_seconds  # compiling left out
                    logs["train/samples_per_second"] = samples_seen / max(1e-9, seconds)
                    last_logs = logs
                    accelerator.log(logs, step=step)
                    if accelerator.is_main_process:
                        with open(out_dir / "train_log.jsonl", "a") as f:
                            f.write(json.dumps({"step": step, **logs}) + "\n")
                    shown = {k.removeprefix("train/"): f"{v:.4f}" for k, v in logs.items()
                             if k.removeprefix("train/") in ("loss", *out.losses)}
                    bar.set_postfix(shown | {"sps": f"{logs['train/samples_per_second']:.1f}"})
                lr = rates.set(step)
                if config.save_every and step % config.save_every == 0 and step < total_steps:
                    saved = (step, save(step, epoch, batches_done))
                if step < total_steps and processes.any(stops.signal is not None):  # decided together
                    path = saved[1] if saved and saved[0] == step else save(step, epoch, batches_done)
                    raise TrainingInterrupted(
                        f"interrupted at step {step} of {total_steps} ({stops.signal or 'a signal to another process'});"
                        f" checkpoint saved to {path}; continue with resume=auto (output_dir={out_dir})")
                if config.eval_every and eval_loader is not None and step % config.eval_every == 0 and step < total_steps:
                    evaluate_and_record(step, epoch)
                if step >= total_steps:
                    done = True
                    break
            else:
                epoch += 1
                batches_done = 0
                if not config.save_every and not done:
                    saved = (step, save(step, epoch, 0))
                if not config.eval_every and eval_loader is not None and not done:
                    evaluate_and_record(step, epoch)
    finally:
        bar.close()
        stops.uninstall()
        compiled.release()  # evaluation, export and whatever comes after run eager

    save(step, epoch, batches_done)
    final_eval: dict[str, Any] = {}
    if eval_loader is not None:
        final_eval = evaluate_and_record(step, epoch)
    accelerator.wait_for_everyone()
    from accelerate.utils import DistributedType

    checksums: list[float] = []
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Every process must end with the same weights (sharded parameters have no full copy to compare).
        checksum = torch.tensor([param_checksum(unwrapped)], dtype=torch.float64, device=accelerator.device)
        checksums = accelerator.gather(checksum).tolist()
        if len(set(checksums)) != 1:
            raise RuntimeError(f"processes ended with different weights (checksums {checksums})")
    recipe.export(accelerator, model, out_dir / "final")
    train_losses = {k.removeprefix("train/"): v for k, v in last_logs.items()}
    if accelerator.is_main_process:
        write_json_atomic(out_dir / "final" / "run.json", {
            **meta, "metrics": final_eval, "train": train_losses, "step": step,
            "num_processes": accelerator.num_processes, "param_checksums": checksums,
            **({"compile": compiled.summary()} if config.compile else {}),
            **({"feature_cache": data.feature_cache} if data.feature_cache is not None else {}),
        })
        if (out_dir / "final" / "config.json").is_file():  # a fine-tuned model: its card gets the metrics
            write_model_card(out_dir / "final")
    accelerator.wait_for_everyone()
    if end_process_group:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return recipe.result(final_eval, train_losses, step)
