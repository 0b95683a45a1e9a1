"""The run's features as tensors: every task's image tokens and text states, got once from the cache.

:func:`extract_features` gets (from the :class:`~fusionzoo.features.cache.FeatureCache`, or
by extracting) every image and text the run's tasks need and finishes the image tokens
(pooling, position channels: :mod:`fusionzoo.bench.features`); :class:`Features` holds them
with lookups from image path / text to row, and gives each split's
:class:`~fusionzoo.bench.loop.FeatureView` and the statistics a row standardises with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..encoders import TextEncoder, VisionEncoder
from ..features.cache import FeatureCache
from .features import (add_position_channels, grid_note, image_features, image_preprocessing, pool_image_tokens,
                       text_features)
from .config import spec_name
from .loop import FeatureView, as_tensor
from .settings import TASK_SETTINGS
from .standardize import channel_stats
from .suites import BenchTask, SplitData
from .tails import untrained_image_tokens, untrained_text_states


@dataclass
class Features:
    """The run's cached arrays as tensors, with lookups from image path / text to row.

    Attributes:
        image_tokens: (U, G, Di) the image tokens the fusions are fed, one row per image (with
            ``--train-encoders``: the untrained tails' tokens, the statistics' source).
        image_row: image path -> row.
        texts: causal? -> (arrays, text -> row); arrays ``input_ids``, ``mask``, ``states``
            (with ``--train-encoders``: the untrained tail's states) and, with
            ``--train-encoders``, ``tail_inputs`` (U, T, Dt).
        train_encoders: ``--train-encoders`` (0 = frozen encoders).
        image_tail_inputs: with ``--train-encoders``: (U, ...) the image encoder's tail inputs.
        image_grid, image_positions, image_prefix_tokens: how image tokens are finished after the encoder
            (:func:`pool_image_tokens`, dropping the encoder's prefix tokens, and :func:`add_position_channels`);
            the tails' rows do it in the model.
        corrupted_texts: ``--robustness``: text corruption name -> test question -> its corrupted
            question (:mod:`fusionzoo.bench.robustness`).
        extra_texts: ``--robustness`` / ``--modality-dropout``: (arrays, text -> row) of the empty
            question and the corrupted questions, arrays as ``texts``' (their own cache entry).
    """

    image_tokens: torch.Tensor
    image_row: dict[str, int]
    texts: dict[bool, tuple[dict[str, torch.Tensor], dict[str, int]]]  # causal? -> (arrays, text -> row)
    train_encoders: int = 0
    image_tail_inputs: torch.Tensor | None = None
    image_grid: int | None = None
    image_positions: int = 0
    image_prefix_tokens: int = 0
    corrupted_texts: dict[str, dict[str, str]] = field(default_factory=dict)
    extra_texts: tuple[dict[str, torch.Tensor], dict[str, int]] | None = None

    @property
    def image_dim(self) -> int:
        """Width of the image tokens the fusions are fed."""
        return int(self.image_tokens.shape[-1])

    def stats(self, split: SplitData, causal: bool) -> dict[str, torch.Tensor]:
        """Per-channel mean and std of the image tokens and text states of ``split`` (its distinct rows)."""
        images = torch.as_tensor(sorted({self.image_row[p] for p in split.image_paths}), dtype=torch.long)
        image_mean, image_std = channel_stats(self.image_tokens, images)
        arrays, row = self.texts[causal]
        texts = torch.as_tensor(sorted({row[t] for t in split.texts}), dtype=torch.long)
        text_mean, text_std = channel_stats(arrays["states"], texts, arrays["mask"])
        return {"text_mean": text_mean, "text_std": text_std, "image_mean": image_mean, "image_std": image_std}

    def token_ids(self, split: SplitData, causal: bool) -> list[int]:
        """The distinct token ids of the texts of ``split`` (padding excluded).

        A captioning head's output vocabulary: every token it is trained to predict.
        """
        arrays, row = self.texts[causal]
        rows = torch.as_tensor(sorted({row[t] for t in split.texts}), dtype=torch.long)
        ids = torch.as_tensor(arrays["input_ids"][rows]).long()  # (R, T)
        return torch.unique(ids[torch.as_tensor(arrays["mask"][rows]).bool()]).tolist()

    def view(self, split: SplitData, causal: bool) -> FeatureView:
        """The samples of ``split`` as rows of the arrays: final states, or with ``--train-encoders`` tail inputs."""
        image_rows = torch.as_tensor([self.image_row[p] for p in split.image_paths], dtype=torch.long)
        if self.train_encoders:
            view = FeatureView(image_tokens=self.image_tail_inputs, image_rows=image_rows, labels=split.labels,
                               image_input="image_tail_inputs", text_input="text_tail_inputs")
        else:
            view = FeatureView(image_tokens=self.image_tokens, image_rows=image_rows, labels=split.labels)
        if split.texts is not None:
            arrays, row = self.texts[causal]
            view.text_rows = torch.as_tensor([row[t] for t in split.texts], dtype=torch.long)
            view.text_states = arrays["tail_inputs" if self.train_encoders else "states"]
            view.text_ids, view.text_mask = arrays["input_ids"], arrays["mask"]
        return view


def extract_features(tasks: Sequence[BenchTask], vision: VisionEncoder, text: TextEncoder,
                     causal_text: TextEncoder | None, cache: FeatureCache, image_size: int,
                     device: torch.device, progress: bool, image_grid: int | None = None,
                     image_stage: int | None = None, image_positions: int = 0, train_encoders: int = 0
                     ) -> tuple[Features, dict[str, Any]]:
    """Get (from the cache, or by extracting) every feature the run's tasks need.

    ``image_grid`` pools the image tokens (:func:`pool_image_tokens`) after the cache:
    the cache always holds the encoder's full token grid. ``image_stage`` takes an
    intermediate feature map instead of the last (:meth:`VisionEncoder.stage_tokens`),
    ``image_positions`` appends that many frequencies of 2-D position channels per axis
    after pooling (:func:`add_position_channels`). ``train_encoders`` > 0 caches the inputs
    of both encoders' last ``train_encoders`` blocks instead, and runs the untrained tails
    over them once for the image tokens and text states (:mod:`fusionzoo.bench.tails`).
    """
    paths = sorted({p for task in tasks for split in (task.train, task.test) for p in split.image_paths})
    data_config = image_preprocessing(vision, image_size)
    images = image_features(cache, vision, paths, data_config, device=device, progress=progress, stage=image_stage,
                            tail=train_encoders or None)
    image_tail_inputs = None
    prefix = vision.num_prefix_tokens if image_stage is None else 0  # a stage's map has no prefix tokens
    if train_encoders:
        image_tail_inputs = as_tensor(images["tail_inputs"])  # (U, ...)
        pooled, encoder_tokens = untrained_image_tokens(vision.tail(train_encoders), image_tail_inputs, image_grid,
                                                        device=device, progress=progress, prefix_tokens=prefix)
    else:
        pooled = pool_image_tokens(images["tokens"], image_grid, prefix_tokens=prefix)
        encoder_tokens = list(images["tokens"].shape[1:])
    image_tokens = add_position_channels(pooled, image_positions)
    info: dict[str, Any] = {"images": len(paths), "image_size": image_size,
                            "encoder_tokens": encoder_tokens, "image_stage": image_stage,
                            "position_channels": 4 * max(0, image_positions),
                            "image_tokens": list(image_tokens.shape[1:]),
                            "image_tokens_note": grid_note(spec_name(vision.spec), encoder_tokens[0], prefix, image_grid)}
    if train_encoders:
        info["tail_inputs"] = {"blocks": train_encoders, "image": list(image_tail_inputs.shape[1:])}
    texts: dict[bool, tuple[dict[str, torch.Tensor], dict[str, int]]] = {}
    for causal, encoder in ((False, text), (True, causal_text)):
        wanted = sorted({t for task in tasks if task.causal_text == causal
                         for split in (task.train, task.test) if split.texts is not None for t in split.texts})
        if not wanted:
            continue
        max_len = max(TASK_SETTINGS[task.name].max_text_len for task in tasks if task.causal_text == causal)
        entry = text_features(cache, encoder, wanted, max_length=max_len, device=device, progress=progress,
                              tail=train_encoders or None)
        if train_encoders:
            arrays = {name: as_tensor(entry[name]) for name in ("input_ids", "mask", "tail_inputs")}
            arrays["states"] = untrained_text_states(encoder.tail(train_encoders), arrays["tail_inputs"],
                                                     arrays["mask"], device=device, progress=progress)
        else:
            arrays = {name: as_tensor(entry[name]) for name in ("input_ids", "mask", "states")}
        texts[causal] = (arrays, {t: i for i, t in enumerate(wanted)})
        info["captions" if causal else "texts"] = len(wanted)
    features = Features(image_tokens=image_tokens, image_row={p: i for i, p in enumerate(paths)},
                        texts=texts, train_encoders=train_encoders, image_tail_inputs=image_tail_inputs,
                        image_grid=image_grid, image_positions=image_positions, image_prefix_tokens=prefix)
    return features, info
