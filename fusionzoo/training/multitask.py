"""Several tasks in one model: ``fusionzoo train task=vqa+captioning``.

One encoder pair and one fusion, one head per task (:class:`~fusionzoo.multitask.MultiTaskModel`).
Each task keeps everything the fine-tuning recipe does for it alone -- its data, rows,
collate, feature cache, loss, evaluation -- through one :class:`~fusionzoo.training.trainer.FinetuneRecipe`
per task; this recipe decides which task each batch comes from and trains the shared model
on that task's loss through the one training step of :func:`~fusionzoo.training.loop.run`.

* **Data.** ``data=vqa-jsonl+karpathy-captions`` names one dataset per task (in the order of
  ``task``; one name is every task's); ``data_dir`` and the other data keys are shared unless
  ``task_data.<task>`` gives that task its own (:data:`TASK_DATA_KEYS`).
* **Which task a batch comes from** (``task_weights``): ``proportional`` takes every batch of
  every task once per epoch in an order shuffled by (seed, epoch), so each task is sampled in
  proportion to its size; ``vqa:1,captioning:3`` draws each batch's task with those weights
  (an epoch is as many batches as the tasks have together; a task's loader starts again when
  it runs out). The order depends only on the seed and the epoch, so every process takes the
  same task at the same step (their gradients are of one loss) and a resumed run continues
  the same sequence.
* **Logged losses** are per task (``train/vqa``, ``train/captioning``, each the mean over the
  samples of that task's steps); evaluation reports every task's metrics as ``<task>/<metric>``.
* **Saved** as a multi-task folder: ``final/<task>/`` is each task's complete model and
  ``final/multitask.json`` lists them (:func:`~fusionzoo.multitask.save_multitask`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import FusionZooError
from .config import ConfigError, TrainConfig, apply
from .loop import Recipe, RecipeData, StepContext, StepOutput
from .step import seed_everything
from .trainer import FinetuneRecipe, freeze_one, head_options, load_matching_weights, train_output_ids

#: The keys ``task_data.<task>`` may set for one task.
TASK_DATA_KEYS = ("data", "data_dir", "data_files", "data_kwargs", "split", "eval_split", "max_train_samples",
                  "max_eval_samples", "head_kwargs")
#: Epoch numbers of a task loader's later passes within one epoch (weighted sampling) are offset by this.
PASS_STRIDE = 1_000_003


def task_names(config: TrainConfig) -> list[str]:
    """The tasks of ``config.task`` (``vqa+captioning``); a ConfigError naming the key otherwise."""
    from fusionzoo.multitask import split_tasks
    from fusionzoo.registry import RegistryError

    try:
        return split_tasks(config.task)
    except (ValueError, RegistryError) as exc:
        raise ConfigError(f"key 'task': {exc}") from exc


def parse_task_weights(value: str, tasks: list[str]) -> dict[str, float] | None:
    """``task_weights``: None for ``proportional``, else every task's weight (``vqa:1,captioning:3``)."""
    if value.strip() == "proportional":
        return None
    weights: dict[str, float] = {}
    for item in value.split(","):
        name, sep, number = item.partition(":")
        name = name.strip()
        try:
            weight = float(number) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if name not in tasks or not weight > 0 or name in weights:
            raise ConfigError(f"key 'task_weights': expected 'proportional' or '<task>:<weight>,...' with each of "
                              f"{', '.join(tasks)} once and weights > 0 (vqa:1,captioning:3), got {value!r} "
                              f"(at {item.strip()!r})")
        weights[name] = weight
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise ConfigError(f"key 'task_weights': {value!r} gives no weight to {', '.join(missing)}; give every task one")
    return weights


def task_configs(config: TrainConfig) -> dict[str, TrainConfig]:
    """Each task's own run config: ``task`` that task, its dataset from ``data`` (``a+b``), the shared keys,
    then ``task_data.<task>`` over them. ``head_kwargs`` given for the run go to every head, and a task's
    ``task_data.<task>.head_kwargs`` are merged over them."""
    tasks = task_names(config)
    datasets = [d.strip() for d in config.data.split("+")]
    if len(datasets) not in (1, len(tasks)):
        raise ConfigError(f"key 'data': {config.data!r} names {len(datasets)} datasets for the {len(tasks)} tasks "
                          f"{'+'.join(tasks)}; give one dataset, or one per task joined by '+' in the same order")
    if len(datasets) == 1:
        datasets = datasets * len(tasks)
    extra = sorted(set(config.task_data) - set(tasks))
    if extra:
        raise ConfigError(f"key 'task_data.{extra[0]}': {extra[0]!r} is not one of the tasks {', '.join(tasks)}")
    out = {}
    for name, dataset in zip(tasks, datasets):
        own = config.task_data.get(name) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"key 'task_data.{name}': expected a mapping of {', '.join(TASK_DATA_KEYS)}, "
                              f"got {own!r}")
        unknown = sorted(set(own) - set(TASK_DATA_KEYS))
        if unknown:
            raise ConfigError(f"key 'task_data.{name}.{unknown[0]}': not a per-task key; "
                              f"task_data.{name} takes {', '.join(TASK_DATA_KEYS)}")
        sub = dataclasses.replace(config, task=name, data=dataset, task_data={}, task_weights="proportional")
        updates = dict(own)
        if "head_kwargs" in updates:
            updates["head_kwargs"] = {**config.head_kwargs, **dict(updates["head_kwargs"] or {})}
        out[name] = apply(sub, updates, f"key 'task_data.{name}'")
    return out


class TaskMixture:
    """Training batches of several tasks, one task a batch, in an order fixed by (seed, epoch).

    Args:
        loaders: task -> its training loader, prepared (this process's share; batches on the device).
        weights: task -> weight for weighted sampling; None: proportional (every batch of every task once).
        seed: the run's seed.
        skip: ``accelerator.skip_first_batches``, to start a loader past the batches a resumed run did.
    Yields ``(task, batch)``.
    """

    def __init__(self, loaders: dict[str, Any], weights: dict[str, float] | None, seed: int,
                 skip: Any) -> None:
        self.loaders, self.weights, self.seed, self._skip = loaders, weights, seed, skip
        self.tasks = list(loaders)
        self.counts = {name: len(loader) for name, loader in loaders.items()}
        empty = [name for name, count in self.counts.items() if count == 0]
        if empty:
            raise ConfigError(f"key 'task': task {empty[0]!r} has no training batch on this process "
                              "(too few rows for batch_size and the number of processes)")
        self.epoch = 0

    def __len__(self) -> int:
        return sum(self.counts.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def schedule(self, epoch: int) -> list[str]:
        """The task of each batch of ``epoch``: the same on every process and in every run with this seed."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        if self.weights is None:
            slots = [name for name in self.tasks for _ in range(self.counts[name])]
            return [slots[i] for i in torch.randperm(len(slots), generator=generator).tolist()]
        probabilities = torch.tensor([self.weights[name] for name in self.tasks], dtype=torch.float64)
        drawn = torch.multinomial(probabilities, len(self), replacement=True, generator=generator)
        return [self.tasks[i] for i in drawn.tolist()]

    def _start(self, name: str, done: int) -> Iterator[Any]:
        """Task ``name``'s batches after the first ``done`` of this epoch (a later pass once one runs out)."""
        count = self.counts[name]
        passes, skip = divmod(done, count)
        while True:
            loader = self.loaders[name]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch + PASS_STRIDE * passes)
            yield from (self._skip(loader, skip) if skip else loader)
            passes, skip = passes + 1, 0

    def skipping(self, done: int) -> Iterator[tuple[str, Any]]:
        """This epoch's ``(task, batch)`` pairs after the first ``done`` (a resumed run)."""
        order = self.schedule(self.epoch)
        before = Counter(order[:done])
        running: dict[str, Iterator[Any]] = {}
        for name in order[done:]:
            if name not in running:
                running[name] = self._start(name, before[name])
            yield name, next(running[name])

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self.skipping(0)


class MultiTaskRecipe(Recipe):
    """Train one :class:`~fusionzoo.multitask.MultiTaskModel` on several tasks (``task=vqa+captioning``)."""

    def leaves_parameters_unused(self, config: TrainConfig) -> bool:
        return True  # a step of one task leaves the other tasks' heads without a gradient

    def check(self, config: TrainConfig, accelerator: Any) -> None:
        from accelerate.utils import DistributedType

        self.tasks = task_names(config)
        for key, value, allowed in (("peft", config.peft, "none"), ("compile", config.compile, False)):
            if value not in (allowed, None):
                raise ConfigError(f"key '{key}': {key}={value} is not supported with several tasks "
                                  f"(task={config.task}); train them without it")
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(f"task={config.task}: several tasks train with DDP or one process, not "
                              f"{accelerator.distributed_type.value}")
        self.weights = parse_task_weights(config.task_weights, self.tasks)
        self.configs = task_configs(config)
        self.parts: dict[str, FinetuneRecipe] = {}
        for name, sub in self.configs.items():
            part = FinetuneRecipe()
            part.check(sub, accelerator)
            if part.task.recipe != "finetune":
                raise ConfigError(f"key 'task': task {name!r} trains with the {part.task.recipe!r} recipe; several "
                                  "tasks combine tasks trained by fine-tuning (a head on the fusion)")
            self.parts[name] = part
        self.config = config
        self.label = f"train {config.task}/{config.fusion}"

    def build_model(self, config: TrainConfig, accelerator: Any) -> nn.Module:
        from fusionzoo.multitask import create_multitask_model

        with accelerator.main_process_first():
            for name, part in self.parts.items():
                part.data = part.task.load_data(self.configs[name])
                part.config = self.configs[name]
        seed_everything(config.seed)  # the model's init does not depend on how much randomness loading used
        vocabularies, heads, from_train = {}, {}, []
        for name, part in self.parts.items():
            vocab_kwargs, heads[name], wants_ids = head_options(part.config, part.task, part.data)
            if part.task.vocabulary_key:
                vocabularies[name] = vocab_kwargs[part.task.vocabulary_key]
            if wants_ids:
                from_train.append(name)
        try:
            model = create_multitask_model(self.tasks, config.fusion, config.vision, config.text,
                                           freeze_encoders=config.freeze_encoders is True,
                                           vocabularies=vocabularies,
                                           fusion_kwargs=dict(config.fusion_kwargs), head_kwargs=heads,
                                           max_text_len=config.max_text_len)
            freeze_one(model, config)
            for name in from_train:
                model.set_output_ids(name, train_output_ids(self.configs[name], model.text, self.parts[name].data))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, FusionZooError):
                raise
            raise ConfigError(f"cannot build {config.task}/{config.fusion}: {type(exc).__name__}: {exc}") from exc
        if config.init_from:  # the shared parts (and heads saved under the same names) of a saved model
            load_matching_weights(model, config.init_from, verbose=True)
        return model

    def prepare_data(self, config: TrainConfig, model: nn.Module, accelerator: Any) -> RecipeData:
        train_loaders: dict[str, Any] = {}
        eval_loaders: dict[str, Any] = {}
        notes, caches = [], {}
        for name, part in self.parts.items():
            data = part.prepare_data(part.config, model.model(name), accelerator)
            generator = torch.Generator().manual_seed(config.seed)  # as the loop's own loader
            train_loaders[name] = accelerator.prepare(DataLoader(
                data.train, batch_size=config.batch_size, shuffle=True, collate_fn=data.collate,
                num_workers=config.num_workers, generator=generator, drop_last=data.drop_last))
            if data.eval is not None:
                eval_loaders[name] = accelerator.prepare(DataLoader(
                    data.eval, batch_size=config.effective_eval_batch_size, shuffle=False,
                    collate_fn=data.eval_collate, num_workers=config.num_workers, drop_last=data.eval_drop_last))
            if data.note:
                notes.append(f"{name}: {data.note}")
            if data.feature_cache is not None:
                caches[name] = data.feature_cache
        mixture = TaskMixture(train_loaders, self.weights, config.seed, accelerator.skip_first_batches)
        rule = "proportional" if self.weights is None else f"weights {config.task_weights}"
        notes.append(f"tasks {', '.join(f'{n} {c} batches' for n, c in mixture.counts.items())} per epoch and process; "
                     f"each batch's task: {rule}")
        return RecipeData(train=None, eval=None, collate=None, eval_collate=None, note="\n".join(notes),
                          feature_cache=caches or None, batches=mixture, eval_loaders=eval_loaders or None)

    def forward(self, model: nn.Module, unwrapped: nn.Module, batch: tuple[str, Any],
                context: StepContext) -> StepOutput:
        name, rows = batch
        out = self.parts[name].forward(functools.partial(model, name), unwrapped.model(name), rows, context)
        return StepOutput(loss=out.loss, losses={name: out.loss}, num_samples=out.num_samples, metrics=out.metrics)

    def evaluate(self, model: nn.Module, loader: dict[str, Any], accelerator: Any,
                 config: TrainConfig) -> dict[str, float]:
        unwrapped = accelerator.unwrap_model(model)
        metrics: dict[str, float] = {}
        for name, task_loader in loader.items():
            part = self.parts[name]
            scores = part.evaluate(unwrapped.model(name), task_loader, accelerator, part.config)
            metrics.update({f"{name}/{key}": value for key, value in scores.items()})
        return metrics

    def export(self, accelerator: Any, model: nn.Module, directory: Path) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(directory)


# -- fusionzoo eval of a multi-task run --------------------------------------------------------


def multitask_folder(run: str | Path) -> Path | None:
    """The multi-task model folder of ``run`` (the folder itself, or a run's ``final/``), or None."""
    from fusionzoo.model_folder import MULTITASK_NAME

    for folder in (Path(run), Path(run) / "final"):
        if (folder / MULTITASK_NAME).is_file():
            return folder
    return None


def sub_config(config: TrainConfig, model_dir: str | Path) -> TrainConfig:
    """A multi-task run's config made that of the task saved in ``model_dir`` (``final/<task>``);
    ``config`` itself when it is a one-task run's or the folder is not one of its tasks."""
    import json

    if "+" not in config.task or not (Path(model_dir) / "config.json").is_file():
        return config
    task = json.loads((Path(model_dir) / "config.json").read_text()).get("task")
    configs = task_configs(config)
    return configs.get(task, config)


def evaluate_multitask(run: str | Path, config: TrainConfig) -> dict[str, Any]:
    """``fusionzoo eval`` of a multi-task run: every task's model scored on its own data, as ``<task>/<metric>``.

    ``config`` is the run's (from its run.json) with the command line's keys over it; each task
    is evaluated with its :func:`task_configs` entry.
    """
    from fusionzoo.multitask import read_multitask

    from .trainer import evaluate_checkpoint

    folder = multitask_folder(run)
    if folder is None:
        raise ConfigError(f"{run} holds no multi-task model (multitask.json)")
    tasks = read_multitask(folder)
    for key in ("results", "references"):
        if getattr(config, key):
            raise ConfigError(f"key '{key}': a multi-task run has one results file per task; evaluate one task's "
                              f"folder ({folder / tasks[0]}) with {key}=...")
    if "+" not in config.task or task_names(config) != tasks:  # no run.json beside the folder
        config = dataclasses.replace(config, task="+".join(tasks))
    metrics: dict[str, Any] = {}
    for name, sub in task_configs(config).items():
        scores = evaluate_checkpoint(folder / name, sub)
        metrics.update({f"{name}/{key}": value for key, value in scores.items()})
    return metrics
