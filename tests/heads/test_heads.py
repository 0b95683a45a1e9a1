"""Heads: losses against hand computations, and the vote wiring for decision-level fusions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import fusionzoo
from fusionzoo.fusions.base import HEAD_READS, FusionModule, FusionOutput
from fusionzoo.heads import CaptioningHead, ClassificationHead, VQAHead, caption_lm_loss, vqa_bce_loss
from fusionzoo.heads.captioning import EXCLUDED_LOGIT, IGNORE_INDEX


class DummyVotingFusion(FusionModule):
    """A decision-level fusion (not registered) whose vote records its inputs.

    The vote is a fixed, asymmetric combination (``2 * first + second``) so a
    test can tell that each expert's prediction lands in its own slot.
    """

    decision_level = True
    num_modalities = 2

    def __init__(self, text_dim: int = 4, image_dim: int = 4, dim: int = 4) -> None:
        super().__init__(text_dim, image_dim, dim=dim)
        self.out_dim = dim
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def vote(self, logits: Tensor, activation: str = "softmax") -> Tensor:
        self.calls.append((tuple(logits.shape), activation))
        return 2 * logits[:, 0] + logits[:, 1]


class TextStub(nn.Module):
    """What ``from_parts`` needs of a text encoder: its word embeddings."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, width)

    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings


def decision_output(b: int = 3, t: int = 5, d: int = 4) -> FusionOutput:
    torch.manual_seed(0)
    per_text = torch.randn(b, 2, t, d)
    per_pooled = torch.randn(b, 2, d)
    return FusionOutput(
        text_tokens=per_text.mean(1),
        pooled=per_pooled.mean(1),
        modality_pooled=per_pooled,
        modality_text_tokens=per_text,
    )


def test_heads_are_registered() -> None:
    assert fusionzoo.HEADS.get("classification") is ClassificationHead
    assert fusionzoo.HEADS.get("vqa") is VQAHead
    assert fusionzoo.HEADS.get("captioning") is CaptioningHead
    assert CaptioningHead.causal and not VQAHead.causal and not ClassificationHead.causal


@pytest.mark.parametrize("name", fusionzoo.HEADS.list())
def test_every_head_says_what_it_reads(name: str) -> None:
    """``create_model`` builds a fusion for what its head reads; a head that does not say reads all."""
    assert getattr(fusionzoo.HEADS.get(name), "reads", "all") in HEAD_READS


@pytest.mark.parametrize("head_cls", [ClassificationHead, VQAHead, CaptioningHead])
@pytest.mark.parametrize("decision_level", [False, True])
def test_a_head_reads_only_what_it_says(head_cls: type[nn.Module], decision_level: bool) -> None:
    """With every output the head says it does not read made NaN, its logits stay the same."""
    fusion = DummyVotingFusion() if decision_level else fusionzoo.FUSIONS.get("early_concat")(4, 4, dim=4)
    vocabulary = None if head_cls is CaptioningHead else ["a", "b", "c"]
    head = head_cls.from_parts(fusion, TextStub(), vocabulary).eval()
    out = decision_output()
    nan = {"pooled": out.pooled, "modality_pooled": out.modality_pooled} if head_cls.reads == "text_tokens" else {
        "text_tokens": out.text_tokens, "modality_text_tokens": out.modality_text_tokens}
    blind = FusionOutput(**{**vars(out), **{k: torch.full_like(v, float("nan")) for k, v in nan.items()}})
    vote = fusion.vote if decision_level else None
    torch.testing.assert_close(head(blind, vote=vote), head(out, vote=vote))


# -- losses ---------------------------------------------------------------------------------


def test_vqa_loss_matches_a_hand_computation() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.5, -0.5, 0.0]])
    scores = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.6, 1.0]])
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    per_sample = []
    for row_logits, row_scores in zip(logits.tolist(), scores.tolist()):
        per_sample.append(
            -sum(s * math.log(sigmoid(x)) + (1 - s) * math.log(1 - sigmoid(x)) for x, s in zip(row_logits, row_scores))
        )
    expected = sum(per_sample) / len(per_sample)  # summed over answers, averaged over the batch
    head = VQAHead(in_dim=4, num_classes=3)
    assert vqa_bce_loss(logits, scores).item() == pytest.approx(expected, rel=1e-6)
    assert head.loss(logits, scores).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="soft scores of shape"):
        head.loss(logits, torch.tensor([0, 1]))


def test_classification_loss_is_cross_entropy_on_label_ids() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (1 + math.e))) / 2
    head = ClassificationHead(in_dim=4, num_classes=2)
    assert head.loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="LongTensor of shape"):
        head.loss(logits, labels.float())


def test_caption_loss_predicts_the_next_token_and_ignores_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)  # (B, T, V)
    labels = torch.tensor([[1, 3, 5, 2], [1, 4, 2, IGNORE_INDEX]])  # [CLS] w w [SEP] / [CLS] w [SEP] pad
    log_p = logits.log_softmax(-1)
    targets = [(0, 0, 3), (0, 1, 5), (0, 2, 2), (1, 0, 4), (1, 1, 2)]  # (b, position, next token)
    expected = -sum(log_p[b, t, y].item() for b, t, y in targets) / len(targets)
    assert caption_lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    head = CaptioningHead(in_dim=4, word_embeddings=nn.Embedding(7, 6))
    assert head.loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


# -- heads ----------------------------------------------------------------------------------


def test_lm_head_is_tied_to_the_word_embeddings() -> None:
    torch.manual_seed(0)
    embeddings = nn.Embedding(11, 6)
    head = CaptioningHead(in_dim=4, word_embeddings=embeddings)
    tokens = torch.randn(2, 3, 4)
    logits = head(FusionOutput(text_tokens=tokens, pooled=tokens[:, 0]))
    predictor = head.predictors[0]
    expected = predictor.transform(tokens) @ embeddings.weight.T + predictor.bias
    torch.testing.assert_close(logits, expected)
    assert logits.shape == (2, 3, 11)
    # The embedding is shared, not owned: not among the head's parameters, but it gets gradients.
    assert all(p is not embeddings.weight for p in head.parameters())
    logits.sum().backward()
    assert embeddings.weight.grad is not None


def test_lm_head_output_ids_restrict_the_vocabulary() -> None:
    torch.manual_seed(0)
    embeddings = nn.Embedding(11, 6)
    full = CaptioningHead(in_dim=4, word_embeddings=embeddings)
    head = CaptioningHead(in_dim=4, word_embeddings=embeddings, output_ids=[7, 2, 9, 2])
    head.load_state_dict(full.state_dict())  # same parameters; output_ids is not saved state
    assert head.output_ids == [2, 7, 9] and not any("ids" in k or "column" in k for k in head.state_dict())
    tokens = torch.randn(2, 3, 4)
    features = FusionOutput(text_tokens=tokens, pooled=tokens[:, 0])
    logits, reference = head(features), full(features)
    keep = torch.tensor([2, 7, 9])
    assert logits.shape == (2, 3, 3)  # columns = output_ids, in order
    torch.testing.assert_close(logits, reference[..., keep])
    # Spread back over the vocabulary: the kept tokens' logits, zero probability elsewhere.
    spread = head.full_vocabulary(logits)
    others = torch.ones(11, dtype=torch.bool)
    others[keep] = False
    torch.testing.assert_close(spread[..., keep], reference[..., keep])
    assert (spread[..., others] == EXCLUDED_LOGIT).all() and spread.softmax(-1)[..., others].max() == 0
    # The loss maps token ids to columns: equal to the full-vocabulary loss with the others excluded.
    labels = torch.tensor([[1, 7, 9], [1, 2, IGNORE_INDEX]])
    torch.testing.assert_close(head.loss(logits, labels), caption_lm_loss(spread, labels))
    head.loss(logits, labels).backward()
    assert torch.isfinite(head.predictors[0].bias.grad).all()
    assert head.predictors[0].bias.grad[others].abs().max() == 0  # excluded tokens get no gradient
    with pytest.raises(ValueError, match="cannot predict"):
        head.loss(logits, torch.tensor([[1, 5, 9], [1, 2, 7]]))  # 5 is not an output id
    with pytest.raises(ValueError, match=r"output_ids must be non-empty token ids in \[0, 11\)"):
        CaptioningHead(in_dim=4, word_embeddings=embeddings, output_ids=[3, 11])


@pytest.mark.parametrize("head_cls", [ClassificationHead, VQAHead])
def test_feature_level_heads_read_the_pooled_vector(head_cls: type[ClassificationHead]) -> None:
    head = head_cls(in_dim=4, num_classes=3).eval()
    out = decision_output()
    torch.testing.assert_close(head(out), head.predictors[0](out.pooled))


@pytest.mark.parametrize(
    "head_cls,activation", [(ClassificationHead, "softmax"), (VQAHead, "sigmoid"), (CaptioningHead, "softmax")]
)
def test_decision_level_heads_predict_per_modality_and_vote(head_cls: type[nn.Module], activation: str) -> None:
    torch.manual_seed(0)
    fusion = DummyVotingFusion()
    head = head_cls.from_parts(fusion, TextStub(), None if head_cls is CaptioningHead else ["a", "b", "c"]).eval()
    assert head.num_modalities == 2 and len(head.predictors) == 2
    out = decision_output()
    logits = head(out, vote=fusion.vote)

    if head_cls is CaptioningHead:
        per_modality = out.modality_text_tokens
        assert fusion.calls == [((3, 2, 5, 11), activation)] and logits.shape == (3, 5, 11)
    else:
        per_modality = out.modality_pooled
        assert fusion.calls == [((3, 2, 3), activation)] and logits.shape == (3, 3)
    # Expert k reads modality k only, with its own predictor, in vote slot k.
    first, second = (head.predictors[k](per_modality[:, k]) for k in range(2))
    torch.testing.assert_close(logits, 2 * first + second)
    assert not torch.allclose(head.predictors[0](per_modality[:, 0]), head.predictors[1](per_modality[:, 0]))

    with pytest.raises(ValueError, match="needs the fusion's vote"):
        head(out)
    with pytest.raises(ValueError, match="decision-level fusion with 2 modalities"):
        head(FusionOutput(text_tokens=out.text_tokens, pooled=out.pooled))


def test_feature_level_fusions_get_feature_level_heads() -> None:
    class Plain(FusionModule):
        def __init__(self, text_dim: int = 4, image_dim: int = 4) -> None:
            super().__init__(text_dim, image_dim)
            self.out_dim = 4

    head = VQAHead.from_parts(Plain(), TextStub(), ["yes", "no"])
    assert head.num_modalities is None and head.num_classes == 2
    with pytest.raises(ValueError, match="non-empty list"):
        VQAHead.from_parts(Plain(), TextStub(), [])
    with pytest.raises(ValueError, match="no answer/label vocabulary"):
        CaptioningHead.from_parts(Plain(), TextStub(), ["a"])
