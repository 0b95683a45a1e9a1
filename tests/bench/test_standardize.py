"""StandardizedFusion and channel_stats: the frozen per-channel map in front of a benchmark fusion."""

from __future__ import annotations

import pytest
import torch

from fusionzoo.bench.standardize import STD_FLOOR, StandardizedFusion, channel_stats
from fusionzoo.fusions.early_concat import EarlyConcatFusion
from fusionzoo.fusions.merged_transformer import MergedTransformerFusion

DT, DI = 12, 20


def test_channel_stats_use_only_the_chosen_rows_and_real_tokens() -> None:
    torch.manual_seed(0)
    states = torch.randn(6, 4, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    mask = torch.rand(6, 4) > 0.3
    mask[:, 0] = True
    rows = torch.tensor([0, 2, 5])
    mean, std = channel_stats(states.half(), rows, mask, chunk=2)  # chunks and float16 input
    tokens = states.half().double()[rows][mask[rows]]  # (tokens, 3): the independent computation
    torch.testing.assert_close(mean, tokens.mean(0).float())
    torch.testing.assert_close(std, tokens.std(0, unbiased=False).float())
    with pytest.raises(ValueError, match="no tokens"):
        channel_stats(states, torch.tensor([], dtype=torch.long))


def test_wrapper_equals_the_inner_fusion_on_standardized_inputs() -> None:
    torch.manual_seed(0)
    inner = EarlyConcatFusion(DT, DI, dim=16).eval()
    t_mean, t_std, i_mean, i_std = torch.randn(DT), torch.rand(DT) + 0.5, torch.randn(DI), torch.rand(DI) + 0.5
    wrapped = StandardizedFusion(inner, t_mean, t_std, i_mean, i_std).eval()
    text, image = torch.randn(2, 5, DT), torch.randn(2, 3, DI)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    got = wrapped(text, mask, image)
    want = inner((text - t_mean) / (t_std + STD_FLOOR), mask, (image - i_mean) / (i_std + STD_FLOOR))
    torch.testing.assert_close(got.pooled, want.pooled)
    assert wrapped.out_dim == inner.out_dim and not wrapped.supports_pooled_only
    # No statistics: the side passes through unchanged.
    plain = StandardizedFusion(inner).eval()
    torch.testing.assert_close(plain(text, mask, image).pooled, inner(text, mask, image).pooled)


def test_bad_statistics_are_clear_errors() -> None:
    inner = EarlyConcatFusion(DT, DI, dim=16)
    with pytest.raises(ValueError, match="text_mean and text_std"):
        StandardizedFusion(inner, text_mean=torch.zeros(DT))
    with pytest.raises(ValueError, match=rf"image statistics must have shape \({DI},\)"):
        StandardizedFusion(inner, image_mean=torch.zeros(DI + 1), image_std=torch.ones(DI + 1))


def test_pooled_only_is_passed_to_a_fusion_that_takes_it() -> None:
    torch.manual_seed(0)
    inner = MergedTransformerFusion(DT, DI, dim=32, num_layers=2, num_heads=4, dropout=0.0).eval()
    wrapped = StandardizedFusion(inner, torch.zeros(DT), torch.ones(DT), torch.ones(DI), torch.full((DI,), 2.0))
    assert wrapped.supports_pooled_only
    text, image, mask = torch.randn(2, 5, DT), torch.randn(2, 4, DI), torch.ones(2, 5, dtype=torch.bool)
    full = wrapped(text, mask, image)
    fast = wrapped(text, mask, image, pooled_only=True)
    torch.testing.assert_close(fast.pooled, full.pooled)
    assert fast.text_tokens.shape == (2, 1, 32) and full.text_tokens.shape == (2, 5, 32)

