"""early_concat: the MLP-only equations, and the optional joint Transformer."""

from __future__ import annotations

import pytest
import torch

from fusionzoo.fusions.early_concat import EarlyConcatFusion
from fusionzoo.layers import masked_mean

B, T, N, DT, DI = 2, 5, 4, 12, 10


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    image_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    return torch.randn(B, T, DT), text_mask, torch.randn(B, N, DI), image_mask


def test_mlp_only_is_the_default_and_matches_the_equations() -> None:
    torch.manual_seed(0)
    model = EarlyConcatFusion(DT, DI, dim=16).eval()
    assert model.config["num_layers"] == 0 and len(model.layers) == 0
    text, text_mask, image, image_mask = inputs()
    with torch.no_grad():
        out = model(text, text_mask, image, image_mask)
        t, v = model.text_proj(text), model.image_proj(image)
        t_bar, v_bar = masked_mean(t, text_mask), masked_mean(v, image_mask)
        pooled = model.pool_mlp(torch.cat([t_bar, v_bar], dim=-1))
        tokens = model.token_mlp(torch.cat([t, v_bar[:, None].expand(B, T, -1)], dim=-1))
    assert out.image_tokens is None
    assert torch.allclose(out.pooled, pooled, atol=1e-6)
    assert torch.allclose(out.text_tokens, tokens, atol=1e-6)


def test_transformer_variant_returns_image_tokens_and_keeps_the_image_causal_prefix() -> None:
    torch.manual_seed(0)
    model = EarlyConcatFusion(DT, DI, dim=16, num_layers=2).eval()
    text, text_mask, image, image_mask = inputs()
    other_text = torch.randn(B, T, DT)
    with torch.no_grad():
        a = model(text, text_mask, image, image_mask, causal=True)
        b = model(other_text, text_mask, image, image_mask, causal=True)
        c = model(other_text, text_mask, image, image_mask, causal=False)
    assert a.image_tokens is not None and a.image_tokens.shape == (B, N, 16)
    # Prefix-LM: in causal mode image tokens never read text ...
    assert torch.allclose(a.image_tokens, b.image_tokens, atol=1e-6)
    # ... and in the non-causal mode they do.
    assert not torch.allclose(b.image_tokens, c.image_tokens, atol=1e-4)


def test_negative_num_layers_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        EarlyConcatFusion(DT, DI, num_layers=-1)
