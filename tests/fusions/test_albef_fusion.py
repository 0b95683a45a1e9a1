"""The ALBEF fusion (fusionzoo/fusions/albef.py): shapes, ITC aux outputs, causal decoding, cache.

Self-contained: the registry-driven contract test covers these properties too,
but this file checks them (and the ALBEF-specific parts) on its own.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fusionzoo import FUSIONS, KVCache
from fusionzoo.fusions.albef import AlbefFusion
from fusionzoo.fusions.base import FusionModule
from fusionzoo.losses import itc_loss

B, T, N = 3, 6, 4
TEXT_DIM, IMAGE_DIM, DIM, EMBED = 12, 10, 16, 8


def build(**kw: object) -> AlbefFusion:
    torch.manual_seed(0)
    return AlbefFusion(TEXT_DIM, IMAGE_DIM, **{"dim": DIM, "embed_dim": EMBED, "num_layers": 2, "num_heads": 2, **kw})


def lengths_mask(lengths: tuple[int, ...], size: int) -> torch.Tensor:
    return torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, T, TEXT_DIM, generator=g)
    image = torch.randn(B, N, IMAGE_DIM, generator=g)
    return text, lengths_mask((6, 4, 5), T), image, lengths_mask((4, 2, 3), N)


def test_registered_and_config_rebuilds() -> None:
    assert FUSIONS.get("albef") is AlbefFusion
    model = build().eval()
    assert isinstance(model, FusionModule) and model.out_dim == DIM
    json.dumps(model.config)
    rebuilt = AlbefFusion(model.text_dim, model.image_dim, **model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("causal", [False, True])
def test_shapes_and_aux(causal: bool) -> None:
    model = build().eval()
    text, text_mask, image, image_mask = inputs()
    with torch.no_grad():
        out = model(text, text_mask, image, image_mask, causal=causal)
    assert out.text_tokens.shape == (B, T, DIM)
    assert out.pooled.shape == (B, DIM)
    assert out.image_tokens is not None and out.image_tokens.shape == (B, N, DIM)
    assert torch.allclose(out.pooled, out.text_tokens[:, 0]), "pooled is the fused first-token state"
    assert set(out.aux) == {"image_embed", "text_embed", "temperature"}
    for key in ("image_embed", "text_embed"):
        assert out.aux[key].shape == (B, EMBED)
        assert torch.allclose(out.aux[key].norm(dim=-1), torch.ones(B), atol=1e-5), f"{key} is not unit-norm"
    assert out.aux["temperature"].shape == ()
    assert out.aux["temperature"].item() == pytest.approx(0.07)


def test_image_summary_first_token() -> None:
    model = build(image_summary="first").eval()
    text, text_mask, image, _ = inputs()
    changed = image.clone()
    changed[:, 1:] += 5.0  # only tokens after the first change
    with torch.no_grad():
        a = model(text, text_mask, image).aux["image_embed"]
        b = model(text, text_mask, changed).aux["image_embed"]
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="image_summary"):
        build(image_summary="cls")


def test_temperature_clamp_keeps_gradient() -> None:
    model = build()
    text, text_mask, image, image_mask = inputs()
    for raw, clamped in ((5.0, 0.5), (-1.0, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            model.temperature.fill_(raw)
        model.zero_grad()
        temperature = model(text, text_mask, image, image_mask).aux["temperature"]
        assert temperature.item() == pytest.approx(clamped)
        temperature.backward()
        assert model.temperature.grad.item() == pytest.approx(1.0), "straight-through: the raw value gets the gradient"
    with pytest.raises(ValueError, match="temperature"):
        build(temperature=0.6)


def test_aux_loss_is_weighted_itc() -> None:
    model = build(itc_weight=0.25).eval()
    text, text_mask, image, image_mask = inputs()
    out = model(text, text_mask, image, image_mask)
    losses = model.aux_loss(out)
    assert set(losses) == {"itc"}
    img, txt, temp = out.aux["image_embed"], out.aux["text_embed"], out.aux["temperature"]
    # By hand: symmetric InfoNCE over the B in-batch pairs.
    sim = (img @ txt.t() / temp).tolist()
    i2t = sum(-math.log(math.exp(sim[i][i]) / sum(math.exp(v) for v in sim[i])) for i in range(B)) / B
    col = [[sim[j][i] for j in range(B)] for i in range(B)]
    t2i = sum(-math.log(math.exp(col[i][i]) / sum(math.exp(v) for v in col[i])) for i in range(B)) / B
    assert losses["itc"].item() == pytest.approx(0.25 * (i2t + t2i) / 2, rel=1e-5)
    assert losses["itc"].item() == pytest.approx(0.25 * itc_loss(img, txt, temp).item(), rel=1e-6)
    assert build(itc_weight=0.0).aux_loss(out) == {}
    with pytest.raises(ValueError, match="aux"):
        model.aux_loss(type(out)(text_tokens=out.text_tokens, pooled=out.pooled))


def test_base_aux_loss_defaults_to_empty() -> None:
    class NoAux(FusionModule):
        pass

    assert NoAux(1, 1).aux_loss(None) == {}  # type: ignore[arg-type]


@pytest.mark.parametrize("causal", [False, True])
def test_every_parameter_trains(causal: bool) -> None:
    """A loss on text_tokens + pooled + the fusion's aux loss reaches every parameter."""
    model = build().train()
    text, text_mask, image, image_mask = inputs()
    out = model(text, text_mask, image, image_mask, causal=causal)
    torch.manual_seed(1)
    loss = (out.text_tokens * torch.randn_like(out.text_tokens)).sum() + (out.pooled * torch.randn_like(out.pooled)).sum()
    loss = loss + sum(model.aux_loss(out).values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no or non-finite gradient: {missing}"
    for name in ("text_itc.weight", "image_itc.weight", "temperature"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, f"{name} is a dead weight"


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(causal: bool) -> None:
    model = build().eval()
    text, text_mask, image, image_mask = inputs()
    g = torch.Generator().manual_seed(3)
    scrambled_text = torch.where(text_mask[..., None], text, 10 * torch.randn(text.shape, generator=g))
    scrambled_image = torch.where(image_mask[..., None], image, 10 * torch.randn(image.shape, generator=g))
    longer_text = torch.cat([text, torch.randn(B, 2, TEXT_DIM, generator=g)], dim=1)
    longer_mask = torch.cat([text_mask, torch.zeros(B, 2, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref = model(text, text_mask, image, image_mask, causal=causal)
        for out in (
            model(scrambled_text, text_mask, scrambled_image, image_mask, causal=causal),
            model(longer_text, longer_mask, image, image_mask, causal=causal),
        ):
            diff = (out.text_tokens[:, :T] - ref.text_tokens).abs()[text_mask].max()
            assert diff < 1e-5
            for key in ("image_embed", "text_embed"):
                assert torch.allclose(out.aux[key], ref.aux[key], atol=1e-5), key
            assert torch.allclose(out.pooled, ref.pooled, atol=1e-5)


def test_causal_has_no_future_leak() -> None:
    model = build().eval()
    text, _, image, image_mask = inputs()
    full_mask = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        ref = model(text, full_mask, image, image_mask, causal=True).text_tokens
        for t in (1, 3, T - 1):
            changed = text.clone()
            changed[:, t:] = torch.randn(B, T - t, TEXT_DIM)
            out = model(changed, full_mask, image, image_mask, causal=True).text_tokens
            assert (out[:, :t] - ref[:, :t]).abs().max() < 1e-5, f"positions < {t} see the future"
            assert (out[:, t:] - ref[:, t:]).abs().max() > 1e-4
        # Bidirectional mode does see later positions.
        bi = model(text, full_mask, image, image_mask).text_tokens
        changed = text.clone()
        changed[:, -1] += 1.0
        assert (model(changed, full_mask, image, image_mask).text_tokens[:, 0] - bi[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("first_chunk", [1, 3])
def test_cache_matches_full_causal_forward(first_chunk: int) -> None:
    model = build().eval()
    text, text_mask, image, image_mask = inputs()
    with torch.no_grad():
        full = model(text, text_mask, image, image_mask, causal=True)
        cache = KVCache()
        bounds = [0, first_chunk, *range(first_chunk + 1, T + 1)]
        pieces = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out = model(text[:, start:stop], text_mask[:, :stop], image, image_mask, causal=True, cache=cache)
            assert out.text_tokens.shape == (B, stop - start, DIM)
            assert cache.offset == stop
            prefix = model(text[:, :stop], text_mask[:, :stop], image, image_mask, causal=True)
            assert torch.allclose(out.pooled, prefix.pooled, atol=1e-5)
            assert torch.allclose(out.aux["text_embed"], prefix.aux["text_embed"], atol=1e-5)
            assert torch.allclose(out.aux["image_embed"], full.aux["image_embed"], atol=1e-6)
            pieces.append(out.text_tokens)
    steps = torch.cat(pieces, dim=1)
    assert (steps - full.text_tokens).abs()[text_mask].max() < 1e-5
    # Image work is done once: the projected image stream is kept, and so are the
    # cross-attention keys/values (one entry per layer) next to the self-attention ones.
    assert "albef.image_tokens" in cache.state
    assert len(cache) == 2 * len(model.layers)


def test_clear_errors() -> None:
    model = build().eval()
    text, text_mask, image, image_mask = inputs()
    with pytest.raises(ValueError, match="causal=True"):
        model(text, text_mask, image, cache=KVCache())
    with pytest.raises(ValueError, match="text_mask must cover"):
        model(text, text_mask[:, :2], image)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(text, text_mask, image[:2])
    with pytest.raises(ValueError, match="num_layers"):
        build(num_layers=0)
