"""merged_transformer (ViLT): length limits, ViLT's pooler, prefix-LM, one SDPA call per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusionzoo.fusions.merged_transformer import MergedTransformerFusion
from fusionzoo.layers import KVCache

B, T, N, DT, DI, D = 2, 5, 4, 12, 10, 16


def setup(**kw) -> tuple[MergedTransformerFusion, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MergedTransformerFusion(DT, DI, dim=D, num_layers=3, **kw).eval()
    return model, torch.randn(B, T, DT), torch.ones(B, T, dtype=torch.bool), torch.randn(B, N, DI)


def test_length_limits_are_clear_errors() -> None:
    model, text, mask, image = setup(max_text_len=4, max_image_tokens=3)
    with pytest.raises(ValueError, match="max_text_len=4"):
        model(text, mask, image[:, :3])
    with pytest.raises(ValueError, match="max_image_tokens=3"):
        model(text[:, :4], mask[:, :4], image)
    cache = KVCache()
    model(text[:, :4], mask[:, :4], image[:, :3], causal=True, cache=cache)
    with pytest.raises(ValueError, match="max_text_len=4"):  # growing past the table while decoding
        model(text[:, 4:5], mask, image[:, :3], causal=True, cache=cache)


def test_pooler_is_tanh_linear_of_the_first_text_token() -> None:
    model, text, mask, image = setup()
    with torch.no_grad():
        out = model(text, mask, image)
        assert torch.allclose(out.pooled, torch.tanh(model.pooler(out.text_tokens[:, 0])), atol=1e-6)
    assert out.image_tokens.shape == (B, N, D)


def test_causal_is_a_prefix_lm() -> None:
    model, text, mask, image = setup()
    with torch.no_grad():
        a = model(text, mask, image, causal=True)
        b = model(torch.randn(B, T, DT), mask, image, causal=True)
    assert torch.allclose(a.image_tokens, b.image_tokens, atol=1e-6)  # image never reads text


def test_one_attention_call_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model, text, mask, image = setup()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    cache = KVCache()
    with torch.no_grad():
        for kwargs in ({}, {"causal": True}):
            calls.clear()
            model(text, mask, image, **kwargs)
            assert len(calls) == len(model.layers)
        calls.clear()
        model(text[:, :2], mask[:, :2], image, causal=True, cache=cache)
        model(text[:, 2:3], mask[:, :3], image, causal=True, cache=cache)
    assert len(calls) == 2 * len(model.layers)
