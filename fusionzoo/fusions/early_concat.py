"""Early fusion by concatenation: join the two modalities' features, then an MLP.

Follows the concatenation baseline of multimodal deep learning (Ngiam et al.,
"Multimodal Deep Learning", ICML 2011) as used for VQA by Antol et al. ("VQA:
Visual Question Answering", ICCV 2015, whose "deeper LSTM Q + norm I" model
joins the question and image vectors before an MLP), with concatenation instead
of the element-wise product:

* text tokens (B, T, Dt) and image tokens (B, N, Di) are projected to ``dim``;
* ``pooled = MLP([text_pooled; image_pooled])``;
* each text position gets ``MLP([text_t; image_pooled])``.

With ``num_layers > 0`` a small Transformer then runs over the per-token states
concatenated with the projected image tokens (keys ordered ``[image; text]``),
and ``text_pooled`` / ``image_pooled`` of the joint vector pool its outputs.

Causal mode (caption decoding) is a prefix-LM: text position t sees the image
and text positions <= t; image tokens see only image tokens, never text, so the
image side is computed once and kept in the cache. The per-token MLP reads only
the *image* summary, so no text pooling feeds a text position.

Built for one kind of head (``head_reads``, see :mod:`fusionzoo.fusions.base`):

* ``"text_tokens"`` (captioning): no ``pool_mlp``; ``pooled`` is the masked mean
  of ``text_tokens`` over the positions so far.
* ``"pooled"`` (VQA, classification) without Transformer layers: no ``token_mlp``;
  ``text_tokens`` are the projected text states, not mixed with the image. (With
  layers the per-token states feed the Transformer, so everything is built.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import (
    MLP,
    KVCache,
    TransformerLayer,
    all_valid,
    init_weights,
    key_mask,
    masked_mean,
    prefix_causal_mask,
    running_masked_mean,
)
from ..registry import register_fusion
from .base import FusionModule, FusionOutput


class EarlyConcatFusion(FusionModule):
    """Concatenate text and image features and mix them with MLPs (optionally a Transformer).

    Args:
        text_dim: width Dt of the text token states.
        image_dim: width Di of the image token states.
        dim: fused width (``out_dim``).
        num_layers: Transformer layers over ``[image tokens; per-token states]``;
            0 (the default) keeps the pure MLP fusion.
        num_heads: attention heads of those layers.
        mlp_ratio: hidden width of every MLP as a multiple of ``dim``.
        dropout: dropout after the projections and inside the MLPs and layers.
        head_reads: what the head reads (:data:`~fusionzoo.fusions.base.HEAD_READS`);
            the MLP that feeds nothing it reads is not built (module docstring).
    """

    supports_head_reads = True

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        *,
        dim: int = 256,
        num_layers: int = 0,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        head_reads: str = "all",
    ) -> None:
        super().__init__(
            text_dim, image_dim, dim=dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dropout=dropout, head_reads=head_reads,
        )
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.head_reads = self.check_head_reads(head_reads)
        hidden = int(dim * mlp_ratio)
        self.out_dim = dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.drop = nn.Dropout(dropout)
        # [text_t; image_pooled] -> dim: the text-position states, and the Transformer's input.
        needs_tokens = head_reads != "pooled" or num_layers > 0
        self.token_mlp = MLP(2 * dim, hidden, dim, dropout=dropout) if needs_tokens else None
        # [text_pooled; image_pooled] -> dim: the joint vector.
        self.pool_mlp = MLP(2 * dim, hidden, dim, dropout=dropout) if head_reads != "text_tokens" else None
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, mlp_ratio, dropout=dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim) if num_layers > 0 else None
        init_weights(self)

    def forward(
        self,
        text: Tensor,
        text_mask: Tensor,
        image: Tensor,
        image_mask: Tensor | None = None,
        *,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> FusionOutput:
        """
        Args:
            text: (B, T, Dt) text token states (with a cache: the T new positions).
            text_mask: (B, T) bool, True = real token (with a cache: all positions so far).
            image: (B, N, Di) image token states.
            image_mask: (B, N) bool or None (no image padding).
            causal: prefix-LM decoding (see the module docstring).
            cache: for incremental decoding; advanced by T.
        Returns:
            FusionOutput with text_tokens (B, T, dim), pooled (B, dim) and, with
            ``num_layers > 0``, image_tokens (B, N, dim). Built for one head
            (``head_reads``), the output it does not read is parameter-free (module docstring).
        """
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        num_new = text.shape[1]
        new_mask = text_mask[:, offset:]  # (B, T) validity of the new positions
        image_valid = image_mask if image_mask is not None else all_valid(image)  # (B, N)
        first = cache is None or offset == 0

        t = self.drop(self.text_proj(text))  # (B, T, D)
        if first:
            v = self.drop(self.image_proj(image))  # (B, N, D)
            image_summary = masked_mean(v, image_valid)  # (B, D)
            if cache is not None:
                cache.state["early_concat.image_summary"] = image_summary
        else:
            image_summary = cache.state["early_concat.image_summary"]
        if self.token_mlp is None:
            h = t  # built for a head that reads only `pooled`: the projected text states
        else:
            h = self.token_mlp(torch.cat([t, image_summary[:, None].expand_as(t)], dim=-1))  # (B, T, D)

        if len(self.layers) == 0:
            if self.pool_mlp is None:  # built for a head that reads only the text-position states
                pooled = running_masked_mean(h, new_mask, cache, "early_concat.text")  # (B, D)
            else:
                text_pooled = running_masked_mean(t, new_mask, cache, "early_concat.text")  # (B, D)
                pooled = self.pool_mlp(torch.cat([text_pooled, image_summary], dim=-1))  # (B, D)
            if cache is not None:
                cache.offset += num_new
            return FusionOutput(text_tokens=h, pooled=pooled)

        # Joint Transformer over [image tokens; per-token states] (image first so
        # that cached keys are [image; text 0..S-1] at every step).
        n = image.shape[1]
        if first:
            x = torch.cat([v, h], dim=1)  # (B, N + T, D)
            if causal:
                mask = prefix_causal_mask(image_valid, text_mask, num_new, offset)  # (B, 1, N+T, N+T)
            else:
                mask = key_mask(torch.cat([image_valid, text_mask], dim=1))  # (B, 1, 1, N+T)
        else:
            x = h  # (B, T, D): only the new text positions
            mask = prefix_causal_mask(image_valid, text_mask, num_new, offset, prefix_queries=False)
        for layer in self.layers:
            x = layer(x, mask, cache=cache)
        x = self.norm(x)

        if first:
            image_tokens, text_tokens = x[:, :n], x[:, n:]  # (B, N, D), (B, T, D)
            image_pooled = masked_mean(image_tokens, image_valid)  # (B, D)
            if cache is not None:
                cache.state["early_concat.image_tokens"] = image_tokens
                cache.state["early_concat.image_pooled"] = image_pooled
        else:
            text_tokens = x
            image_tokens = cache.state["early_concat.image_tokens"]
            image_pooled = cache.state["early_concat.image_pooled"]
        text_pooled = running_masked_mean(text_tokens, new_mask, cache, "early_concat.text")  # (B, D)
        if self.pool_mlp is None:  # built for a head that reads only the text-position states
            pooled = text_pooled
        else:
            pooled = self.pool_mlp(torch.cat([text_pooled, image_pooled], dim=-1))  # (B, D)
        if cache is not None:
            cache.offset += num_new
        return FusionOutput(text_tokens=text_tokens, pooled=pooled, image_tokens=image_tokens)


register_fusion("early_concat")(EarlyConcatFusion)
