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


def test_pooled_only_runs_the_last_layer_for_cls_and_matches_the_full_pass() -> None:
    torch.manual_seed(0)
    fusion = MergedTransformerFusion(16, 24, dim=32, num_layers=3, num_heads=4, dropout=0.0)
    text, image = torch.randn(2, 5, 16), torch.randn(2, 4, 24)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding must still be masked as a key
    full = fusion(text, mask, image)
    fast = fusion(text, mask, image, pooled_only=True)
    torch.testing.assert_close(fast.pooled, full.pooled)
    assert fast.text_tokens.shape == (2, 1, 32) and fast.image_tokens is None
    torch.testing.assert_close(fast.text_tokens[:, 0], full.text_tokens[:, 0])
    # Same gradients for every parameter the pooled vector depends on.
    grads_full = torch.autograd.grad(full.pooled.square().sum(), list(fusion.parameters()), allow_unused=True)
    grads_fast = torch.autograd.grad(fast.pooled.square().sum(), list(fusion.parameters()), allow_unused=True)
    for (name, _), a, b in zip(fusion.named_parameters(), grads_full, grads_fast):
        if a is None:
            assert b is None, name
        else:
            torch.testing.assert_close(b if b is not None else torch.zeros_like(a), a, msg=name)
    # Causal mode ignores the flag (every text position is a prediction there).
    causal = fusion(text, mask, image, causal=True, pooled_only=True)
    assert causal.text_tokens.shape == (2, 5, 32)


@pytest.mark.parametrize("standardized", [False, True], ids=["plain", "bench-wrapper"])
def test_vqa_model_asks_merged_transformer_for_pooled_only(monkeypatch: pytest.MonkeyPatch,
                                                           standardized: bool) -> None:
    import fusionzoo
    from fusionzoo.bench.standardize import StandardizedFusion

    torch.manual_seed(0)
    model = fusionzoo.create_model("vqa", "merged_transformer", vision="tiny", text="tiny", pretrained=False,
                                   answers=["yes", "no"], fusion_kwargs={"dim": 32, "num_layers": 2})
    if standardized:  # the benchmark wraps every fusion; the wrapper must pass the flag on
        model.fusion = StandardizedFusion(model.fusion)
    seen = []
    original = MergedTransformerFusion.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("pooled_only", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MergedTransformerFusion, "forward", spy)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(5, 90, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    model.eval()
    logits = model(**batch).logits
    assert seen == [True] and logits.shape == (2, 2)
