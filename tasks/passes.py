"""The evaluation pass: batches in, outputs out, under one autocast and without gradients.

Every task's ``evaluate`` (which runs under Accelerate, one or several processes) and the
bench's one-process inference over cached features take their forward passes from here, so
how a model is run for scoring -- grad mode, autocast, the float32 logits it is scored on,
the generation call -- is written once. What each caller does with the outputs (gathering
over processes, scoring, timing) stays with the caller.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from fusionzoo.data.common import model_inputs

#: ``() -> context manager`` entering the run's autocast (``accelerator.autocast``).
Autocast = Callable[[], contextlib.AbstractContextManager]


class Stopwatch:
    """Seconds spent inside ``with stopwatch:`` blocks, summed; on CUDA it waits for the device
    before reading the clock, so asynchronous kernels are counted where they run."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds = 0.0
        self._sync = device is not None and device.type == "cuda"
        self._start = 0.0

    def __enter__(self) -> "Stopwatch":
        if self._sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start


def inputs_without_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs of a batch without its ``labels``: a task scoring a split computes each
    sample's loss itself, and an unlabeled split's labels (-1) have none."""
    return {key: value for key, value in model_inputs(batch).items() if key != "labels"}


def logits_pass(model: Any, batches: Iterable[Mapping[str, Any]], autocast: Autocast, *,
                inputs: Callable[[Mapping[str, Any]], dict[str, Any]] = model_inputs,
                stopwatch: Stopwatch | None = None) -> Iterator[tuple[Mapping[str, Any], Tensor]]:
    """``(batch, logits)`` for each batch: the model's logits (B, C) in float32.

    Args:
        model: called as ``model(**inputs(batch))``; its output has ``.logits``.
        batches: collated batches (already on the model's device).
        autocast: enters the run's mixed precision.
        inputs: the keyword inputs of the model from a batch (default: the collated keys
            ``FusionModel.forward`` takes).
        stopwatch: if given, times the forward passes (not the batches' making).
    """
    for batch in batches:
        with stopwatch or contextlib.nullcontext(), torch.no_grad(), autocast():
            logits = model(**inputs(batch)).logits.float()
        yield batch, logits


def caption_pass(model: Any, batches: Iterable[Mapping[str, Any]], autocast: Autocast, *,
                 max_new_tokens: int, num_beams: int = 1, stopwatch: Stopwatch | None = None,
                 **decoding: Any) -> Iterator[tuple[Mapping[str, Any], Tensor]]:
    """``(batch, token ids)`` for each batch: the captions ``model.generate_ids`` writes (B, L)
    from the batch's ``pixel_values`` or cached ``image_states``; ``decoding``: the other fields of
    :class:`~fusionzoo.decoding.DecodingOptions` (``min_new_tokens``, ``length_penalty``, ...)."""
    for batch in batches:
        with stopwatch or contextlib.nullcontext(), torch.no_grad(), autocast():
            ids = model.generate_ids(batch.get("pixel_values"), image_states=batch.get("image_states"),
                                     max_new_tokens=max_new_tokens, num_beams=num_beams, **decoding)
        yield batch, ids
