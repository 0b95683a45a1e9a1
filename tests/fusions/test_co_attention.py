"""co_attention: two streams; in causal mode the image stream reads only text position 0."""

from __future__ import annotations

import pytest
import torch

from fusionzoo.fusions.co_attention import CoAttentionFusion
from fusionzoo.layers import KVCache

B, T, N, DT, DI, D = 2, 5, 4, 12, 10, 16


def setup() -> tuple[CoAttentionFusion, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = CoAttentionFusion(DT, DI, dim=D, num_layers=2).eval()
    return model, torch.randn(B, T, DT), torch.ones(B, T, dtype=torch.bool), torch.randn(B, N, DI)


def test_causal_image_stream_reads_only_the_first_text_position() -> None:
    model, text, mask, image = setup()
    later = text.clone()
    later[:, 1:] = torch.randn(B, T - 1, DT)
    first = text.clone()
    first[:, 0] = torch.randn(B, DT)
    with torch.no_grad():
        ref = model(text, mask, image, causal=True).image_tokens
        assert ref.shape == (B, N, D)
        assert torch.allclose(ref, model(later, mask, image, causal=True).image_tokens, atol=1e-6)
        assert not torch.allclose(ref, model(first, mask, image, causal=True).image_tokens, atol=1e-4)
        # Without causal the image stream reads every text position.
        a, b = model(text, mask, image).image_tokens, model(later, mask, image).image_tokens
    assert not torch.allclose(a, b, atol=1e-4)


def test_the_image_stream_is_computed_once_when_decoding() -> None:
    model, text, mask, image = setup()
    cache = KVCache()
    with torch.no_grad():
        first = model(text[:, :2], mask[:, :2], image, causal=True, cache=cache)
        n_cached = len(cache)  # per text layer: self-attention and cross-attention keys/values
        second = model(text[:, 2:3], mask[:, :3], image, causal=True, cache=cache)
    assert n_cached == 2 * len(model.layers) == len(cache)
    assert second.image_tokens is first.image_tokens


def test_needs_at_least_one_layer() -> None:
    with pytest.raises(ValueError, match="num_layers >= 1"):
        CoAttentionFusion(DT, DI, num_layers=0)
