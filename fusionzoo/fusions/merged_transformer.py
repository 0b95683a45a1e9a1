"""Single-stream (merged) Transformer over text and image tokens, after ViLT.

Follows ViLT (Kim, Son and Kim, "ViLT: Vision-and-Language Transformer Without
Convolution or Region Supervision", ICML 2021): text embeddings and image patch
embeddings each get a learned position embedding and a modality-type embedding
(0 = text, 1 = image), are concatenated into one sequence and run through one
stack of Transformer layers; a final LayerNorm, and the pooler is
``tanh(Linear(first text token))``. Here the "text embeddings" and "patches" are
the encoders' token states, projected to ``dim``.

The sequence is ordered ``[image; text]`` (ViLT orders text first). Attention
does not depend on the order (position and modality-type embeddings carry it);
image first keeps the cache simple: cached keys are ``[image; text 0..S-1]``.

Causal mode is a prefix-LM: text queries see the image and earlier text; image
queries see only image tokens. So the image part is computed once, at the first
decoding step (together with the first text tokens), and later steps run only
the new text positions. Every layer is one ``scaled_dot_product_attention`` call.

Built for a head that reads only ``text_tokens`` (``head_reads="text_tokens"``,
captioning; see :mod:`fusionzoo.fusions.base`) there is no pooler, and ``pooled``
is the pooler's input itself, the state at text position 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import (
    KVCache,
    Linear,
    TransformerLayer,
    all_valid,
    init_weights,
    key_mask,
    prefix_causal_mask,
)
from ..registry import register_fusion
from ..rollout import ImageRelevance, identity_rows, mix
from .base import FusionModule, FusionOutput

TEXT_TYPE, IMAGE_TYPE = 0, 1


class MergedTransformerFusion(FusionModule):
    """ViLT-style single-stream fusion.

    Args:
        text_dim: width Dt of the text token states.
        image_dim: width Di of the image token states.
        dim: Transformer width (``out_dim``).
        num_layers: Transformer layers.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout on the embeddings and inside the layers.
        max_text_len: size of the learned text position table.
        max_image_tokens: size of the learned image position table.
        head_reads: what the head reads (:data:`~fusionzoo.fusions.base.HEAD_READS`);
            ``"text_tokens"`` builds no pooler (module docstring).
    """

    supports_pooled_only = True
    supports_head_reads = True

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        *,
        dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        max_text_len: int = 128,
        max_image_tokens: int = 256,
        head_reads: str = "all",
    ) -> None:
        super().__init__(
            text_dim, image_dim, dim=dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dropout=dropout, max_text_len=max_text_len,
            max_image_tokens=max_image_tokens, head_reads=head_reads,
        )
        self.head_reads = self.check_head_reads(head_reads)
        self.out_dim = dim
        self.max_text_len = max_text_len
        self.max_image_tokens = max_image_tokens
        self.text_proj = Linear(text_dim, dim)
        self.text_pos = nn.Embedding(max_text_len, dim)
        self.image_proj = Linear(image_dim, dim)
        self.image_pos = nn.Embedding(max_image_tokens, dim)
        self.token_type = nn.Embedding(2, dim)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, mlp_ratio, dropout=dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.pooler = Linear(dim, dim) if head_reads != "text_tokens" else None
        init_weights(self)

    def _pooled(self, first: Tensor) -> Tensor:
        """The joint vector (B, D) from the state at text position 0 (B, D): ViLT's ``tanh(Linear(.))``,
        or that state itself when built without a pooler (``head_reads="text_tokens"``)."""
        return first if self.pooler is None else torch.tanh(self.pooler(first))

    def forward(
        self,
        text: Tensor,
        text_mask: Tensor,
        image: Tensor,
        image_mask: Tensor | None = None,
        *,
        causal: bool = False,
        cache: KVCache | None = None,
        pooled_only: bool = False,
    ) -> FusionOutput:
        """
        Args:
            text: (B, T, Dt) text token states (with a cache: the T new positions).
            text_mask: (B, T) bool, True = real token (with a cache: all positions so far).
            image: (B, N, Di) image token states.
            image_mask: (B, N) bool or None.
            causal: prefix-LM decoding (see the module docstring).
            cache: for incremental decoding; advanced by T.
            pooled_only: the caller reads ``pooled`` alone (a classification or VQA
                head; :class:`~fusionzoo.model.FusionModel` sets it): the last layer
                runs for the first text position only (about 1/6 less work at 6
                layers), and ``text_tokens`` is that position alone (B, 1, D), with
                no ``image_tokens``. Ignored in causal mode or with a cache.
        Returns:
            FusionOutput with text_tokens (B, T, D), image_tokens (B, N, D) and
            pooled (B, D) = tanh(Linear(state at text position 0)) (that state
            itself when built with ``head_reads="text_tokens"``).
        """
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        num_new, n = text.shape[1], image.shape[1]
        if offset + num_new > self.max_text_len:
            raise ValueError(
                f"text has {offset + num_new} positions but this fusion was built with "
                f"max_text_len={self.max_text_len}; build it with a larger max_text_len"
            )
        if n > self.max_image_tokens:
            raise ValueError(
                f"image has {n} tokens but this fusion was built with "
                f"max_image_tokens={self.max_image_tokens}; build it with a larger max_image_tokens"
            )
        image_valid = image_mask if image_mask is not None else all_valid(image)  # (B, N)
        first = cache is None or offset == 0

        # 1. Text: projected token states + learned position embedding.
        t = self.text_proj(text) + self.text_pos.weight[offset : offset + num_new]  # (B, T, D)
        # 2. Patches: projected image token states + learned position embedding
        #    (first step only; later decoding steps reuse the cached image keys).
        v = (self.image_proj(image) + self.image_pos.weight[:n]) if first else None  # (B, N, D)
        # 3. Modality-type embedding: 0 for text, 1 for the image.
        t = t + self.token_type.weight[TEXT_TYPE]
        v = (v + self.token_type.weight[IMAGE_TYPE]) if v is not None else None
        # 4. Concatenate into one sequence, image first, with its attention mask.
        if first:
            x = self.drop(torch.cat([v, t], dim=1))  # (B, N + T, D)
            if causal:
                mask = prefix_causal_mask(image_valid, text_mask, num_new, offset)  # (B, 1, N+T, N+T)
            else:
                mask = key_mask(torch.cat([image_valid, text_mask], dim=1))  # (B, 1, 1, N+T)
        else:
            x = self.drop(t)  # (B, T, D); cached keys are [image; earlier text]
            mask = prefix_causal_mask(image_valid, text_mask, num_new, offset, prefix_queries=False)

        if pooled_only and first and cache is None and not causal:
            # Only the pooler's input is wanted: the last layer runs for the [CLS] query alone.
            for layer in self.layers[:-1]:
                x = layer(x, mask)
            cls = self.norm(self.layers[-1].forward_queries(x, slice(n, n + 1), mask))  # (B, 1, D)
            return FusionOutput(text_tokens=cls, pooled=self._pooled(cls[:, 0]))
        for layer in self.layers:
            x = layer(x, mask, cache=cache)  # one attention call per layer
        x = self.norm(x)

        if first:
            image_tokens, text_tokens = x[:, :n], x[:, n:]  # (B, N, D), (B, T, D)
            pooled = self._pooled(text_tokens[:, 0])  # (B, D)
            if cache is not None:
                cache.state["merged_transformer.image_tokens"] = image_tokens
                cache.state["merged_transformer.pooled"] = pooled
        else:
            text_tokens = x
            image_tokens = cache.state["merged_transformer.image_tokens"]
            pooled = cache.state["merged_transformer.pooled"]
        if cache is not None:
            cache.offset += num_new
        return FusionOutput(text_tokens=text_tokens, pooled=pooled, image_tokens=image_tokens)

    def attention_rollout(self, attention: dict[nn.Module, Tensor], text_mask: Tensor,
                          image_mask: Tensor | None = None, causal: bool = False) -> ImageRelevance:
        """Rollout over the one sequence ``[image (N); text (T)]`` (:mod:`fusionzoo.rollout`).

        Args:
            attention: what :func:`~fusionzoo.rollout.record_attention` recorded over one
                forward without a cache or ``pooled_only``: every layer's (B, N+T, N+T).
            text_mask: (B, T) the text mask of that forward (``image_mask`` and ``causal`` are
                already in the recorded attention).
        """
        b, t = text_mask.shape
        first = attention[self.layers[0].self_attn]  # (B, N+T, N+T)
        n = first.shape[-1] - t
        relevance = identity_rows(b, n + t, n + t, 0, first)  # (B, N+T, N+T)
        for layer in self.layers:
            relevance = mix(relevance, attention[layer.self_attn], relevance)
        text_rows = relevance[:, n:, :n]  # (B, T, N)
        return ImageRelevance(text_tokens=text_rows, pooled=text_rows[:, 0])  # pooled: text position 0


register_fusion("merged_transformer")(MergedTransformerFusion)
