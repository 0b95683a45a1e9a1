"""attention_weighted: the modality weights are a softmax and pooled is their weighted sum."""

from __future__ import annotations

import torch

from fusionzoo.fusions.attention_weighted import AttentionWeightedFusion
from fusionzoo.layers import masked_mean

B, T, N, DT, DI, D = 3, 5, 4, 12, 10, 16


def test_weights_sum_to_one_and_pooled_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    model = AttentionWeightedFusion(DT, DI, dim=D).eval()
    text, image = torch.randn(B, T, DT), torch.randn(B, N, DI)
    text_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    with torch.no_grad():
        out = model(text, text_mask, image)
        t, v = model.text_proj(text), model.image_proj(image)  # (B, T, D), (B, N, D)
        text_summary, image_summary = masked_mean(t, text_mask), v.mean(dim=1)

        def score(x: torch.Tensor) -> torch.Tensor:  # w^T tanh(W x + b)
            return torch.tanh(x @ model.scorer.hidden.weight.T + model.scorer.hidden.bias) @ model.scorer.score.weight.T

        pair = torch.cat([score(text_summary), score(image_summary)], dim=-1).softmax(dim=-1)  # (B, 2)
        pooled = pair[:, :1] * text_summary + pair[:, 1:] * image_summary
        token_scores = torch.cat([score(t), score(image_summary)[:, None].expand(B, T, 1)], dim=-1)
        token_pair = token_scores.softmax(dim=-1)  # (B, T, 2)
        tokens = token_pair[..., :1] * t + token_pair[..., 1:] * image_summary[:, None]

    modality_weights, token_weights = out.aux["modality_weights"], out.aux["token_weights"]
    assert modality_weights.shape == (B, 2) and token_weights.shape == (B, T, 2)
    assert torch.allclose(modality_weights.sum(-1), torch.ones(B), atol=1e-6)
    assert torch.allclose(token_weights.sum(-1), torch.ones(B, T), atol=1e-6)
    assert ((modality_weights > 0) & (modality_weights < 1)).all()
    assert torch.allclose(modality_weights, pair, atol=1e-6)
    assert torch.allclose(out.pooled, pooled, atol=1e-6)
    assert torch.allclose(token_weights, token_pair, atol=1e-6)
    assert torch.allclose(out.text_tokens, tokens, atol=1e-6)


def test_token_weights_for_the_new_positions_only_with_a_cache() -> None:
    from fusionzoo.layers import KVCache

    torch.manual_seed(0)
    model = AttentionWeightedFusion(DT, DI, dim=D).eval()
    text, image, mask = torch.randn(B, T, DT), torch.randn(B, N, DI), torch.ones(B, T, dtype=torch.bool)
    cache = KVCache()
    with torch.no_grad():
        full = model(text, mask, image, causal=True)
        model(text[:, :3], mask[:, :3], image, causal=True, cache=cache)
        step = model(text[:, 3:4], mask[:, :4], image, causal=True, cache=cache)
    assert step.aux["token_weights"].shape == (B, 1, 2)
    assert torch.allclose(step.aux["token_weights"], full.aux["token_weights"][:, 3:4], atol=1e-6)
