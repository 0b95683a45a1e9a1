"""ITC, ITM and MLM losses (fusionzoo/losses.py) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fusionzoo.fusions.albef import AlbefFusion
from fusionzoo.losses import (
    ITMLoss,
    MLMHead,
    MLMLoss,
    contrastive_loss,
    hard_negative_candidates,
    itc_loss,
    itc_similarities,
    itc_targets,
    itm_loss,
    mask_tokens,
    mlm_loss,
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


def test_itc_soft_targets_by_hand() -> None:
    targets_i2t = [[0.7, 0.3], [0.2, 0.8]]
    targets_t2i = [[0.9, 0.1], [0.5, 0.5]]
    i2t = (soft_ce(SIM_I2T[0], targets_i2t[0]) + soft_ce(SIM_I2T[1], targets_i2t[1])) / 2
    t2i = (soft_ce(SIM_T2I[0], targets_t2i[0]) + soft_ce(SIM_T2I[1], targets_t2i[1])) / 2
    sim_i2t, sim_t2i = itc_similarities(IMAGE, TEXT, TEMP)
    got = contrastive_loss(sim_i2t, sim_t2i, torch.tensor(targets_i2t), torch.tensor(targets_t2i))
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # One-hot targets give the plain in-batch loss.
    eye = torch.eye(2)
    assert contrastive_loss(sim_i2t, sim_t2i, eye, eye).item() == pytest.approx(
        itc_loss(IMAGE, TEXT, TEMP).item(), rel=1e-6
    )


def test_itc_against_gathered_columns_by_hand() -> None:
    """Rows are this process's pairs, columns the global batch: row i's positive sits at offset + i."""
    extra_text = torch.tensor([[0.0, 1.0]])  # a third column, as if from another process
    extra_image = torch.tensor([[0.8, 0.6]])
    sim_i2t, sim_t2i = itc_similarities(IMAGE, TEXT, TEMP, image_columns=torch.cat([IMAGE, extra_image]),
                                        text_columns=torch.cat([TEXT, extra_text]))
    # image @ [text; extra].T / 0.5: row 0 [2, 1.2, 0], row 1 [0, 1.6, 2]; text rows against images likewise.
    assert torch.allclose(sim_i2t, torch.tensor([[2.0, 1.2, 0.0], [0.0, 1.6, 2.0]]))
    assert torch.allclose(sim_t2i, torch.tensor([[2.0, 0.0, 1.6], [1.2, 1.6, 1.92]]))
    same = torch.tensor([[True, False, False], [False, True, False]])
    targets = itc_targets(same)
    expected = (ce([2.0, 1.2, 0.0], 0) + ce([0.0, 1.6, 2.0], 1) + ce([2.0, 0.0, 1.6], 0) + ce([1.2, 1.6, 1.92], 1)) / 4
    assert contrastive_loss(sim_i2t, sim_t2i, targets, targets).item() == pytest.approx(expected, rel=1e-6)


def test_itc_targets_by_hand() -> None:
    # Momentum rows: softmax of [0, ln 3] is [0.25, 0.75]; alpha 0.4: 0.4 * [0.25, 0.75] + 0.6 * [1, 0] = [0.7, 0.3].
    sim_m = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    eye = torch.eye(2, dtype=torch.bool)
    assert torch.allclose(itc_targets(eye, sim_m, alpha=0.4), torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    assert torch.allclose(itc_targets(eye, sim_m, alpha=0.0), torch.eye(2))
    # Two captions of one image in the columns: the hard target spreads over both.
    same = torch.tensor([[True, True, False], [False, False, True]])
    assert torch.allclose(itc_targets(same), torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="alpha"):
        itc_targets(eye, sim_m, alpha=1.5)
    with pytest.raises(ValueError, match="at least one True"):
        itc_targets(torch.tensor([[True, False], [False, False]]))


def test_itc_shape_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        itc_loss(IMAGE, TEXT[:1], TEMP)
    with pytest.raises(ValueError, match="temperature"):
        itc_loss(IMAGE, TEXT, 0.0)
    sim_i2t, sim_t2i = itc_similarities(IMAGE, TEXT, TEMP)
    with pytest.raises(ValueError, match="targets_i2t"):
        contrastive_loss(sim_i2t, sim_t2i, torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match="text_columns"):
        itc_similarities(IMAGE, TEXT, TEMP, text_columns=torch.zeros(3, 5))


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


def test_itm_loss_module_scores_positives_then_negatives() -> None:
    b, t, n = 4, 5, 3
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(b, t, 12, generator=g), torch.randn(b, n, 10, generator=g)
    text_mask = torch.arange(t)[None, :] < torch.tensor([5, 3, 4, 2])[:, None]
    fusion = tiny_albef().eval()  # no dropout: each row can be recomputed alone below
    itm = ITMLoss(fusion.out_dim)

    fused = fusion(text, text_mask, image)
    sim_i2t, sim_t2i = itc_similarities(fused.aux["image_embed"], fused.aux["text_embed"], fused.aux["temperature"])
    same = torch.eye(b, dtype=torch.bool)
    positives = torch.arange(b)
    draw = torch.Generator().manual_seed(1)
    neg_text = sample_hard_negatives(hard_negative_candidates(sim_i2t, same, positives), draw, positives)
    neg_image = sample_hard_negatives(hard_negative_candidates(sim_t2i, same, positives), draw, positives)
    assert (neg_text != positives).all() and (neg_image != positives).all()
    negatives = fusion(torch.cat([text[neg_text], text]), torch.cat([text_mask[neg_text], text_mask]),
                       torch.cat([image, image[neg_image]]))
    out = itm(fused.pooled, negatives.pooled)
    assert out.logits.shape == (3 * b, 2)
    assert torch.equal(out.labels, torch.tensor([1] * b + [0] * (2 * b)))
    assert out.loss.item() == pytest.approx(itm_loss(out.logits, out.labels).item())
    expected_accuracy = (out.logits.argmax(-1) == out.labels).float().mean().item()
    assert out.accuracy.item() == pytest.approx(expected_accuracy)

    out.loss.backward()
    assert itm.head.weight.grad is not None and torch.isfinite(itm.head.weight.grad).all()
    assert fusion.text_proj.weight.grad is not None and fusion.text_proj.weight.grad.abs().sum() > 0
    assert fusion.image_proj.weight.grad is not None and fusion.image_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # each row is the head on its own pair's pooled state
        alone = itm.head(fusion(text[neg_text[0]][None], text_mask[neg_text[0]][None], image[:1]).pooled)
        assert torch.allclose(out.logits[b], alone[0].float(), atol=1e-5)


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


def test_mlm_distillation_mixes_hard_and_soft_targets_by_hand() -> None:
    torch.manual_seed(0)
    loss = MLMLoss(4, 3)
    tokens = torch.randn(2, 4)  # two selected positions
    labels = torch.tensor([2, 0])
    soft = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    rows = loss.head(tokens).tolist()
    hard = (ce(rows[0], 2) + ce(rows[1], 0)) / 2
    distilled = (soft_ce(rows[0], soft[0].tolist()) + soft_ce(rows[1], soft[1].tolist())) / 2
    got = loss(tokens, labels, soft, alpha=0.4).loss.item()
    assert got == pytest.approx(0.6 * hard + 0.4 * distilled, rel=1e-5)
    assert loss(tokens, labels).loss.item() == pytest.approx(hard, rel=1e-5)
    with pytest.raises(ValueError, match="soft_targets"):
        loss(tokens, labels, soft[:1], alpha=0.4)
