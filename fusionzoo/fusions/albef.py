"""ALBEF: align the unimodal summaries with a contrastive loss, then fuse with cross-attention.

Follows Li et al., "Align before Fuse: Vision and Language Representation
Learning with Momentum Distillation" (NeurIPS 2021). ALBEF has three parts, and
this module keeps its two fusion-side ones on top of the zoo's encoders:

1. **Unimodal streams.** The image token states are projected to ``dim`` (the
   image stream, ALBEF's ViT output); so are the text token states.
2. **Alignment (ITC).** An image summary (the masked mean of the image stream,
   or its first token, e.g. a ViT's [CLS], with ``image_summary="first"``) and a
   text summary (the [CLS] state, text position 0) are each mapped by a Linear
   to ``embed_dim`` and L2-normalised; a learnable temperature (ALBEF: initial
   0.07, kept in [0.001, 0.5]) scales their similarities. In causal mode the
   text summary is the masked mean of the text stream instead, since position
   0 then sees nothing but itself; it only feeds the loss, never a prediction.
3. **Fusion encoder.** ``num_layers`` Transformer layers in which the text
   self-attends (causally if asked) and cross-attends to the image stream
   (ALBEF's multimodal encoder, the last six BERT layers with cross-attention).
   A final LayerNorm closes the pre-norm stack.

Outputs: ``text_tokens`` the fused text states, ``pooled`` the fused first-token
([CLS]) state, ``image_tokens`` the projected image stream, and in ``aux``:

* ``image_embed`` (B, embed_dim): unit-norm ITC image embedding;
* ``text_embed`` (B, embed_dim): unit-norm ITC text embedding;
* ``temperature`` (): the clamped ITC temperature.

:meth:`AlbefFusion.aux_loss` turns them into ``{"itc": itc_weight * ITC}``, the
symmetric InfoNCE over the in-batch pairs, so fine-tuning keeps the summaries
aligned and trains the ITC projections and the temperature. (ALBEF's ITM and
MLM pre-training losses and the hard-negative sampler live in
:mod:`fusionzoo.losses`.)

Incremental decoding (``cache``): the image stream, its ITC embedding and the
cross-attention keys/values are computed at the first step and kept; each step
runs the new text positions only. ``pooled`` is the first position's fused
state, which in causal mode never changes after the first step, and the causal
text summary is a running mean over the positions so far.

The temperature is clamped with a straight-through estimator: its value is
``clamp(t, 0.001, 0.5)`` but the gradient reaches the raw parameter even out of
range, so it can come back (ALBEF clamps the parameter in place instead, a side
effect this module avoids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..alignment import MAX_TEMPERATURE, MIN_TEMPERATURE, clamp_straight_through
from ..layers import (
    KVCache,
    TransformerLayer,
    causal_self_mask,
    init_weights,
    key_mask,
    masked_mean,
    running_masked_mean,
)
from ..losses import itc_loss
from ..registry import register_fusion
from ..rollout import ImageRelevance, identity_rows, mix
from .base import FusionModule, FusionOutput

IMAGE_SUMMARIES = ("mean", "first")
TEXT_SUMMARIES = ("first", "mean")


class AlbefFusion(FusionModule):
    """ALBEF's contrastive alignment of the unimodal summaries plus a cross-attention encoder.

    Args:
        text_dim: width Dt of the text token states.
        image_dim: width Di of the image token states.
        dim: width of both streams and of the fusion encoder (``out_dim``).
        embed_dim: width E of the ITC embeddings (ALBEF: 256).
        num_layers: fusion-encoder layers (ALBEF: 6).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout after the projections and inside the layers.
        temperature: initial ITC temperature, in [0.001, 0.5] (ALBEF: 0.07).
        itc_weight: weight of the ITC loss that :meth:`aux_loss` returns; 0 turns it off.
        image_summary: ``"mean"`` (masked mean of the image stream, for any
            encoder) or ``"first"`` (the first image token, a ViT's [CLS] as in ALBEF).
        text_summary: ``"first"`` (the [CLS] state, as in ALBEF) or ``"mean"`` (the
            masked mean of the text stream, for a mean-pooled sentence encoder such
            as all-MiniLM-L6-v2). Causal mode always uses the running mean.

    It aligns its own streams (``aligns``): :meth:`embed_images`, :meth:`embed_texts`
    and :meth:`itc_temperature` give what ``aux`` holds, without running the fusion
    encoder, so a retrieval model embeds a gallery with them.
    """

    aligns = True

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        *,
        dim: int = 256,
        embed_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        temperature: float = 0.07,
        itc_weight: float = 0.1,
        image_summary: str = "mean",
        text_summary: str = "first",
    ) -> None:
        super().__init__(
            text_dim, image_dim, dim=dim, embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dropout=dropout, temperature=temperature, itc_weight=itc_weight,
            image_summary=image_summary, text_summary=text_summary,
        )
        if num_layers < 1:
            raise ValueError(f"albef needs num_layers >= 1 (the fusion encoder), got {num_layers}")
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}")
        if itc_weight < 0:
            raise ValueError(f"itc_weight must be >= 0, got {itc_weight}")
        if image_summary not in IMAGE_SUMMARIES:
            raise ValueError(f"image_summary must be one of {IMAGE_SUMMARIES}, got {image_summary!r}")
        if text_summary not in TEXT_SUMMARIES:
            raise ValueError(f"text_summary must be one of {TEXT_SUMMARIES}, got {text_summary!r}")
        self.out_dim = dim
        self.embed_dim = embed_dim
        self.itc_weight = itc_weight
        self.image_summary = image_summary
        self.text_summary = text_summary

        # Unimodal streams.
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.drop = nn.Dropout(dropout)
        # ITC projections and temperature.
        self.text_itc = nn.Linear(dim, embed_dim)
        self.image_itc = nn.Linear(dim, embed_dim)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        # Fusion encoder: text self-attention, cross-attention to the image, MLP.
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, mlp_ratio, context_dim=dim, dropout=dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
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
            causal: caption decoding: text position t sees text <= t and the image.
            cache: for incremental decoding; advanced by T.
        Returns:
            FusionOutput with text_tokens (B, T, D), pooled (B, D), image_tokens
            (B, N, D) and aux ``image_embed`` (B, E), ``text_embed`` (B, E),
            ``temperature`` ().
        """
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        num_new = text.shape[1]
        new_mask = text_mask[:, offset:]  # (B, T)

        # 1. Image stream and its ITC embedding: once per decoding.
        if cache is None or offset == 0:
            image_tokens = self.drop(self.image_proj(image))  # (B, N, D)
            image_embed = self._image_embed(image_tokens, image_mask)  # (B, E)
            if cache is not None:
                cache.state["albef.image_tokens"] = image_tokens
                cache.state["albef.image_embed"] = image_embed
        else:
            image_tokens = cache.state["albef.image_tokens"]  # (B, N, D); cross-attention K/V are cached too
            image_embed = cache.state["albef.image_embed"]  # (B, E)

        # 2. Text stream and its ITC embedding.
        x = self.drop(self.text_proj(text))  # (B, T, D)
        if causal:
            text_summary = running_masked_mean(x, new_mask, cache, "albef.text_summary")  # (B, D)
            text_embed = F.normalize(self.text_itc(text_summary), dim=-1)  # (B, E)
        else:
            text_embed = self._text_embed(x, new_mask)  # (B, E)

        # 3. Fusion encoder: text attends to itself and to the image.
        self_mask = causal_self_mask(text_mask, num_new, offset) if causal else key_mask(text_mask)
        image_keys = key_mask(image_mask)  # (B, 1, 1, N) or None
        for layer in self.layers:
            x = layer(x, self_mask, image_tokens, image_keys, cache=cache)  # (B, T, D)
        text_tokens = self.norm(x)  # (B, T, D)

        pooled = text_tokens[:, 0]  # (B, D) fused [CLS] state
        if cache is not None:
            if offset == 0:
                cache.state["albef.pooled"] = pooled
            pooled = cache.state["albef.pooled"]
            cache.offset += num_new

        temperature = self.itc_temperature()  # ()
        aux = {"image_embed": image_embed, "text_embed": text_embed, "temperature": temperature}
        return FusionOutput(text_tokens=text_tokens, pooled=pooled, image_tokens=image_tokens, aux=aux)

    def attention_rollout(self, attention: dict[nn.Module, Tensor], text_mask: Tensor,
                          image_mask: Tensor | None = None, causal: bool = False) -> ImageRelevance:
        """Rollout over the inputs ``[text (T); image (N)]``: the text self-attends and cross-attends
        to the image stream, which mixes nothing (each image token is only itself).

        Args:
            attention: what :func:`~fusionzoo.rollout.record_attention` recorded over one
                forward without a cache: each layer's self (B, T, T) and cross (B, T, N) attention.
            text_mask: (B, T) the text mask of that forward.
        """
        b, t = text_mask.shape
        n = attention[self.layers[0].cross_attn].shape[-1]
        like = attention[self.layers[0].self_attn]
        text = identity_rows(b, t, t + n, 0, like)  # (B, T, T+N)
        image = identity_rows(b, n, t + n, t, like)  # (B, N, T+N)
        for layer in self.layers:
            text = mix(text, attention[layer.self_attn], text)
            text = mix(text, attention[layer.cross_attn], image)
        rows = text[:, :, t:]  # (B, T, N)
        return ImageRelevance(text_tokens=rows, pooled=rows[:, 0])  # pooled: the fused [CLS]

    # -- alignment without the fusion encoder -------------------------------------------
    def _image_embed(self, image_tokens: Tensor, image_mask: Tensor | None) -> Tensor:
        """(B, N, D) image stream -> (B, E) unit-norm ITC embedding."""
        if self.image_summary == "first":
            summary = image_tokens[:, 0]  # (B, D)
        else:
            summary = masked_mean(image_tokens, image_mask)  # (B, D)
        return F.normalize(self.image_itc(summary), dim=-1)

    def _text_embed(self, text_stream: Tensor, text_mask: Tensor) -> Tensor:
        """(B, T, D) bidirectional text stream -> (B, E) unit-norm ITC embedding."""
        summary = text_stream[:, 0] if self.text_summary == "first" else masked_mean(text_stream, text_mask.bool())
        return F.normalize(self.text_itc(summary), dim=-1)

    def embed_images(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """(B, N, Di) image tokens -> (B, E): ``aux["image_embed"]`` of :meth:`forward`, fusion encoder skipped."""
        return self._image_embed(self.drop(self.image_proj(image)), image_mask)

    def embed_texts(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """(B, T, Dt) text states -> (B, E): ``aux["text_embed"]`` of a non-causal :meth:`forward`."""
        return self._text_embed(self.drop(self.text_proj(text)), text_mask)

    def itc_temperature(self) -> Tensor:
        """The clamped ITC temperature () (``aux["temperature"]``)."""
        return clamp_straight_through(self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)

    def aux_loss(self, output: FusionOutput) -> dict[str, Tensor]:
        """``{"itc": itc_weight * ITC}`` on the in-batch pairs of ``output``; ``{}`` if ``itc_weight`` is 0.

        Args:
            output: what this module's :meth:`forward` returned for a batch of
                B matching (text, image) pairs.
        """
        if self.itc_weight == 0:
            return {}
        missing = [k for k in ("image_embed", "text_embed", "temperature") if k not in output.aux]
        if missing:
            raise ValueError(f"aux_loss needs the output of AlbefFusion.forward; its aux lacks {missing}")
        aux = output.aux
        return {"itc": self.itc_weight * itc_loss(aux["image_embed"], aux["text_embed"], aux["temperature"])}


register_fusion("albef")(AlbefFusion)
