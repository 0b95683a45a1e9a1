"""Fine-tuning and evaluation: the recipe that :func:`~fusionzoo.training.loop.run` trains for ``fusionzoo train``.

What differs between tasks (the output vocabulary, the rows trained on, the
collate, the metrics, inference) is asked of the task object
(:func:`fusionzoo.tasks.get_task`), so a task registered from user code trains
and evaluates here exactly like a built-in one. Run it with ``fusionzoo train``
(one process) or under ``accelerate launch`` / ``torchrun`` (several).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError, FusionZooError
from ..hub import resolve_model_folder
from ..init_weights import load_matching_weights
from ..data.common import SkipBadImages
from .config import ConfigError, TrainConfig
from .features import FrozenFeatures
from .modality_dropout import EmptyText, drop_modalities, modality_drops
from .step import seed_everything
from .loop import (
    NonFiniteLossError,
    Recipe,
    RecipeData,
    StepContext,
    StepOutput,
    evaluate_model,
    make_accelerator,
    run,
)

logger = logging.getLogger(__name__)

__all__ = ["FinetuneRecipe", "NonFiniteLossError", "evaluate_checkpoint", "load_matching_weights", "train"]


def limit_rows(dataset: Any, n: int | None, seed: int) -> Any:
    """A seeded random subset of ``n`` rows (the whole dataset when ``n`` is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def eval_split_of(config: TrainConfig, data: Any, training: bool) -> str | None:
    """The split to evaluate: ``eval_split`` (training) or ``split`` (``fusionzoo eval``), else val/validation/test."""
    split = config.eval_split if training else config.split
    if split is None:
        split = next((s for s in ("val", "validation", "test") if s in data), None)
    return split


def refuse_streamed(data: Any, config: TrainConfig) -> None:
    """A ConfigError for streamed data in a recipe that needs a dataset's length and random access."""
    if getattr(data, "iterable", False):
        raise ConfigError(f"task={config.task} trains and evaluates on map-style data (whole splits); "
                          f"data={config.data!r} is streamed. Stream it into `fusionzoo pretrain`, or load it "
                          "map-style (data=webdataset data_kwargs.streaming=false indexes plain .tar shards; "
                          "image-text-jsonl; hf-datasets without data_kwargs.streaming=true)")


def check_names(config: TrainConfig) -> None:
    """Task, fusion, dataset and encoder names exist (checked before any data is loaded)."""
    from fusionzoo.encoders.vision import check_vision_name
    from fusionzoo.registry import DATASETS, FUSIONS
    from fusionzoo.tasks import get_task

    get_task(config.task)
    FUSIONS.get(config.fusion)
    check_vision_name(config.vision)
    if config.data not in DATASETS and not Path(config.data).exists():
        DATASETS.get(config.data)  # raises, listing the registered datasets and the closest names


class FinetuneRecipe(Recipe):
    """Train a :class:`~fusionzoo.model.FusionModel` for ``config.task`` with ``config.fusion``."""

    def check(self, config: TrainConfig, accelerator: Any) -> None:
        from fusionzoo.tasks import get_task

        check_names(config)
        self.task = get_task(config.task)
        self.label = f"train {config.task}/{config.fusion}"
        if config.modality_dropout > 0 and self.task.generates_text:
            raise ConfigError(f"key 'modality_dropout': task={config.task} reads its text as the target, so it has "
                              "no question to drop; modality_dropout is for VQA and classification")
        self.empty_text: EmptyText | None = None  # modality_dropout: the empty question, made at the first step

    def build_model(self, config: TrainConfig, accelerator: Any) -> nn.Module:
        with accelerator.main_process_first():
            self.data = self.task.load_data(config)
        seed_everything(config.seed)  # the model's init does not depend on how much randomness data loading used
        self.config = config
        return _build_model(config, self.task, self.data, init=True)

    def prepare_data(self, config: TrainConfig, model: nn.Module, accelerator: Any) -> RecipeData:
        refuse_streamed(self.data, config)
        # Frozen encoders: rows without pixels, their image tokens and text states read from the feature cache.
        features = FrozenFeatures.for_run(config, model, accelerator, self.data, self.task)
        data = self.data if features is not None else self.data.with_image_transform(
            model.vision.transform(train=False), skip_bad=config.skip_bad)
        train = limit_rows(self.task.train_rows(data, config.train_split), config.max_train_samples, config.seed)
        self.eval_split = eval_split_of(config, data, training=True)
        evaluation = None
        if self.eval_split is not None and config.max_eval_samples != 0:
            evaluation = limit_rows(self.task.eval_rows(data, self.eval_split), config.max_eval_samples, config.seed)
        collate = self.task.collate(data, model.text.tokenize, config.max_text_len)
        if features is not None:
            train, train_collate = features.wrap(train, collate, config.train_split)
            eval_collate = collate
            if evaluation is not None:
                evaluation, eval_collate = features.wrap(evaluation, collate, self.eval_split)
            return RecipeData(train=train, eval=evaluation, collate=train_collate, eval_collate=eval_collate,
                              note=features.note(), feature_cache=features.stats())
        train_collate, eval_collate = collate, collate
        if config.skip_bad:
            train_collate, eval_collate = SkipBadImages(collate, training=True), SkipBadImages(collate, training=False)
        return RecipeData(train=train, eval=evaluation, collate=train_collate, eval_collate=eval_collate)

    def forward(self, model: nn.Module, unwrapped: nn.Module, batch: dict[str, Any],
                context: StepContext) -> StepOutput:
        from fusionzoo.data.common import model_inputs

        inputs = model_inputs(batch)
        if self.config.modality_dropout > 0:  # per sample, seeded by its row in the global batch
            rows = len(batch["input_ids"])
            if self.empty_text is None:
                self.empty_text = EmptyText.of(unwrapped.text, with_states=inputs.get("text_states") is not None)
            drops = modality_drops(self.config.seed, context.step, context.micro, context.processes.index * rows,
                                   rows, self.config.modality_dropout)
            inputs = drop_modalities(inputs, drops, self.empty_text)
        out = model(**inputs)
        return StepOutput(loss=out.loss, losses=out.losses, num_samples=len(batch["input_ids"]))

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Any, config: TrainConfig) -> dict[str, float]:
        from fusionzoo.tasks.base import TRAINING_EVAL_OPTIONS

        options = self.task.eval_options(config)
        # evaluations during training write no results files and log scalars only
        options.update({key: value for key, value in TRAINING_EVAL_OPTIONS.items() if key in options})
        return self.task.evaluate(model, loader, accelerator, self.data, self.eval_split, **options)

    def export(self, accelerator: Any, model: nn.Module, directory: Path) -> None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Parameters are sharded across ranks: gather the full state dict (a collective call),
            # load it into a fresh unsharded copy on the main process and export that.
            state = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                plain = dataclasses.replace(self.config, init_from=None)
                export = _build_model(plain, self.task, self.data, init=False)
                export.load_state_dict(state)
                export.save_pretrained(directory, merge_lora=self.config.lora_merge)
        elif accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(directory, merge_lora=self.config.lora_merge)


#: ``head_kwargs.output_ids`` value that gives a text-generating head the tokens of the training captions.
OUTPUT_IDS_FROM_TRAIN = "train"


def caption_token_ids(text: Any, captions: Sequence[str], max_length: int, chunk: int = 4096) -> list[int]:
    """The distinct token ids of ``captions`` as ``text`` tokenizes them (start and end tokens too, no padding).

    A captioning head's output vocabulary: every token teacher forcing trains it to predict.
    """
    ids: set[int] = set()
    for start in range(0, len(captions), chunk):
        batch = text.tokenize(list(captions[start:start + chunk]), max_length=max_length)
        ids.update(batch["input_ids"][batch["attention_mask"].bool()].unique().tolist())
    return sorted(ids)


def _build_model(config: TrainConfig, task: Any, data: Any, *, init: bool) -> nn.Module:
    """``create_model`` as the config says, with the task's vocabulary from ``data``; ``init_from`` when ``init``.

    ``head_kwargs.output_ids=train`` (a text-generating task): the head scores only the tokens of
    the ``train_split`` captions (:func:`caption_token_ids`), stored in the model's config.
    """
    from fusionzoo.factory import create_model

    vocab_kwargs, head_kwargs, from_train = head_options(config, task, data)
    try:
        model = create_model(
            config.task, config.fusion, vision=config.vision, text=config.text,
            freeze_encoders=config.freeze_encoders is True and config.peft != "lora",
            fusion_kwargs=dict(config.fusion_kwargs), head_kwargs=head_kwargs, max_text_len=config.max_text_len,
            **vocab_kwargs,
        )
        freeze_one(model, config)
        if from_train:
            model.set_output_ids(train_output_ids(config, model.text, data))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, FusionZooError):
            raise
        raise ConfigError(f"cannot build {config.task}/{config.fusion} with fusion_kwargs={dict(config.fusion_kwargs)}"
                          f" and head_kwargs={dict(config.head_kwargs)}: {type(exc).__name__}: {exc}") from exc
    if init and config.init_from:
        load_matching_weights(model, config.init_from, verbose=True)
    if config.peft == "lora":  # after init_from: the adapters start at zero on the initialised weights
        from fusionzoo.lora import LoraSpec

        model.add_lora(config.lora_r, config.lora_alpha, config.lora_dropout,
                       LoraSpec.parse_targets(config.lora_targets))
    return model


def freeze_one(model: nn.Module, config: TrainConfig) -> None:
    """``freeze_encoders=vision`` / ``text``: freeze that encoder of ``model`` (the other one trains).

    The saved config records ``freeze_encoders: false`` (the model is not frozen whole); with
    ``peft=lora`` the adapters decide what trains, so this does nothing.
    """
    if config.freeze_encoders in ("vision", "text") and config.peft != "lora":
        getattr(model, config.freeze_encoders).freeze()


def train_output_ids(config: TrainConfig, text: Any, data: Any) -> list[int]:
    """``head_kwargs.output_ids=train``: the token ids of the ``train_split`` captions (:func:`caption_token_ids`)."""
    captions = data.pairs(config.train_split).with_format(None)["caption"]
    return caption_token_ids(text, captions, config.max_text_len)


def head_options(config: TrainConfig, task: Any, data: Any) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """What ``create_model`` needs from the task and data: the vocabulary keyword (and ``align_kwargs``),
    the head's keywords, and whether ``head_kwargs.output_ids=train`` asks for :func:`train_output_ids`."""
    vocabulary = task.vocabulary(data)
    vocab_kwargs = {task.vocabulary_key: vocabulary} if task.vocabulary_key else {}
    if getattr(task, "aligns", False):
        vocab_kwargs["align_kwargs"] = dict(config.align_kwargs)
    head_kwargs = dict(config.head_kwargs)
    from_train = head_kwargs.get("output_ids") == OUTPUT_IDS_FROM_TRAIN
    if from_train:
        if not getattr(task, "generates_text", False):
            raise ConfigError(f"key 'head_kwargs.output_ids': {OUTPUT_IDS_FROM_TRAIN!r} is for a task that writes "
                              f"text (captioning); task={config.task} does not")
        del head_kwargs["output_ids"]
    elif isinstance(head_kwargs.get("output_ids"), str):
        raise ConfigError(f"key 'head_kwargs.output_ids': expected {OUTPUT_IDS_FROM_TRAIN!r} (the training "
                          f"captions' tokens) or a list of token ids, got {head_kwargs['output_ids']!r}")
    return vocab_kwargs, head_kwargs, from_train


def train(config: TrainConfig, **run_options: Any) -> dict[str, Any]:
    """Train ``config.task`` with ``config.fusion``; return the final evaluation metrics (``run_options``: see ``run``).

    The task names the recipe that trains it (``Task.recipe``, a name in ``RECIPES``):
    :class:`FinetuneRecipe` for most, ITC + ITM for retrieval; several tasks joined by ``+`` train
    with the ``multitask`` recipe.
    """
    from fusionzoo.registry import RECIPES
    from fusionzoo.tasks import get_task

    if "+" in config.task:  # several tasks, one model: fusionzoo.training.multitask
        return run(RECIPES.get("multitask")(), config, **run_options)
    return run(RECIPES.get(get_task(config.task).recipe)(), config, **run_options)


def resolve_model_dir(run: str | Path) -> Path:
    """``run`` when it holds config.json, else its ``final/`` (a run's output_dir); a Hub repo id's snapshot
    (``owner/name[@revision]``, :func:`~fusionzoo.hub.resolve_model_folder`) when no local path has that
    name; a CheckpointError otherwise."""
    path = resolve_model_folder(run)
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    if not (path / "config.json").is_file():
        from fusionzoo.model_folder import MULTITASK_NAME

        for folder in (Path(run), Path(run) / "final"):
            if (folder / MULTITASK_NAME).is_file():  # a multi-task run: each task's model has its folder
                tasks = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
                raise CheckpointError(f"{run} is a multi-task run: give one task's model, "
                                      f"{' or '.join(str(folder / t) for t in tasks)}")
        raise CheckpointError(f"{run} is not a saved model or a finished run: no config.json there nor in "
                              "final/; expected the output_dir of `fusionzoo train` or its final/ folder")
    return path


def evaluate_checkpoint(checkpoint: str | Path, config: TrainConfig) -> dict[str, Any]:
    """``fusionzoo eval``: load a saved model and score it on ``config.split`` (1 or N processes alike)."""
    from fusionzoo.model import load_model
    from fusionzoo.tasks import get_task

    accelerator = make_accelerator(config, with_trackers=False)
    model = load_model(resolve_model_dir(checkpoint))
    config.task = model.task
    check_names(config)
    task = get_task(model.task)
    with accelerator.main_process_first():
        data = task.load_data(config)
    refuse_streamed(data, config)
    split = eval_split_of(config, data, training=False)
    if split is None or split not in data:
        raise ConfigError(f"key 'split': dataset {config.data!r} has no split {config.split!r}; it has "
                          f"{', '.join(data.split_names)}")
    features = FrozenFeatures.for_run(config, model, accelerator, data, task)  # a frozen-encoder model
    if features is None:
        data = data.with_image_transform(model.vision.transform(train=False), skip_bad=config.skip_bad)
    rows = limit_rows(task.eval_rows(data, split), config.max_eval_samples, config.seed)
    collate = task.collate(data, model.text.tokenize, config.max_text_len)
    if features is not None:
        rows, collate = features.wrap(rows, collate, split)
        accelerator.print(features.note())
    elif config.skip_bad:
        collate = SkipBadImages(collate, training=False)
    loader = DataLoader(rows, batch_size=config.effective_eval_batch_size, shuffle=False, collate_fn=collate,
                        num_workers=config.num_workers)
    model, loader = accelerator.prepare(model, loader)
    recipe = _EvalOnly(task, data, split)
    return evaluate_model(recipe, model, loader, accelerator, config)


class _EvalOnly(Recipe):
    """The evaluation half of :class:`FinetuneRecipe`, for a loaded model."""

    def __init__(self, task: Any, data: Any, split: str) -> None:
        self.task, self.data, self.eval_split = task, data, split

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Any, config: TrainConfig) -> dict[str, float]:
        return self.task.evaluate(model, loader, accelerator, self.data, self.eval_split,
                                  **self.task.eval_options(config))
