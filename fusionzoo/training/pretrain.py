"""ALBEF-style pretraining on image-caption pairs (ITC + ITM + MLM) on Accelerate: the recipe and its entry point.

Follows Li et al., "Align before Fuse: Vision and Language Representation
Learning with Momentum Distillation" (NeurIPS 2021). The model, its three
objectives and its export live in :mod:`fusionzoo.training.pretrain_model`;
the caption pairs and the feature cache of frozen encoders in
:mod:`fusionzoo.training.pretrain_data`. This module holds the configuration
checks, one step (the captions masked, then the model run), evaluation, and
:class:`PretrainRecipe`, which :func:`~fusionzoo.training.loop.run` drives for
``fusionzoo pretrain`` (:func:`pretrain`).

Batches are full (``drop_last``), so every process gathers the same shapes.

Randomness. Each row's masking and its negative draws come from generators
seeded from ``(seed, purpose, step, micro-batch, the row's index in the global
batch)`` (:func:`row_generators`), dropout from the global RNG that Accelerate
checkpoints, and the data order depends only on ``(seed, epoch)``. So a run
resumed from a checkpoint continues exactly as an uninterrupted one, and N
processes draw for their rows what one process with the global batch draws.

Output. ``output_dir/final/`` holds what
:meth:`~fusionzoo.training.pretrain_model.PretrainModel.save_pretrained` writes:
the weights under FusionModel's names, so ``fusionzoo train ...
init_from=<output_dir>`` starts any task from them, the heads, a ``config.json``
and the tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..encoders.vision import check_vision_name
from ..losses import Generators
from ..registry import FUSIONS
from .config import ConfigError, TrainConfig
from .features import FrozenFeatures
from .loop import NonFiniteLossError, Recipe, RecipeData, StepContext, StepOutput, run
from ..processes import ProcessView
from ..data.streaming import derive_seed  # a 63-bit seed from (seed, purpose, step, ...)
from .pretrain_data import STREAM_EVAL_SAMPLES, load_caption_data, prepare_pretrain_data, prepare_streamed_pretrain_data
from .pretrain_model import PretrainModel, PretrainOutput, build_pretrain_model
from .trainer import load_matching_weights

__all__ = ["NonFiniteLossError", "PretrainRecipe", "ProcessView", "check_pretrain_config", "pretrain"]

logger = logging.getLogger(__name__)

#: Defaults of ``fusionzoo pretrain`` that differ from ``fusionzoo train``'s.
PRETRAIN_DEFAULTS = {"task": "pretrain", "fusion": "albef", "data": "karpathy-captions", "output_dir": "runs/pretrain"}


def pretrain_base_config() -> TrainConfig:
    """The configuration ``fusionzoo pretrain`` starts from before the YAML file and overrides."""
    return TrainConfig(**PRETRAIN_DEFAULTS)


# -- seeds of the masks and negatives ---------------------------------------------------


def make_generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts`` (draws are moved to the data's device)."""
    return torch.Generator().manual_seed(derive_seed(*parts))


# -- one step, evaluation --------------------------------------------------------------


def _forward(model: nn.Module, unwrapped: PretrainModel, batch: dict[str, Tensor], mask_generator: "Generators",
             negative_generator: "Generators", alpha: float, processes: ProcessView) -> PretrainOutput:
    """Mask the captions with ``mask_generator``, then run the model (negatives from ``negative_generator``)."""
    masked_ids = mlm_labels = None
    if unwrapped.mlm_weight > 0:
        masked_ids, mlm_labels = unwrapped.mask_text(batch["input_ids"], batch["attention_mask"], mask_generator)
    return model(pixel_values=batch.get("pixel_values"), image_states=batch.get("image_states"),
                 input_ids=batch["input_ids"], text_states=batch.get("text_states"),
                 attention_mask=batch["attention_mask"], masked_ids=masked_ids, mlm_labels=mlm_labels,
                 generator=negative_generator, image_ids=batch.get("image_id"), alpha=alpha, processes=processes)


def row_generators(seed: int, purpose: str, step: int, micro: int, first_row: int, rows: int) -> list[torch.Generator]:
    """One generator per row of the global batch, seeded by ``(seed, purpose, step, micro, global row)``.

    A process holding rows ``first_row .. first_row + rows - 1`` of the global batch draws
    exactly what one process holding the whole global batch draws for them.
    """
    return [make_generator(seed, purpose, step, micro, first_row + i) for i in range(rows)]


@torch.no_grad()
def evaluate_pretraining(model: nn.Module, loader: DataLoader, accelerator: Any, seed: int) -> dict[str, float]:
    """Mean ITC / ITM / MLM losses and ITM accuracy of the online model over ``loader`` (eval mode).

    Masks and negatives are drawn from one generator per row of the global batch, seeded by
    ``(seed, "eval-...", batch, global row)`` (:func:`row_generators`), so the same model always
    gets the same scores, on any number of processes. Each batch counts with its global size.
    """
    unwrapped = accelerator.unwrap_model(model)
    processes = ProcessView.from_accelerator(accelerator)
    was_training = unwrapped.training
    model.eval()
    sums: dict[str, float] = {}
    batches, samples = 0, 0
    try:
        for i, batch in enumerate(loader):
            rows = len(batch["input_ids"])
            first = processes.index * rows  # full batches, as in training
            with accelerator.autocast():
                out = _forward(model, unwrapped, batch, row_generators(seed, "eval-mask", i, 0, first, rows),
                               row_generators(seed, "eval-negatives", i, 0, first, rows), 0.0, processes)
            values = {**out.losses, **{k: v for k, v in out.metrics.items() if k != "temperature"}}
            stacked = torch.stack([v.detach().float() for v in values.values()])[None]  # (1, K)
            mean = accelerator.gather(stacked).mean(0)  # (K,) over processes
            for name, value in zip(values, mean.tolist()):
                sums[name] = sums.get(name, 0.0) + value
            batches += 1
            samples += len(batch["input_ids"]) * accelerator.num_processes
    finally:
        if was_training:
            model.train()
    metrics = {name: total / max(1, batches) for name, total in sums.items()}
    metrics["num_samples"] = float(samples)
    return metrics


# -- the loop --------------------------------------------------------------------------


def check_pretrain_config(config: TrainConfig, num_processes: int) -> None:
    """A ConfigError unless the loss weights, ``distill_alpha`` and the global batch suit ITC + ITM + MLM."""
    if config.modality_dropout > 0:
        raise ConfigError("key 'modality_dropout' is for VQA and classification fine-tuning; pretraining and "
                          "task=retrieval learn from image-text pairs, which a dropped modality would not be")
    if config.peft == "lora" and config.momentum_distill:
        raise ConfigError("key 'peft': peft=lora with momentum_distill=true would need momentum copies of the "
                          "adapters, which are not kept; pretrain with one of them")
    if config.freeze_encoders in ("vision", "text"):
        raise ConfigError(f"key 'freeze_encoders': {config.freeze_encoders} (one encoder frozen) is for fine-tuning a "
                          "task; pretraining and task=retrieval freeze both encoders (true) or neither (false)")
    for key in ("itc_weight", "itm_weight", "mlm_weight"):
        if getattr(config, key) < 0:
            raise ConfigError(f"key '{key}' must be >= 0, got {getattr(config, key)}")
    if not 0.0 <= config.distill_alpha <= 1.0:
        raise ConfigError(f"key 'distill_alpha' must be in [0, 1], got {config.distill_alpha}")
    if config.batch_size * num_processes < 2:
        raise ConfigError(f"key 'batch_size': ITC and ITM need at least 2 pairs in the global batch, got "
                          f"{config.batch_size} x {num_processes} process(es)")


class PretrainRecipe(Recipe):
    """ITC + ITM + MLM on image-caption pairs (see :mod:`.pretrain_model`), for :func:`~fusionzoo.training.loop.run`."""

    tracker_project = "fusionzoo-pretrain"

    def leaves_parameters_unused(self, config: TrainConfig) -> bool:
        # ITC alone reads only the fusion's unimodal projections: its fusing layers get no gradient.
        return config.itm_weight == 0 and config.mlm_weight == 0

    def check(self, config: TrainConfig, accelerator: Any) -> None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError("fusionzoo pretrain runs on one or several processes with DDP; FSDP and DeepSpeed "
                              "are not supported (the momentum update and the export read full parameters)")
        check_pretrain_config(config, accelerator.num_processes)
        FUSIONS.get(config.fusion)
        check_vision_name(config.vision)
        self.config = config
        self.label = f"pretrain {config.fusion}"

    def build_model(self, config: TrainConfig, accelerator: Any) -> nn.Module:
        model = build_pretrain_model(config)
        if config.init_from:
            load_matching_weights(model, config.init_from, verbose=True)
            model.reset_momentum()  # the momentum copies start from the loaded weights
        if config.peft == "lora":  # after init_from: the adapters start at zero on the loaded weights
            from fusionzoo.lora import LoraSpec, add_lora

            add_lora(model, LoraSpec(config.lora_r, config.lora_alpha, config.lora_dropout,
                                     LoraSpec.parse_targets(config.lora_targets)))
        return model

    def prepare_data(self, config: TrainConfig, model: nn.Module, accelerator: Any) -> RecipeData:
        with accelerator.main_process_first():
            captions = load_caption_data(config)
        if getattr(captions, "iterable", False):
            return self._prepare_streamed(config, model, accelerator, captions)
        data = prepare_pretrain_data(config, model, accelerator, captions)
        data.check_one_global_batch(config, accelerator.num_processes)
        evaluation = data.eval
        if evaluation is not None and len(evaluation) < config.effective_eval_batch_size * accelerator.num_processes:
            evaluation = None  # ITC and ITM need full batches: too few pairs to evaluate
        # Full batches only: every process gathers the same shapes and ITC always has B x processes columns.
        return RecipeData(train=data.train, eval=evaluation, collate=data.collate,
                          eval_collate=data.evaluation_collate, drop_last=True, eval_drop_last=True,
                          note=data.cache_note(),
                          feature_cache=None if data.features is None else data.features.stats())

    def _prepare_streamed(self, config: TrainConfig, model: nn.Module, accelerator: Any, captions: Any) -> RecipeData:
        """Pretraining data read from a stream: no length, so the run is ``max_steps`` long; no feature cache."""
        FrozenFeatures.for_run(config, model, accelerator, captions)  # feature_cache=true: an error saying why not
        if config.max_steps is None:
            raise ConfigError(f"key 'max_steps': data={config.data!r} is streamed and has no length; "
                              "set max_steps=<optimizer steps>")
        data = prepare_streamed_pretrain_data(config, model, captions, accelerator.process_index,
                                              accelerator.num_processes)
        eval_batches = None
        if data.eval is not None:
            samples = config.max_eval_samples or STREAM_EVAL_SAMPLES
            eval_batches = max(1, samples // (config.effective_eval_batch_size * accelerator.num_processes))
        note = (f"streaming {config.train_split!r} from {data.train.num_shards} shards "
                f"(shuffle buffer {data.train.options.shuffle_buffer}, seed {config.seed}); "
                f"{max(1, config.num_workers)} reader(s) per process, {accelerator.num_processes} process(es)")
        return RecipeData(train=data.train, eval=data.eval, collate=data.collate, eval_collate=data.collate,
                          drop_last=True, eval_drop_last=True, note=note, eval_batches=eval_batches)

    def _alpha(self, step: int, steps_per_epoch: int) -> float:
        """ALBEF's ramp: from 0 to ``distill_alpha`` over the first epoch."""
        if not self.config.momentum_distill:
            return 0.0
        return self.config.distill_alpha * min(1.0, step / steps_per_epoch)

    def forward(self, model: nn.Module, unwrapped: nn.Module, batch: dict[str, Any],
                context: StepContext) -> StepOutput:
        rows = len(batch["input_ids"])
        first = context.processes.index * rows  # full batches: process k holds rows k*B .. k*B + B - 1
        seed, step, micro = self.config.seed, context.step, context.micro
        out = _forward(model, unwrapped, batch, row_generators(seed, "mask", step, micro, first, rows),
                       row_generators(seed, "negatives", step, micro, first, rows),
                       self._alpha(context.step, context.steps_per_epoch), context.processes)
        return StepOutput(loss=out.loss, losses=out.losses, metrics=out.metrics,
                          num_samples=len(batch["input_ids"]))

    def after_optimizer_step(self, unwrapped: nn.Module) -> None:
        unwrapped.momentum_update()

    def log_extras(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        return {"alpha": self._alpha(step, steps_per_epoch)}

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Any, config: TrainConfig) -> dict[str, float]:
        return evaluate_pretraining(model, loader, accelerator, config.seed)

    def export(self, accelerator: Any, model: nn.Module, directory: Path) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(directory)
            accelerator.print(f"pretrained model saved to {directory} (fine-tune with: fusionzoo train task=... "
                              f"init_from={directory.parent})")

    def result(self, final_eval: dict[str, Any], train_losses: dict[str, float], step: int) -> dict[str, Any]:
        return {"train": train_losses, "eval": final_eval, "step": step}


def pretrain(config: TrainConfig, **run_options: Any) -> dict[str, Any]:
    """Pretrain with ITC + ITM + MLM on the caption pairs of ``config.data``; export to ``output_dir/final``.

    Returns:
        ``{"train": last logged train losses, "eval": final evaluation (or {}), "step": steps done}``.
    """
    return run(PretrainRecipe(), config, **run_options)
