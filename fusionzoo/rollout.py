"""Attention rollout: how much each fused position draws on each image token, through the layers.

Follows Abnar and Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020): a
layer's attention, averaged over heads, mixed half and half with the identity for the
residual connection, ``0.5 * A + 0.5 * I``, and the layers multiplied. For two streams
(co-attention) and text that cross-attends to an image (ALBEF) the same rule runs over the
joint set of input tokens ``[text; image]``, as Chefer, Gur and Wolf do for bi-modal
Transformers ("Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021), with attention in place of their gradients:
each stream keeps a relevance matrix over the inputs, and an attention from stream a to
stream b adds ``A @ R_b`` to ``R_a`` (:func:`mix`).

* :func:`record_attention` hooks every :class:`~fusionzoo.layers.Attention` under a module
  and keeps the probabilities of its last call, head-averaged (B, L, S), recomputed from the
  call's own inputs (the layers use ``scaled_dot_product_attention``, which returns none).
* A fusion that can be explained by attention defines ``attention_rollout(attention,
  text_mask, image_mask, causal)`` and returns an :class:`ImageRelevance` built with
  :func:`mix`; fusions without one are explained by gradients (:mod:`fusionzoo.explain`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from .layers import Attention


@dataclass
class ImageRelevance:
    """What a fusion's ``attention_rollout`` returns: rows of relevance over the image tokens.

    Attributes:
        text_tokens: (B, T, N) how much the fused state at each text position draws on each
            image token (what caption word t+1 is read from).
        pooled: (B, N) the same for the pooled joint vector (what a VQA or classification
            head reads).
    """

    text_tokens: Tensor
    pooled: Tensor


def mix(relevance: Tensor, attention: Tensor, source: Tensor) -> Tensor:
    """One attention sub-layer with its residual: ``0.5 * relevance + 0.5 * attention @ source``.

    Args:
        relevance: (B, L, P) relevance of the L query positions over the P input tokens.
        attention: (B, L, S) head-averaged attention of those queries over S keys.
        source: (B, S, P) relevance of the keys over the input tokens.
    Returns:
        (B, L, P): rows still sum to what they summed to when every row of ``source`` does.
    """
    return 0.5 * relevance + 0.5 * attention @ source


def identity_rows(batch: int, rows: int, total: int, start: int, like: Tensor) -> Tensor:
    """(B, rows, total) relevance of ``rows`` input tokens over all ``total``: ones at ``start + i``."""
    out = like.new_zeros(batch, rows, total)
    out[:, torch.arange(rows), start + torch.arange(rows)] = 1.0
    return out


_SIGNATURE = inspect.signature(Attention.forward)


def attention_probabilities(module: Attention, x: Tensor, context: Tensor | None = None,
                            attn_mask: Tensor | None = None) -> Tensor:
    """(B, L, S) the head-averaged softmax of ``module`` for queries ``x`` over ``context`` (or ``x``).

    The same product, scale and mask as the module's ``scaled_dot_product_attention`` call;
    a query whose every key is masked gets a row of zeros.
    """
    b, l, _ = x.shape
    source = x if context is None else context
    q = module.q(x).view(b, l, module.num_heads, module.head_dim).transpose(1, 2)  # (B, H, L, Dh)
    k = module.k(source).view(b, source.shape[1], module.num_heads, module.head_dim).transpose(1, 2)  # (B, H, S, Dh)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(module.head_dim)  # (B, H, L, S)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask.bool(), float("-inf"))
    return torch.nan_to_num(scores.softmax(dim=-1), nan=0.0).mean(dim=1)  # (B, L, S)


@contextlib.contextmanager
def record_attention(root: nn.Module) -> Iterator[dict[nn.Module, Tensor]]:
    """Inside, every :class:`~fusionzoo.layers.Attention` under ``root`` records its probabilities.

    Yields a dict ``{attention module: (B, L, S)}`` filled by the forward passes run inside
    (a module called twice keeps its last call). Incremental decoding is not recorded: a
    call with a KV cache sees only part of its keys, so it is an error.
    """
    recorded: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
        call = {**{k: p.default for k, p in _SIGNATURE.parameters.items()}, **bound.arguments}
        if call["cache"] is not None:
            raise ValueError("record_attention follows whole forward passes; this one decodes with a KV cache")
        with torch.no_grad():
            recorded[module] = attention_probabilities(module, call["x"], call["context"], call["attn_mask"])

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in root.modules() if isinstance(m, Attention)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
