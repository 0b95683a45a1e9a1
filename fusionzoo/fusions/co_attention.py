"""Two-stream co-attention fusion (ViLBERT / METER).

Follows the co-attention encoder of METER (Dou et al., "An Empirical Study of
Training End-to-End Vision-and-Language Transformers", CVPR 2022), the
two-stream design introduced by ViLBERT (Lu et al., NeurIPS 2019): a text
stream and an image stream of ``num_layers`` layers each. In every layer

* the text layer runs self-attention, cross-attention to the image stream's
  states, then an MLP;
* the image layer runs self-attention, cross-attention to the text stream's
  states, then an MLP;

and both cross-attentions read the other stream's states from the previous
layer (the layer inputs), so the two streams advance together. Each stream
ends with a LayerNorm, and ``pooled = Linear([text masked mean; image mean])``
(METER concatenates the two streams' pooled vectors).

Causal mode (caption decoding): text self-attention is causal, and the image
stream cross-attends only to text position 0, the BOS token every caption
starts with, so no text position can see a later one through the image. That
position is read whatever its mask says, so causal decoding expects text
position 0 to be a real token. The image stream is then computed once, at the
first decoding step, and kept in the cache.

Built for a head that reads only ``text_tokens`` (``head_reads="text_tokens"``,
captioning; see :mod:`fusionzoo.fusions.base`), the parts that only make the
image outputs and ``pooled`` are not built: the last layer's image layer (the
text stream never reads its output), the image LayerNorm and the pooling Linear.
``image_tokens`` is then None and ``pooled`` the text stream's masked mean.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import (
    KVCache,
    TransformerLayer,
    causal_self_mask,
    init_weights,
    key_mask,
    masked_mean,
    running_masked_mean,
)
from ..registry import register_fusion
from ..rollout import ImageRelevance, identity_rows, mix
from .base import FusionModule, FusionOutput


class CoAttentionLayer(nn.Module):
    """One co-attention layer: a text and an image Transformer layer, each with cross-attention.

    ``with_image=False`` leaves the image layer out (``image`` is None): the image
    stream then passes through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, with_image: bool = True) -> None:
        super().__init__()
        self.text = TransformerLayer(dim, num_heads, mlp_ratio, context_dim=dim, dropout=dropout)
        self.image = (
            TransformerLayer(dim, num_heads, mlp_ratio, context_dim=dim, dropout=dropout) if with_image else None
        )


class CoAttentionFusion(FusionModule):
    """Two streams exchanging information through cross-attention in every layer.

    Args:
        text_dim: width Dt of the text token states.
        image_dim: width Di of the image token states.
        dim: width of both streams (``out_dim``).
        num_layers: co-attention layers (each one text and one image layer).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout after the projections and inside the layers.
        head_reads: what the head reads (:data:`~fusionzoo.fusions.base.HEAD_READS`);
            ``"text_tokens"`` leaves out what only feeds the image outputs and
            ``pooled`` (module docstring).
    """

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
        head_reads: str = "all",
    ) -> None:
        super().__init__(
            text_dim, image_dim, dim=dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dropout=dropout, head_reads=head_reads,
        )
        if num_layers < 1:
            raise ValueError(f"co_attention needs num_layers >= 1, got {num_layers}")
        self.head_reads = self.check_head_reads(head_reads)
        image_outputs = head_reads != "text_tokens"  # image_tokens and pooled are read
        self.out_dim = dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.drop = nn.Dropout(dropout)
        # The text stream reads each image layer's input, so only the last image layer can go unread.
        self.layers = nn.ModuleList(
            CoAttentionLayer(dim, num_heads, mlp_ratio, dropout, with_image=image_outputs or i < num_layers - 1)
            for i in range(num_layers)
        )
        self.text_norm = nn.LayerNorm(dim)
        self.image_norm = nn.LayerNorm(dim) if image_outputs else None
        self.pool = nn.Linear(2 * dim, dim) if image_outputs else None  # [text pooled; image pooled] -> joint vector
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
            image_mask: (B, N) bool or None.
            causal: caption decoding (see the module docstring).
            cache: for incremental decoding; advanced by T.
        Returns:
            FusionOutput with text_tokens (B, T, D), image_tokens (B, N, D), pooled (B, D);
            built with ``head_reads="text_tokens"``, image_tokens None and pooled (B, D)
            the masked mean of text_tokens.
        """
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        num_new = text.shape[1]
        new_mask = text_mask[:, offset:]  # (B, T)
        text_self = causal_self_mask(text_mask, num_new, offset) if causal else key_mask(text_mask)
        image_keys = key_mask(image_mask)  # (B, 1, 1, N) or None

        t = self.drop(self.text_proj(text))  # (B, T, D)
        if cache is None or offset == 0:
            v = self.drop(self.image_proj(image))  # (B, N, D)
            for i, layer in enumerate(self.layers):
                if cache is not None:  # the image state this text layer reads, kept for later steps
                    cache.state[f"co_attention.image_{i}"] = v
                if causal:
                    context, context_mask = t[:, :1], None  # BOS only: (B, 1, D)
                else:
                    context, context_mask = t, key_mask(text_mask)  # (B, T, D), (B, 1, 1, T)
                t, v = (
                    layer.text(t, text_self, v, image_keys, cache=cache),
                    v if layer.image is None else layer.image(v, image_keys, context, context_mask),
                )
            image_tokens = image_pooled = None  # built for a head that reads only text_tokens
            if self.image_norm is not None:
                image_tokens = self.image_norm(v)  # (B, N, D)
                image_pooled = masked_mean(image_tokens, image_mask)  # (B, D)
                if cache is not None:
                    cache.state["co_attention.image_tokens"] = image_tokens
                    cache.state["co_attention.image_pooled"] = image_pooled
        else:
            # Later decoding steps: the image stream is done; the text layers' cross-attention
            # keys/values were cached at the first step from these same image states.
            for i, layer in enumerate(self.layers):
                t = layer.text(t, text_self, cache.state[f"co_attention.image_{i}"], image_keys, cache=cache)
            image_tokens = cache.state.get("co_attention.image_tokens")
            image_pooled = cache.state.get("co_attention.image_pooled")

        text_tokens = self.text_norm(t)  # (B, T, D)
        text_pooled = running_masked_mean(text_tokens, new_mask, cache, "co_attention.text")  # (B, D)
        if self.pool is None:
            pooled = text_pooled  # built for a head that reads only text_tokens
        else:
            pooled = self.pool(torch.cat([text_pooled, image_pooled], dim=-1))  # (B, D)
        if cache is not None:
            cache.offset += num_new
        return FusionOutput(text_tokens=text_tokens, pooled=pooled, image_tokens=image_tokens)

    def attention_rollout(self, attention: dict[nn.Module, Tensor], text_mask: Tensor,
                          image_mask: Tensor | None = None, causal: bool = False) -> ImageRelevance:
        """Rollout over the inputs ``[text (T); image (N)]``, one relevance matrix per stream.

        Each layer's text layer mixes in its self-attention and its cross-attention to the image
        stream's layer input; the image layer likewise, reading the text stream's layer input
        (text position 0 alone when ``causal``). ``pooled`` mixes the two streams' means in
        equal parts (the pooling Linear sees them side by side); built without the image
        outputs, it is the text stream's mean.

        Args:
            attention: what :func:`~fusionzoo.rollout.record_attention` recorded over one
                forward without a cache.
            text_mask: (B, T) the text mask of that forward; ``image_mask`` (B, N) or None.
            causal: whether that forward was causal.
        """
        b, t = text_mask.shape
        n = attention[self.layers[0].text.cross_attn].shape[-1]
        like = attention[self.layers[0].text.self_attn]
        text = identity_rows(b, t, t + n, 0, like)  # (B, T, T+N)
        image = identity_rows(b, n, t + n, t, like)  # (B, N, T+N)
        for layer in self.layers:
            new_text = mix(text, attention[layer.text.self_attn], text)
            new_text = mix(new_text, attention[layer.text.cross_attn], image)
            if layer.image is not None:
                image = mix(image, attention[layer.image.self_attn], image)
                image = mix(image, attention[layer.image.cross_attn], text[:, :1] if causal else text)
            text = new_text
        pooled = masked_mean(text, text_mask.bool())  # (B, T+N)
        if self.pool is not None:
            pooled = 0.5 * pooled + 0.5 * masked_mean(image, image_mask)
        return ImageRelevance(text_tokens=text[:, :, t:], pooled=pooled[:, t:])


register_fusion("co_attention")(CoAttentionFusion)
