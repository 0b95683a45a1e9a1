"""ITC, ITM and MLM losses (fusionzoo/losses.py) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fusionzoo.fusions.albef import AlbefFusion
from fusionzoo.losses import (
    ITCLoss,
    ITMLoss,
    MLMHead,
    MLMLoss,
    itc_loss,
    itc_similarities,
    itm_loss,
    mask_tokens,
    mlm_loss,
    momentum_targets,
    sample_hard_negatives,
)


def ce(logits: list[float], target: int) -> float:
    """Cross-entropy of one row, by hand."""
    return -math.log(math.exp(logits[target]) / sum(math.exp(v) for v in logits))


def soft_ce(logits: list[float], targets: list[float]) -> float:
    log_z = math.log(sum(math.exp(v) for v in logits))
    return -sum(t * (v - log_z) for v, t in zip(logits, targets))


# 2x2 ITC case: sim_i2t = image @ text.T / 0.5 = [[2, 1.2], [0, 1.6]].
IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
TEMP = 0.5
SIM_I2T = [[2.0, 1.2], [0.0, 1.6]]
SIM_T2I = [[2.0, 0.0], [1.2, 1.6]]


# -- ITC -----------------------------------------------------------------------


def test_itc_similarities_by_hand() -> None:
    sim_i2t, sim_t2i = itc_similarities(IMAGE, TEXT, TEMP)
    assert torch.allclose(sim_i2t, torch.tensor(SIM_I2T))
    assert torch.allclose(sim_t2i, torch.tensor(SIM_T2I))


def test_itc_loss_value_and_symmetry() -> None:
    i2t = (ce(SIM_I2T[0], 0) + ce(SIM_I2T[1], 1)) / 2
    t2i = (ce(SIM_T2I[0], 0) + ce(SIM_T2I[1], 1)) / 2
    expected = (i2t + t2i) / 2
    got = itc_loss(IMAGE, TEXT, TEMP)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Symmetric in its two modalities, and the module equals its function twin.
    assert itc_loss(TEXT, IMAGE, TEMP).item() == pytest.approx(expected, rel=1e-6)
    assert ITCLoss()(IMAGE, TEXT, torch.tensor(TEMP)).item() == pytest.approx(expected, rel=1e-6)


def test_itc_soft_targets_by_hand() -> None:
    targets_i2t = [[0.7, 0.3], [0.2, 0.8]]
    targets_t2i = [[0.9, 0.1], [0.5, 0.5]]
    i2t = (soft_ce(SIM_I2T[0], targets_i2t[0]) + soft_ce(SIM_I2T[1], targets_i2t[1])) / 2
    t2i = (soft_ce(SIM_T2I[0], targets_t2i[0]) + soft_ce(SIM_T2I[1], targets_t2i[1])) / 2
    got = itc_loss(IMAGE, TEXT, TEMP, soft_targets=(torch.tensor(targets_i2t), torch.tensor(targets_t2i)))
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # One-hot soft targets give the plain loss.
    eye = torch.eye(2)
    assert itc_loss(IMAGE, TEXT, TEMP, soft_targets=(eye, eye)).item() == pytest.approx(
        itc_loss(IMAGE, TEXT, TEMP).item(), rel=1e-6
    )


def test_momentum_targets_by_hand() -> None:
    # Row softmax of [0, ln 3] is [0.25, 0.75]; alpha 0.4: 0.4 * [0.25, 0.75] + 0.6 * [1, 0] = [0.7, 0.3].
    sim_m = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets_i2t, targets_t2i = momentum_targets(sim_m, sim_m.t(), alpha=0.4)
    assert torch.allclose(targets_i2t, torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    # t2i: rows of sim_m.T are [0, 0] -> [0.5, 0.5] and [ln 3, 0] -> [0.75, 0.25].
    assert torch.allclose(targets_t2i, torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    assert torch.allclose(targets_i2t.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="alpha"):
        momentum_targets(sim_m, sim_m, alpha=1.5)


def test_itc_shape_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        itc_loss(IMAGE, TEXT[:1], TEMP)
    with pytest.raises(ValueError, match="temperature"):
        itc_loss(IMAGE, TEXT, 0.0)
    with pytest.raises(ValueError, match="soft target"):
        itc_loss(IMAGE, TEXT, TEMP, soft_targets=(torch.eye(3), torch.eye(2)))


# -- hard negatives ------------------------------------------------------------

# Off-diagonal weights exp(sim): row 0 -> {1: 2, 2: 1}; row 1 -> {0: 1, 2: 3}; row 2 -> {0: 4, 1: 1}.
# Row 2's positive has similarity 100: the softmax puts ~all its mass there, the sampler must not care.
HARD_SIM = torch.tensor(
    [
        [0.0, math.log(2.0), 0.0],
        [0.0, 5.0, math.log(3.0)],
        [math.log(4.0), 0.0, 100.0],
    ]
)
HARD_EXPECTED = [[0.0, 2 / 3, 1 / 3], [0.25, 0.0, 0.75], [0.8, 0.2, 0.0]]


def test_hard_negatives_follow_softmax_without_the_positive() -> None:
    repeats = 20000
    sim = HARD_SIM.repeat(repeats, 1)  # (3R, 3)
    positives = torch.arange(3).repeat(repeats)  # (3R,)
    drawn = sample_hard_negatives(sim, torch.Generator().manual_seed(0), positives=positives)
    assert drawn.dtype == torch.long and drawn.shape == (3 * repeats,)
    assert (drawn != positives).all()
    for row in range(3):
        counts = torch.bincount(drawn[positives == row], minlength=3).double() / repeats
        for col in range(3):
            assert counts[col].item() == pytest.approx(HARD_EXPECTED[row][col], abs=0.015), (row, col)


def test_hard_negatives_never_the_diagonal_and_seeded() -> None:
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(8, 8, generator=g) + 30 * torch.eye(8)  # positives far more similar
    for _ in range(50):
        assert (sample_hard_negatives(sim, g) != torch.arange(8)).all()
    a = sample_hard_negatives(sim, torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # Two pairs: each row's only negative is the other one.
    assert torch.equal(sample_hard_negatives(torch.zeros(2, 2), g), torch.tensor([1, 0]))


def test_hard_negatives_need_two_candidates() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.Generator())
    with pytest.raises(ValueError, match="rows"):
        sample_hard_negatives(torch.zeros(3), torch.Generator())


def test_hard_negatives_rectangular_with_positives() -> None:
    # A local batch of 2 rows against 4 gathered candidates, positives at columns 2 and 3.
    sim = torch.zeros(2, 4)
    positives = torch.tensor([2, 3])
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample_hard_negatives(sim, g, positives) for _ in range(200)])  # (200, 2)
    assert (drawn != positives).all()
    assert set(drawn[:, 0].tolist()) == {0, 1, 3}


# -- ITM -----------------------------------------------------------------------


def test_itm_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.e) + math.log(2)) / 3
    assert itm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        itm_loss(torch.zeros(3, 3), labels)


def tiny_albef() -> AlbefFusion:
    torch.manual_seed(0)
    return AlbefFusion(12, 10, dim=16, embed_dim=8, num_layers=1, num_heads=2)


def test_itm_forward_on_albef() -> None:
    b, t, n = 4, 5, 3
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(b, t, 12, generator=g), torch.randn(b, n, 10, generator=g)
    text_mask = torch.arange(t)[None, :] < torch.tensor([5, 3, 4, 2])[:, None]
    image_mask = torch.arange(n)[None, :] < torch.tensor([3, 2, 3, 1])[:, None]
    fusion = tiny_albef()
    itm = ITMLoss(fusion.out_dim)

    aux = fusion(text, text_mask, image, image_mask).aux
    sim_i2t, sim_t2i = itc_similarities(aux["image_embed"], aux["text_embed"], aux["temperature"])
    out = itm(fusion, text, text_mask, image, image_mask, sim_i2t, sim_t2i, torch.Generator().manual_seed(1))
    assert out.logits.shape == (3 * b, 2)
    assert torch.equal(out.labels, torch.tensor([1] * b + [0] * (2 * b)))
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    assert (out.negative_text_index != torch.arange(b)).all()
    assert (out.negative_image_index != torch.arange(b)).all()
    assert out.loss.item() == pytest.approx(itm_loss(out.logits, out.labels).item())

    out.loss.backward()
    assert itm.head.weight.grad is not None and torch.isfinite(itm.head.weight.grad).all()
    assert fusion.text_proj.weight.grad is not None and fusion.text_proj.weight.grad.abs().sum() > 0
    assert fusion.image_proj.weight.grad is not None and fusion.image_proj.weight.grad.abs().sum() > 0


def test_itm_pairs_are_the_documented_ones() -> None:
    """Row blocks: (t_i, v_i), (t_neg(i), v_i), (t_i, v_neg(i)); checked pair by pair in eval mode."""
    b, t, n = 3, 4, 2
    g = torch.Generator().manual_seed(5)
    text, image = torch.randn(b, t, 12, generator=g), torch.randn(b, n, 10, generator=g)
    text_mask = torch.arange(t)[None, :] < torch.tensor([4, 2, 3])[:, None]
    fusion, itm = tiny_albef().eval(), ITMLoss(16)
    sim = torch.randn(b, b, generator=g)
    with torch.no_grad():
        out = itm(fusion, text, text_mask, image, None, sim, sim.t(), torch.Generator().manual_seed(2))
        for i in range(b):
            nt, ni = out.negative_text_index[i], out.negative_image_index[i]
            pairs = [(i, i, i), (b + i, nt, i), (2 * b + i, i, ni)]
            for row, ti, vi in pairs:
                alone = itm.head(fusion(text[ti : ti + 1], text_mask[ti : ti + 1], image[vi : vi + 1]).pooled)
                assert torch.allclose(out.logits[row], alone[0], atol=1e-5), (row, ti, vi)


# -- MLM -----------------------------------------------------------------------

MASK_ID, VOCAB = 3, 1000


def big_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (200, 400), generator=g)
    special = torch.rand(200, 400, generator=g) < 0.1
    special[:, 0] = True  # [CLS]
    attention = torch.ones(200, 400, dtype=torch.bool)
    attention[:, 350:] = False  # padding that the special mask does not list
    return ids, special, attention


def test_mask_tokens_selection_and_split() -> None:
    ids, special, attention = big_batch()
    original = ids.clone()
    masked, labels = mask_tokens(
        ids, mask_token_id=MASK_ID, vocab_size=VOCAB, special_tokens_mask=special,
        generator=torch.Generator().manual_seed(1), attention_mask=attention,
    )
    assert torch.equal(ids, original), "input_ids must not be modified"
    assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == torch.long
    selected = labels != -100
    allowed = ~special & attention
    assert not (selected & ~allowed).any(), "a special or padding token was selected"
    assert torch.equal(labels[selected], ids[selected]), "labels must hold the original ids"
    assert torch.equal(masked[~selected], ids[~selected]), "unselected tokens must stay as they are"
    rate = selected.sum().item() / allowed.sum().item()
    assert rate == pytest.approx(0.15, abs=0.005)

    chosen = selected.sum().item()
    to_mask = (masked[selected] == MASK_ID).sum().item() / chosen
    unchanged = (masked[selected] == ids[selected]).sum().item() / chosen
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert unchanged == pytest.approx(0.1, abs=0.01)  # (+ 0.1 / VOCAB random draws of the same id)
    assert 1 - to_mask - unchanged == pytest.approx(0.1, abs=0.01)


def test_mask_tokens_seeded_and_extremes() -> None:
    ids = torch.randint(5, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    special = torch.zeros(4, 10, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    kw = {"mask_token_id": MASK_ID, "vocab_size": VOCAB, "special_tokens_mask": special}
    a = mask_tokens(ids, generator=torch.Generator().manual_seed(9), **kw)
    b = mask_tokens(ids, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _, none = mask_tokens(ids, generator=torch.Generator(), probability=0.0, **kw)
    assert (none == -100).all()
    _, every = mask_tokens(ids, generator=torch.Generator(), probability=1.0, **kw)
    assert torch.equal(every != -100, ~special)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, special_tokens_mask=special[:2], generator=None)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, generator=None, probability=1.5, **kw)


def test_mlm_loss_by_hand() -> None:
    # Position 0 is ignored (its huge logits must not count); position 1: p(2) = 2/4; position 2: p(0) = 3/5.
    logits = torch.tensor([[[50.0, -50.0, 0.0], [0.0, 0.0, math.log(2.0)], [math.log(3.0), 0.0, 0.0]]])
    labels = torch.tensor([[-100, 2, 0]])
    expected = (math.log(2.0) + math.log(5 / 3)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    nothing = mlm_loss(logits.requires_grad_(), torch.full((1, 3), -100))
    assert nothing.item() == 0.0  # not NaN
    nothing.backward()


def test_mlm_head_and_loss_module() -> None:
    torch.manual_seed(0)
    loss = MLMLoss(16, 50)
    head = loss.head
    assert isinstance(head, MLMHead)
    assert [type(m).__name__ for m in head.children()] == ["Linear", "LayerNorm", "Linear"]
    tokens = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.tensor([[-100, 4, 7, -100, -100], [1, -100, -100, 49, -100]])
    out = loss(tokens, labels)
    assert out.logits.shape == (2, 5, 50)
    assert out.loss.item() == pytest.approx(mlm_loss(head(tokens), labels).item())
    out.loss.backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()
