"""Modality dropout: in training, one modality of a sample removed with probability P.

``modality_dropout=P`` (``fusionzoo train``) and ``--modality-dropout P`` (``fusionzoo bench``)
remove, for each training sample with probability ``P``, either its image or its question
(each half the time), by the rules the bench's robustness evaluation
(:mod:`fusionzoo.bench.robustness`) scores a removed modality with:

* **image removed**: the image tokens the fusion is fed are zeros (cached features); a batch of
  pixels (encoders that train, or no feature cache) gets an all-zero normalised image instead,
  the dataset-mean colour everywhere, since the encoder then runs inside the model;
* **question removed**: the empty question, the text encoder's own ``[CLS] [SEP]``
  (:class:`EmptyText`): its token ids and mask, and its states where the batch carries cached
  text states.

The draws are per sample, from a generator seeded by ``(seed, step, micro-batch, the sample's
row in the global batch)`` (:func:`modality_drops`): a resumed run draws what the uninterrupted
run drew, and N processes holding their parts of a global batch draw what one process holding
all of it draws. Evaluation never drops anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data.streaming import derive_seed

#: What :func:`modality_drops` gives a sample: kept whole, image removed, question removed.
KEEP, NO_IMAGE, NO_TEXT = 0, 1, 2


def modality_drops(seed: int, step: int, micro: int, first_row: int, rows: int, probability: float) -> Tensor:
    """(rows,) long: :data:`KEEP`, :data:`NO_IMAGE` or :data:`NO_TEXT` for rows ``first_row ..`` of the global batch.

    Row ``r`` draws two uniforms from a generator seeded by ``(seed, "modality-dropout", step,
    micro, r)``: the first below ``probability`` drops a modality, the second below 0.5 makes it
    the image, else the question.
    """
    drops = torch.zeros(rows, dtype=torch.long)
    if probability <= 0:
        return drops
    for i in range(rows):
        generator = torch.Generator().manual_seed(derive_seed(seed, "modality-dropout", step, micro, first_row + i))
        drop, which = torch.rand(2, generator=generator).tolist()
        if drop < probability:
            drops[i] = NO_IMAGE if which < 0.5 else NO_TEXT
    return drops


@dataclass
class EmptyText:
    """The empty question as the model sees it.

    Attributes:
        input_ids: (L,) the text encoder's ids of ``""`` (``[CLS] [SEP]``).
        states: (L, Dt) its states, for batches that carry cached text states; None otherwise.
    """

    input_ids: Tensor
    states: Tensor | None = None

    @classmethod
    def of(cls, text_encoder: Any, with_states: bool) -> "EmptyText":
        """The empty question of ``text_encoder`` (a :class:`~fusionzoo.encoders.TextEncoder`), its states too when asked.

        The states are computed in eval mode (no dropout, no draw from any generator, so a resumed
        run that computes them at another step trains as the uninterrupted one), then every
        submodule's mode is restored.
        """
        tokens = text_encoder.tokenize([""])
        states = None
        if with_states:
            parameter = next(text_encoder.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            modes = [(module, module.training) for module in text_encoder.modules()]
            text_encoder.eval()
            try:
                with torch.no_grad():
                    states = text_encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).states[0]
            finally:
                for module, training in modes:  # each submodule's own mode (a frozen part may stay in eval)
                    module.training = training
            states = states.detach().float().cpu()
        return cls(input_ids=tokens["input_ids"][0], states=states)


def _pad_width(tensor: Tensor, width: int) -> Tensor:
    """``tensor`` (B, T, ...) zero-padded along dim 1 to ``width`` (>= T)."""
    if tensor.shape[1] >= width:
        return tensor
    shape = (tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)


def drop_modalities(inputs: dict[str, Any], drops: Tensor, empty: EmptyText) -> dict[str, Any]:
    """A copy of the model inputs ``inputs`` with the modality ``drops`` (B,) names removed per sample.

    ``inputs`` holds ``image_states`` (B, N, Di) or ``pixel_values`` (B, 3, H, W), ``input_ids`` and
    ``attention_mask`` (B, T) and maybe ``text_states`` (B, T, Dt); the other entries (labels) are
    kept. A removed image is zeros; a removed question is ``empty`` padded to the batch's width.
    """
    out = dict(inputs)
    no_image = (drops == NO_IMAGE).to(next(v.device for v in inputs.values() if isinstance(v, Tensor)))
    no_text = (drops == NO_TEXT).to(no_image.device)
    for key in ("image_states", "pixel_values"):
        if key in out and out[key] is not None and bool(no_image.any()):
            image = out[key]
            out[key] = image.masked_fill(no_image.view(-1, *([1] * (image.dim() - 1))), 0.0)
    if not bool(no_text.any()):
        return out
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = len(empty.input_ids)
    width = max(ids.shape[1], length)
    ids, mask = _pad_width(ids, width), _pad_width(mask, width)
    empty_ids = torch.zeros(width, dtype=ids.dtype, device=ids.device)
    empty_ids[:length] = empty.input_ids.to(ids.device, ids.dtype)
    empty_mask = torch.zeros(width, dtype=mask.dtype, device=mask.device)
    empty_mask[:length] = 1
    rows = no_text.view(-1, 1)
    out["input_ids"] = torch.where(rows, empty_ids, ids)
    out["attention_mask"] = torch.where(rows, empty_mask, mask)
    if inputs.get("text_states") is not None:
        if empty.states is None:
            raise ValueError("drop_modalities: the batch carries text states but the empty question has none")
        states = _pad_width(inputs["text_states"], width)
        empty_states = states.new_zeros(width, states.shape[-1])
        empty_states[:length] = empty.states.to(states.device, states.dtype)
        out["text_states"] = torch.where(rows.unsqueeze(-1), empty_states, states)
    return out
