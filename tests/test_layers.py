"""Shared layers: the fast paths of ``linear`` and ``Attention`` compute what the plain ones do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusionzoo.layers import FEW_ROWS, WIDE_OUTPUT, Attention, linear


@pytest.mark.parametrize("rows", [1, 6, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_on_both_paths(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(WIDE_OUTPUT + 3, 8, requires_grad=True)  # wide: the weight @ x^T path for few rows
    b = torch.randn(WIDE_OUTPUT + 3, requires_grad=True) if bias else None
    x = torch.randn(rows, 1, 8, requires_grad=True)
    out, reference = linear(x, weight, b), F.linear(x, weight, b)
    assert out.shape == reference.shape == (rows, 1, WIDE_OUTPUT + 3)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, weight], grad)
    want = torch.autograd.grad(reference, [x, weight], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_fused_qkv_projection_equals_separate_linears() -> None:
    torch.manual_seed(0)
    attention = Attention(16, num_heads=4)
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    heads = lambda t: t.view(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attention.q(x)), heads(attention.k(x)), heads(attention.v(x))
    expected = attention.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attention(x, attn_mask=mask), expected)
    # Cross-attention: k and v from the context in one product.
    context = torch.randn(2, 3, 16)
    k = attention.k(context).view(2, 3, 4, 4).transpose(1, 2)
    v = attention.v(context).view(2, 3, 4, 4).transpose(1, 2)
    expected = attention.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attention(x, context), expected)


def test_bf16_attention_on_cpu_matches_fp32() -> None:
    torch.manual_seed(0)
    attention = Attention(32, num_heads=4)
    x = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(x)  # the math kernel (see Attention.forward)
    torch.testing.assert_close(low.float(), attention(x), atol=5e-2, rtol=5e-2)


def test_kv_cache_appends_in_place_grows_and_reorders() -> None:
    from fusionzoo.layers import KVCache

    torch.manual_seed(0)
    cache, owner = KVCache(), torch.nn.Linear(1, 1)
    steps = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 20, 1)]  # the 4th outgrows the first buffer
    for i, k in enumerate(steps):
        keys, values = cache.append(owner, k, -k)
        expected = torch.cat(steps[: i + 1], dim=2)
        torch.testing.assert_close(keys, expected)
        torch.testing.assert_close(values, -expected)
    index = torch.tensor([2, 2, 0])  # beam search: rows 2, 2, 0 survive
    cache.reorder(index)
    new = torch.randn(3, 2, 1, 4)
    keys, _ = cache.append(owner, new, new)
    torch.testing.assert_close(keys, torch.cat([expected[index], new], dim=2))
    assert len(cache) == 1


def test_causal_self_mask_is_causal_and_every_query_sees_itself() -> None:
    from fusionzoo.layers import causal_mask, causal_self_mask

    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])  # (B=2, S=4)
    mask = causal_self_mask(valid, num_queries=2, offset=2)  # queries at positions 2 and 3
    assert mask.shape == (2, 1, 2, 4)
    assert torch.equal(mask, causal_mask(valid, 2, 2) | torch.eye(4, dtype=torch.bool)[2:])
    assert mask[0, 0, 1].tolist() == [True, True, True, True]  # a padded query sees itself too: no NaN row
    assert mask[1, 0, 0].tolist() == [True, False, True, False]  # never a later key, never padding
