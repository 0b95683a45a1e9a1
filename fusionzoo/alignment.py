"""Alignment: image and text embedded apart into one space, for contrastive training and retrieval.

Follows the image-text contrastive (ITC) half of ALBEF (Li et al., 2021, "Align
before Fuse": ``vision_proj`` / ``text_proj`` on the unimodal [CLS] states, a
learnable temperature) and of CLIP (Radford et al., 2021). Any zoo model gets it
this way, whatever its fusion:

1. **Summarise** each modality's token states: the masked mean (``"mean"``) or
   the first token (``"first"``, a ViT's or BERT's [CLS]). The default for text
   is the mean because the zoo's pretrained text encoder (all-MiniLM-L6-v2) was
   trained as a mean-pooled sentence embedder.
2. **Project** each summary with its own Linear to ``embed_dim`` and
   L2-normalise: ``embed_images`` and ``embed_texts`` give unit vectors (B, E).
3. **Scale** cosine similarities by a learnable temperature (initial 0.07, kept
   in [0.001, 0.5] as ALBEF does, with a straight-through clamp so that its
   gradient survives out of range).

A fusion that aligns its own streams (``FusionModule.aligns``, as ``albef``
does) offers the same three methods (``embed_images``, ``embed_texts``,
``itc_temperature``) and is used instead; the model then has no
:class:`Alignment`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import init_weights, masked_mean

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 0.5  # ALBEF's clamp range
SUMMARIES = ("mean", "first")


def clamp_straight_through(x: Tensor, low: float, high: float) -> Tensor:
    """``clamp(x, low, high)`` in value, identity in gradient."""
    return x.detach().clamp(low, high) + (x - x.detach())  # the second term is exactly 0 in value


def summarise(states: Tensor, mask: Tensor | None, how: str) -> Tensor:
    """(B, L, D) token states -> (B, D): their masked mean, or the first token."""
    if how == "first":
        return states[:, 0]
    return masked_mean(states, None if mask is None else mask.bool())


class Alignment(nn.Module):
    """ITC projections and temperature on top of the unimodal encoders' token states.

    Args:
        text_dim: width Dt of the text states.
        image_dim: width Di of the image tokens.
        embed_dim: width E of the unit-norm embeddings (ALBEF: 256).
        temperature: initial temperature, in [0.001, 0.5] (ALBEF and CLIP: 0.07).
        text_summary, image_summary: ``"mean"`` (masked mean) or ``"first"`` (first token).
    """

    def __init__(self, text_dim: int, image_dim: int, *, embed_dim: int = 256, temperature: float = 0.07,
                 text_summary: str = "mean", image_summary: str = "mean") -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}")
        for name, value in (("text_summary", text_summary), ("image_summary", image_summary)):
            if value not in SUMMARIES:
                raise ValueError(f"{name} must be one of {SUMMARIES}, got {value!r}")
        self.text_dim, self.image_dim, self.embed_dim = text_dim, image_dim, embed_dim
        self.text_summary, self.image_summary = text_summary, image_summary
        self.config: dict[str, Any] = {"embed_dim": embed_dim, "temperature": temperature,
                                       "text_summary": text_summary, "image_summary": image_summary}
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        init_weights(self)

    def embed_images(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """(B, N, Di) image tokens (and an optional (B, N) mask) -> (B, E) unit-norm embeddings."""
        return F.normalize(self.image_proj(summarise(image, image_mask, self.image_summary)), dim=-1)

    def embed_texts(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """(B, T, Dt) text states and their (B, T) mask -> (B, E) unit-norm embeddings."""
        return F.normalize(self.text_proj(summarise(text, text_mask, self.text_summary)), dim=-1)

    def itc_temperature(self) -> Tensor:
        """The clamped temperature () that divides the cosine similarities."""
        return clamp_straight_through(self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
