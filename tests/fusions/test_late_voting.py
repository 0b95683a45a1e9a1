"""late_voting: the votes against hand-computed numbers, and the per-modality outputs."""

from __future__ import annotations

import math

import pytest
import torch

from fusionzoo.fusions.late_voting import LateVotingFusion
from fusionzoo.layers import masked_mean

B, T, N, DT, DI = 2, 4, 3, 12, 10

# Two experts, two classes. Softmax: expert 1 says (1/2, 1/2), expert 2 (3/4, 1/4).
SOFTMAX_LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # (B=1, K=2, C=2)
# Sigmoid (one label): expert 1 p = 1/2, expert 2 p = 3/4.
SIGMOID_LOGITS = torch.tensor([[[0.0], [math.log(3.0)]]])  # (1, 2, 1)


def fusion(vote: str, expert_weights: tuple[float, float] | None = None) -> LateVotingFusion:
    torch.manual_seed(0)
    model = LateVotingFusion(DT, DI, dim=8, vote=vote).eval()
    if expert_weights is not None:
        with torch.no_grad():
            model.vote_logits.copy_(torch.tensor(expert_weights).log())
    return model


@pytest.mark.parametrize(
    "vote, weights, softmax_probs, sigmoid_prob",
    [
        ("mean", None, [0.625, 0.375], 0.625),  # (1/2 + 3/4) / 2
        ("learned", (1.0, 3.0), [0.6875, 0.3125], 0.6875),  # 1/4 * 1/2 + 3/4 * 3/4
        ("poe", None, [0.75, 0.25], 0.75),  # (1/2 * 3/4) / (1/2 * 3/4 + 1/2 * 1/4)
    ],
)
def test_vote_matches_hand_computed_numbers(vote, weights, softmax_probs, sigmoid_prob) -> None:
    model = fusion(vote, weights)
    with torch.no_grad():
        softmax = model.vote(SOFTMAX_LOGITS, "softmax").softmax(dim=-1)
        sigmoid = model.vote(SIGMOID_LOGITS, "sigmoid").sigmoid()
    assert torch.allclose(softmax, torch.tensor([softmax_probs]), atol=1e-6)
    assert torch.allclose(sigmoid, torch.tensor([[sigmoid_prob]]), atol=1e-6)


def test_vote_exact_logits() -> None:
    """The spec's formulas themselves, not just their activations."""
    logp = SOFTMAX_LOGITS.log_softmax(dim=-1)
    mean_ref = torch.logsumexp(logp, dim=1) - math.log(2)
    assert torch.allclose(fusion("mean").vote(SOFTMAX_LOGITS), mean_ref, atol=1e-6)
    assert torch.allclose(fusion("poe").vote(SOFTMAX_LOGITS), logp.sum(dim=1), atol=1e-6)
    assert torch.allclose(fusion("poe").vote(SIGMOID_LOGITS, "sigmoid"), torch.tensor([[math.log(3.0)]]))
    assert torch.allclose(fusion("mean").vote(SIGMOID_LOGITS, "sigmoid"), torch.tensor([[math.log(5 / 3)]]))


@pytest.mark.parametrize("vote", ["mean", "learned", "poe"])
def test_sigmoid_vote_is_finite_for_saturated_experts(vote: str) -> None:
    logits = torch.tensor([[[200.0, -200.0, 200.0], [200.0, -200.0, -200.0]]])  # (1, 2, 3)
    combined = fusion(vote).vote(logits, "sigmoid")
    assert torch.isfinite(combined).all()
    assert combined[0, 0] > 10 and combined[0, 1] < -10


def test_learned_weights_train_through_the_vote_and_the_features() -> None:
    model = fusion("learned").train()
    # The log-probability of one class (the mixture's total over classes is always 1, so its
    # gradient would be rounding noise only).
    model.vote(torch.randn(B, 2, 5), "softmax")[:, 0].sum().backward()
    assert model.vote_logits.grad is not None and model.vote_logits.grad.abs().sum() > 0
    model.zero_grad()
    torch.manual_seed(1)
    out = model(torch.randn(B, T, DT), torch.ones(B, T, dtype=torch.bool), torch.randn(B, N, DI))
    (out.pooled * torch.randn_like(out.pooled)).sum().backward()
    assert model.vote_logits.grad is not None and model.vote_logits.grad.abs().sum() > 0


def test_modality_outputs_follow_the_definition() -> None:
    model = fusion("mean")
    torch.manual_seed(1)
    text, image = torch.randn(B, T, DT), torch.randn(B, N, DI)
    text_mask = torch.tensor([[True] * T, [True, True, False, False]])
    with torch.no_grad():
        out = model(text, text_mask, image)
        text_pooled = model.text_proj(masked_mean(text, text_mask))
        image_pooled = model.image_proj(image.mean(dim=1))
    assert torch.allclose(out.modality_pooled[:, 0], text_pooled, atol=1e-6)
    assert torch.allclose(out.modality_pooled[:, 1], image_pooled, atol=1e-6)
    assert torch.allclose(out.modality_text_tokens[:, 0], model.text_proj(text), atol=1e-6)
    assert torch.allclose(out.modality_text_tokens[:, 1], image_pooled[:, None].expand(B, T, -1), atol=1e-6)
    assert torch.allclose(out.pooled, out.modality_pooled.mean(dim=1), atol=1e-6)
    assert torch.allclose(out.text_tokens, out.modality_text_tokens.mean(dim=1), atol=1e-6)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="vote must be one of"):
        LateVotingFusion(DT, DI, vote="max")
    model = fusion("mean")
    with pytest.raises(ValueError, match="activation"):
        model.vote(torch.randn(B, 2, 3), "relu")
    with pytest.raises(ValueError, match="K=2"):
        model.vote(torch.randn(B, 3, 3))
