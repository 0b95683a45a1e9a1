"""One-modality reference rows of the benchmark: text only and image only.

Not fusions: each reads one modality and ignores the other, so the benchmark can
show how much of a score the question (or caption) alone explains -- the
language prior of VQA (Goyal et al., 2017, "Making the V in VQA Matter") -- and
how much the image alone does. They honour the fusion contract so the same
heads and training loop serve them, but they are deliberately *not* registered
in :data:`fusionzoo.FUSIONS`: ``create_model`` cannot build them and the
benchmark labels their rows ``reference``.

* :class:`TextOnlyReference` -- an MLP on each text state; pooled = the mean of
  the real positions (a running mean when decoding with a cache). For
  captioning it is an unconditional language model: the same caption for every
  image.
* :class:`ImageOnlyReference` -- an MLP on the mean image token, copied to
  every text position. For VQA it answers the most likely answer for the image
  whatever the question; for captioning every position predicts from the image
  alone (a bag of words, it cannot see its own prefix).
"""

from __future__ import annotations

from torch import Tensor

from ..fusions.base import FusionModule, FusionOutput
from ..layers import MLP, KVCache, init_weights, masked_mean, running_masked_mean

#: Row names of the references, in the order the report lists them.
TEXT_ONLY = "text_only"
IMAGE_ONLY = "image_only"


class TextOnlyReference(FusionModule):
    """Reads the text states only (see the module docstring).

    Args:
        text_dim, image_dim: encoder widths (``image_dim`` is unused).
        dim: output width.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout inside the MLP.
    """

    def __init__(self, text_dim: int, image_dim: int, *, dim: int = 256, mlp_ratio: float = 2.0,
                 dropout: float = 0.1, **ignored: object) -> None:
        super().__init__(text_dim, image_dim, dim=dim, mlp_ratio=mlp_ratio, dropout=dropout)
        self.out_dim = dim
        self.proj = MLP(text_dim, int(dim * mlp_ratio), dim, dropout=dropout)
        init_weights(self)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None, *,
                causal: bool = False, cache: KVCache | None = None) -> FusionOutput:
        """text (B, T, Dt), text_mask (B, T); the image is ignored. Returns text_tokens (B, T, D), pooled (B, D)."""
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        tokens = self.proj(text)  # (B, T, D), position by position: no look-ahead
        pooled = running_masked_mean(tokens, text_mask[:, offset:], cache, "text_only.pooled")  # (B, D)
        if cache is not None:
            cache.offset += text.shape[1]
        return FusionOutput(text_tokens=tokens, pooled=pooled)


class ImageOnlyReference(FusionModule):
    """Reads the image tokens only (see the module docstring).

    Args:
        text_dim, image_dim: encoder widths (``text_dim`` is unused).
        dim: output width.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout inside the MLP.
    """

    def __init__(self, text_dim: int, image_dim: int, *, dim: int = 256, mlp_ratio: float = 2.0,
                 dropout: float = 0.1, **ignored: object) -> None:
        super().__init__(text_dim, image_dim, dim=dim, mlp_ratio=mlp_ratio, dropout=dropout)
        self.out_dim = dim
        self.proj = MLP(image_dim, int(dim * mlp_ratio), dim, dropout=dropout)
        init_weights(self)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None, *,
                causal: bool = False, cache: KVCache | None = None) -> FusionOutput:
        """image (B, N, Di); the text only sets the number of positions T. Returns (B, T, D) and (B, D)."""
        self.check_inputs(text, text_mask, image, image_mask)
        self.check_step(text, text_mask, causal, cache)
        pooled = self.proj(masked_mean(image, image_mask))  # (B, D)
        tokens = pooled[:, None].expand(-1, text.shape[1], -1)  # (B, T, D): the same at every position
        if cache is not None:
            cache.offset += text.shape[1]
        return FusionOutput(text_tokens=tokens, pooled=pooled)


#: Reference name -> class (looked up by the benchmark next to :data:`fusionzoo.FUSIONS`).
REFERENCES: dict[str, type[FusionModule]] = {TEXT_ONLY: TextOnlyReference, IMAGE_ONLY: ImageOnlyReference}
