"""Pretraining's data: the image-caption pairs of a run, mapped or streamed, with transforms, collate and cache.

:func:`prepare_pretrain_data` reads a mapped source (a Karpathy-style caption
dataset or indexed shards); :func:`prepare_streamed_pretrain_data` a streamed
one, which has no length (the run is ``max_steps`` long) and no feature cache.

Frozen encoders. A frozen vision encoder gives the same tokens every time an
image comes back (five captions per COCO image, every epoch), so each image is
encoded once into the on-disk feature cache, which the bench shares
(:mod:`fusionzoo.training.features`), and batches carry its tokens instead of
pixels. The clean captions' states come from the cache too; the masked copy is
encoded in every step (its masks are drawn anew each step). A second run with
the same encoders and images extracts nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from ..data.common import SkipBadImages
from .config import ConfigError, TrainConfig
from .features import FrozenFeatures
from .pretrain_model import PretrainModel
from .trainer import eval_split_of, limit_rows

__all__ = ["STREAM_EVAL_SAMPLES", "PretrainData", "load_caption_data", "prepare_pretrain_data",
           "prepare_streamed_pretrain_data"]


@dataclass
class PretrainData:
    """Caption pairs made ready for a pretraining model.

    Attributes:
        train, eval: caption-pair datasets (``eval`` None without an evaluation split).
        collate: batch function; gives ``pixel_values``, or ``image_states`` (and the clean
            captions' ``text_states``) from the feature cache when the encoders are frozen.
        eval_split: name of the evaluated split.
        features: what the run reads from the feature cache, or None.
    """

    train: Any
    eval: Any | None
    collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]]
    eval_split: str | None
    features: FrozenFeatures | None = None
    eval_collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]] | None = None

    @property
    def evaluation_collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
        """The batch function of the evaluation loader (``eval_collate``, else ``collate``)."""
        return self.eval_collate or self.collate

    def check_one_global_batch(self, config: TrainConfig, num_processes: int) -> None:
        """A ConfigError unless the training pairs fill one global batch (ITC and ITM train on full batches)."""
        if len(self.train) < config.batch_size * num_processes:
            raise ConfigError(f"split {config.train_split!r} has {len(self.train)} pairs, fewer than one global "
                              f"batch ({config.batch_size} x {num_processes}); lower batch_size")

    def cache_note(self) -> str | None:
        """The line the run prints about the feature cache, or None without one."""
        return None if self.features is None else self.features.note()


def load_caption_data(config: TrainConfig) -> Any:
    """The caption dataset named by ``config.data`` / ``config.data_dir``; fails clearly for other kinds."""
    from fusionzoo.tasks import get_task

    return get_task("captioning").load_data(dataclasses.replace(config, task="captioning"))


#: Samples a streamed evaluation split is scored on when ``max_eval_samples`` is not set.
STREAM_EVAL_SAMPLES = 1024


def prepare_streamed_pretrain_data(config: TrainConfig, model: PretrainModel, data: Any, rank: int = 0,
                                   processes: int = 1) -> PretrainData:
    """Caption pairs of a streamed source (:class:`~fusionzoo.data.streaming.StreamData`) for pretraining.

    Training reads this process's share of the ``train_split`` stream, shuffled (shard order and
    a buffer, seeded by ``config.seed``) and repeated pass after pass, so ``max_steps`` sets the
    length of the run. Images are decoded in the stream (with DataLoader workers, in them) and
    encoded in every step: there is no feature cache, as a stream's images cannot be listed
    before training. The evaluation split is read in order, repeated if it runs short, for
    ``max_eval_samples`` samples (:data:`STREAM_EVAL_SAMPLES` when unset).
    """
    if config.max_train_samples is not None:
        raise ConfigError(f"key 'max_train_samples': data={config.data!r} is streamed; its length is set by "
                          "max_steps (and the shards named in data_files)")
    if config.train_split not in data:
        raise ConfigError(f"key 'train_split': data={config.data!r} has no split {config.train_split!r}; "
                          f"it has {', '.join(data.split_names)}")
    with_pixels = data.with_image_transform(model.vision.transform(train=False))
    train = with_pixels.pairs(config.train_split).with_options(shuffle=True, repeat=True, seed=config.seed)
    eval_split = eval_split_of(config, data, training=True)
    eval_pairs = None
    if eval_split is not None and config.max_eval_samples != 0:
        eval_pairs = with_pixels.pairs(eval_split).with_options(shuffle=False, repeat=True, seed=config.seed)
        eval_pairs = eval_pairs.for_process(rank, processes)
    return PretrainData(train=train.for_process(rank, processes), eval=eval_pairs,
                        collate=data.collator(model.text.tokenize, config.max_text_len), eval_split=eval_split)


def prepare_pretrain_data(config: TrainConfig, model: PretrainModel, accelerator: Any | None = None,
                          data: Any | None = None) -> PretrainData:
    """Image-caption pairs of ``config.train_split`` (and of an evaluation split), with transforms and collate.

    With frozen encoders and an ``accelerator``, the pairs are loaded without their pixels:
    their image tokens and the clean captions' states come from the feature cache
    (:class:`~fusionzoo.training.features.FrozenFeatures`; ``feature_cache=false`` turns it
    off), extracted there once. The masked captions of MLM are encoded in every step.

    Args:
        data: the loaded caption dataset (default: :func:`load_caption_data`).
    """
    if data is None:
        data = load_caption_data(config)
    if config.train_split not in data:
        raise ValueError(f"data={config.data!r} has no split {config.train_split!r}; it has {data.split_names}")
    eval_split = eval_split_of(config, data, training=True)
    collate = data.collator(model.text.tokenize, config.max_text_len)
    features = None if accelerator is None else FrozenFeatures.for_run(config, model, accelerator, data)
    source = data if features is not None else data.with_image_transform(model.vision.transform(train=False),
                                                                         skip_bad=config.skip_bad)
    train = limit_rows(source.pairs(config.train_split), config.max_train_samples, config.seed)
    eval_pairs = None
    if eval_split is not None and config.max_eval_samples != 0:
        eval_pairs = limit_rows(source.pairs(eval_split), config.max_eval_samples, config.seed)
    if features is None:
        if config.skip_bad:
            collate = SkipBadImages(collate, training=True)
        return PretrainData(train=train, eval=eval_pairs, collate=collate, eval_split=eval_split)
    train, train_collate = features.wrap(train, collate, config.train_split)
    eval_collate = None
    if eval_pairs is not None:  # its own collate: it reads the evaluation split's cache entries
        eval_pairs, eval_collate = features.wrap(eval_pairs, collate, eval_split)
    return PretrainData(train=train, eval=eval_pairs, collate=train_collate, eval_split=eval_split,
                        features=features, eval_collate=eval_collate)
