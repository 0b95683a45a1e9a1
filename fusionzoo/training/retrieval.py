"""Training a retrieval model: ITC + ITM on image-caption pairs, for ``fusionzoo train task=retrieval``.

The model is a :class:`~fusionzoo.model.FusionModel` for the ``retrieval`` task: the
encoders, the fusion, its ITM head (``head``) and, for a fusion that does not
align its own streams, an :class:`~fusionzoo.alignment.Alignment` (``align``). Each
step is pretraining's step without MLM (:class:`~fusionzoo.training.pretrain_model.PretrainModel`
built around the same modules): ITC over the global batch with the captions of one
image as positives of each other, and ITM on the positives and on hard negatives
drawn by ITC similarity from the global batch, with per-row generators, so N
processes train what one process with the global batch trains. ``loss =
itc_weight * itc + itm_weight * itm``; ``itm_weight=0`` trains the alignment
alone (a dual encoder). Evaluation is the task's: recall@K on the evaluation
split's images and captions (:mod:`fusionzoo.tasks.retrieval`), with image tokens
from the feature cache when the vision encoder is frozen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from ..losses import ITMLoss
from .config import ConfigError, TrainConfig
from .loop import RecipeData
from .pretrain import PretrainRecipe, check_pretrain_config
from .pretrain_data import prepare_pretrain_data
from .pretrain_model import PretrainModel
from .trainer import _build_model, check_names, eval_split_of, limit_rows, refuse_streamed


class RetrievalRecipe(PretrainRecipe):
    """ITC + ITM training of a retrieval :class:`~fusionzoo.model.FusionModel` (see the module docstring)."""

    tracker_project = "fusionzoo"

    def leaves_parameters_unused(self, config: TrainConfig) -> bool:
        return config.itm_weight == 0  # ITC alone never runs the fusion or the ITM head

    def check(self, config: TrainConfig, accelerator: Any) -> None:
        from accelerate.utils import DistributedType

        from fusionzoo.tasks import get_task

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError("task=retrieval trains on one or several processes with DDP; FSDP and DeepSpeed are "
                              "not supported (ITC gathers embeddings with their gradients)")
        check_names(config)
        if config.itc_weight <= 0 and config.itm_weight <= 0:
            raise ConfigError("task=retrieval needs itc_weight > 0 or itm_weight > 0 (it trains ITC + ITM), got "
                              f"itc_weight={config.itc_weight}, itm_weight={config.itm_weight}")
        check_pretrain_config(dataclasses.replace(config, mlm_weight=0.0), accelerator.num_processes)
        self.task = get_task(config.task)
        self.config = config
        self.label = f"train retrieval/{config.fusion}"

    def build_model(self, config: TrainConfig, accelerator: Any) -> nn.Module:
        from accelerate.utils import set_seed

        with accelerator.main_process_first():
            self.data = self.task.load_data(config)
        set_seed(config.seed)
        self.model = _build_model(config, self.task, self.data, init=True)  # what is evaluated and exported
        m = self.model
        # The trained module shares every parameter with ``m``: ITMLoss scores with m.head.linear.
        return PretrainModel(
            m.vision, m.text, m.fusion, ITMLoss(m.fusion.out_dim, head=m.head.linear), None, m.config,
            align=m.align, itc_weight=config.itc_weight, itm_weight=config.itm_weight, mlm_weight=0.0,
            momentum_distill=config.momentum_distill, momentum=config.momentum, queue_size=config.queue_size,
        )

    def prepare_data(self, config: TrainConfig, model: nn.Module, accelerator: Any) -> RecipeData:
        refuse_streamed(self.data, config)
        self.eval_split = eval_split_of(config, self.data, training=True)
        evaluate = self.eval_split is not None and config.max_eval_samples != 0
        # The training pairs; evaluation reads image rows (max_eval_samples counts images here, not pairs).
        data = prepare_pretrain_data(dataclasses.replace(config, max_eval_samples=0), model, accelerator, self.data)
        data.check_one_global_batch(config, accelerator.num_processes)
        images, eval_collate = None, data.collate
        if evaluate:
            collate = self.data.collator(self.model.text.tokenize, config.max_text_len)
            if data.features is not None:  # no pixels: the gallery's tokens come from the feature cache
                images = limit_rows(self.data[self.eval_split], config.max_eval_samples, config.seed)
                images, eval_collate = data.features.wrap(images, collate, self.eval_split, texts=False)
            else:
                with_pixels = self.data.with_image_transform(self.model.vision.transform(train=False),
                                                             skip_bad=config.skip_bad)
                images = limit_rows(with_pixels[self.eval_split], config.max_eval_samples, config.seed)
                eval_collate = collate
        return RecipeData(train=data.train, eval=images, collate=data.collate, eval_collate=eval_collate,
                          drop_last=True, eval_drop_last=False, note=data.cache_note(),
                          feature_cache=None if data.features is None else data.features.stats())

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Any, config: TrainConfig) -> dict[str, float]:
        """Recall@K on the validation split; with ``rerank_itc_weight=auto`` every weight of
        :data:`~fusionzoo.tasks.retrieval.ITC_WEIGHT_GRID` is tried there (one ITM pass) and the best
        is saved with the model (``config.json``: ``retrieval.rerank_itc_weight``) for ``eval`` to use."""
        from fusionzoo.tasks.retrieval import ITC_WEIGHT_GRID

        options = {**self.task.eval_options(config), "results": None}  # no score files while training
        # chosen on a validation split only: a run evaluated on its test split keeps the unchosen weight
        choose = config.rerank_itc_weight == "auto" and self.eval_split != "test"
        if choose:
            options["rerank_itc_weight"] = ITC_WEIGHT_GRID
        self.model.eval()
        metrics = self.task.evaluate(self.model, loader, accelerator, self.data, self.eval_split, **options)
        if choose:
            self.model.config["retrieval"] = {
                "rerank_itc_weight": metrics["rerank_itc_weight"], "chosen_on": self.eval_split,
                "r_mean": {f"{w:g}": metrics[f"r_mean_itc_weight_{w:g}"] for w in ITC_WEIGHT_GRID},
                "itc_r_mean": metrics["itc_r_mean"]}
        return metrics

    def export(self, accelerator: Any, model: nn.Module, directory: Path) -> None:
        if accelerator.is_main_process:
            self.model.save_pretrained(directory, merge_lora=self.config.lora_merge)

    def result(self, final_eval: dict[str, Any], train_losses: dict[str, float], step: int) -> dict[str, Any]:
        return final_eval
