"""Frozen-encoder features for the benchmark, and what the benchmark does with them after the cache.

Extraction lives in :mod:`fusionzoo.features.extract` (shared with training runs) and is
re-exported here: :func:`image_features` and :func:`text_features` go through
:class:`~fusionzoo.features.cache.FeatureCache` (the first run extracts and stores, later
runs memory-map what is stored).

After the cache, :func:`pool_image_tokens` and :func:`add_position_channels` give the image
tokens the fusions are fed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..features.extract import (  # noqa: F401
    FEATURE_DTYPE,
    image_features,
    image_preprocessing,
    text_features,
    text_preprocessing,
)
from .loop import as_tensor
from .suites import BenchError


# --------------------------------------------------------------------------------------
# After the cache: pooling and position channels
# --------------------------------------------------------------------------------------
def pool_image_tokens(tokens: np.ndarray | torch.Tensor, grid: int | None, chunk: int = 1024,
                      prefix_tokens: int = 0) -> torch.Tensor:
    """Average-pool square token grids (U, h*w, D) to (U, grid*grid, D), in the input's dtype.

    The cache keeps every token of the encoder's feature map; a run that wants
    fewer (easy-VQA's shapes fill the image, so where a colour sits does not
    matter) pools them once here, in memory. Pooling is the CNN's own global
    average pool done per region: ``grid=1`` gives its pooled vector as one token.

    With ``--train-encoders`` the same pooling runs inside the model, after the trained tail
    of the image encoder (:class:`~fusionzoo.bench.tails.EncoderTailsModel`): the result is on
    the device of ``tokens`` and carries gradients back to them.

    A ViT puts ``prefix_tokens`` class / register tokens (timm's ``num_prefix_tokens``) before its
    patches; they have no place in the grid, so a grid leaves them out (:func:`grid_note` says so).

    Args:
        tokens: image tokens: ``prefix_tokens`` of them, then a row-major h x h grid (the vision
            encoder's layout).
        grid: output side; None or 0 returns the tokens unchanged (prefix included), a grid not
            smaller than h the patch tokens unchanged.
        chunk: images pooled per step (bounds the float32 temporary).
        prefix_tokens: tokens ahead of the grid, dropped when there is a grid.
    """
    tokens = as_tensor(tokens) if isinstance(tokens, np.ndarray) else tokens
    if not grid:
        return tokens
    if prefix_tokens:
        tokens = tokens[:, prefix_tokens:]  # the patch grid
    count, side = tokens.shape[1], math.isqrt(tokens.shape[1])
    if grid >= side:
        return tokens
    if side * side != count:
        raise BenchError(f"cannot pool {count} image tokens (after {prefix_tokens} prefix tokens) to a {grid}x{grid} "
                         "grid: they are not a square grid; use --image-grid 0")
    out = torch.empty(tokens.shape[0], grid * grid, tokens.shape[2], dtype=tokens.dtype, device=tokens.device)
    for begin in range(0, tokens.shape[0], chunk):
        block = tokens[begin: begin + chunk].float()  # (u, h*w, D)
        block = block.transpose(1, 2).reshape(len(block), -1, side, side)  # (u, D, h, w)
        pooled = torch.nn.functional.adaptive_avg_pool2d(block, grid)  # (u, D, g, g)
        out[begin: begin + chunk] = pooled.flatten(2).transpose(1, 2).to(tokens.dtype)  # (u, g*g, D)
    return out


def grid_note(vision_name: str, tokens: int, prefix_tokens: int, grid: int | None) -> str | None:
    """The log line saying what :func:`pool_image_tokens` did to an encoder's ``tokens``, or None for nothing."""
    if not grid:
        return None
    side = math.isqrt(tokens - prefix_tokens)
    pooled = f"pooled its {side}x{side} patch grid to {grid}x{grid}" if grid < side else f"kept its {side}x{side} patch grid"
    if not prefix_tokens:
        return f"image tokens: --vision {vision_name} gives {tokens}; {pooled}" if grid < side else None
    return (f"image tokens: --vision {vision_name} gives {tokens}, {prefix_tokens} of them prefix tokens "
            f"(class / register, timm's num_prefix_tokens) that were dropped; {pooled}")


def add_position_channels(tokens: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Append fixed 2-D position channels to square token grids: (U, g*g, D) -> (U, g*g, D + 4F).

    A token at column ``i`` and row ``j`` of a ``g`` x ``g`` grid has centre
    ``x = (i + 0.5) / g`` and ``y = (j + 0.5) / g`` in [0, 1]; it gets
    ``sin(2^k pi x), cos(2^k pi x), sin(2^k pi y), cos(2^k pi y)`` for
    ``k = 0 .. F-1`` (Transformer-style sinusoids over the image, lowest frequency a
    half period across it). The lowest pair already orders tokens left to right
    (``cos(pi x)`` falls monotonically) and the dot product of two tokens' channels is
    ``sum_k cos(2^k pi dx) + cos(2^k pi dy)``, a function of their offset alone: what
    "left of", "closest to" and "furthest from" need. The same channels for every
    fusion, so a fusion without position embeddings of its own (co-attention, ALBEF,
    early concatenation) is fed the grid as well as one that has them (the merged
    Transformer). ``frequencies=0`` returns ``tokens`` unchanged.
    """
    if frequencies <= 0:
        return tokens
    count = tokens.shape[1]
    side = math.isqrt(count)
    if side * side != count:
        raise BenchError(f"cannot add 2-D positions to {count} image tokens: they are not a square grid")
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side  # (g,)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (g, g): row j, column i
    angles = (2.0 ** torch.arange(frequencies, dtype=torch.float64)) * math.pi  # (F,)
    ax, ay = x.reshape(-1, 1) * angles, y.reshape(-1, 1) * angles  # (g*g, F)
    channels = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).to(tokens.device, tokens.dtype)  # (g*g, 4F)
    return torch.cat([tokens, channels.expand(tokens.shape[0], -1, -1)], dim=2)

