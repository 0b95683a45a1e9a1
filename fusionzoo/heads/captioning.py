"""Captioning head: a language-model head over fused caption states.

The caption decoder is the model's own text encoder run causally (``is_decoder``,
left to right), conditioned on the image through the fusion module called with
``causal=True``: caption ids -> causal text states -> fusion -> ``text_tokens``
-> this head -> next-token logits. The head is BERT's masked-LM prediction head
(Devlin et al., 2019), reused as a decoder output layer as in BLIP (Li et al.,
2022): Linear(out_dim -> text width), GELU, LayerNorm, then logits through the
text encoder's word-embedding matrix (tied weights, Press & Wolf 2017) plus a
per-token bias.

Training is teacher forcing: the logits at position ``t`` predict token ``t + 1``
(:func:`caption_lm_loss`), padding is ignored (label ``-100``); the caption starts
with the tokenizer's [CLS] (the BOS token) and ends with [SEP] (EOS), so the model
learns when to stop.

For a decision-level fusion each modality has its own predictor (own transform
and bias, the same tied embedding matrix) on ``modality_text_tokens[:, k]`` and
the fusion's vote combines their softmax distributions. Late voting for
captioning is therefore a *mixture* (or, with the fusion's ``vote="poe"``, a
*product*) of experts between an image-conditioned word predictor, which sees
only the image, and a text-only language model reading the caption prefix.

What each fusion means with this head:

=====================  =========================================================
fusion                 captioning means
=====================  =========================================================
early_concat           each caption position's state concatenated with the
                       image summary, then an MLP (a "show and tell"-style
                       decoder that is shown the image at every step); with
                       ``num_layers > 0`` a prefix-LM Transformer over
                       [image; caption] on top.
late_voting            mixture / product of experts between an image-only word
                       predictor (one bag-of-words distribution from the image
                       summary, the same at every position) and a text-only
                       language model over the caption prefix (see above).
attention_weighted     each caption position is a learned convex mix of its own
                       state and the image summary (modality attention, Hori
                       et al. 2017, without a decoder state in the scorer).
co_attention           the caption stream cross-attends to the image stream;
                       the image stream reads only the [CLS] position, so no
                       caption position can see a later one through it.
merged_transformer     one Transformer over image patches + caption with a
                       prefix-LM mask: caption positions see all patches and
                       earlier words only (SimVLM-style prefix LM on ViLT).
albef                  ALBEF's fusion layers (self-attention + cross-attention
                       to the image) run causally: BLIP's image-grounded text
                       decoder, with ALBEF's ITC added as an auxiliary loss.
=====================  =========================================================
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fusions.base import FusionModule, FusionOutput
from ..layers import Linear, init_weights, linear
from ..registry import register_head
from .classification import VoteFn

#: Label value that :func:`caption_lm_loss` ignores (padding), as in ``torch`` and ``transformers``.
IGNORE_INDEX = -100


def caption_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Teacher-forcing next-token cross-entropy.

    Args:
        logits: (B, T, V); position ``t`` predicts token ``t + 1``.
        labels: (B, T) token ids, :data:`IGNORE_INDEX` where the loss must not look
            (padding). ``labels[:, 0]`` (the BOS token) is never a target.
    Returns:
        scalar: mean cross-entropy over the non-ignored targets ``labels[:, 1:]``.
    """
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1].reshape(-1, vocab)  # (B * (T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    return F.cross_entropy(shifted_logits, targets, ignore_index=IGNORE_INDEX)


class LMPredictor(nn.Module):
    """BERT's LM prediction head: Linear -> GELU -> LayerNorm -> tied embedding + bias.

    ``word_embeddings`` is shared, not owned: its weight stays the text encoder's.
    """

    def __init__(self, in_dim: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        width, vocab = word_embeddings.embedding_dim, word_embeddings.num_embeddings
        self.transform = nn.Sequential(Linear(in_dim, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab))
        init_weights(self.transform)
        # Kept out of the module tree (the text encoder owns it; it is tied, not copied).
        self._embeddings = (word_embeddings,)

    def forward(self, x: Tensor) -> Tensor:
        h = self.transform(x)  # (..., T, width)
        return linear(h, self._embeddings[0].weight, self.bias)  # (..., T, V)


class CaptioningHead(nn.Module):
    """Fused caption states -> next-token logits over the tokenizer's vocabulary.

    Args:
        in_dim: the fusion's ``out_dim``.
        word_embeddings: the text encoder's input embedding (V, width); the
            output projection is tied to its weight.
        num_modalities: ``None`` for a feature-level fusion (one predictor on
            ``text_tokens``); ``K`` for a decision-level fusion (one predictor per
            modality on ``modality_text_tokens[:, k]``, combined by the vote).
    """

    loss_name: ClassVar[str] = "lm"
    causal: ClassVar[bool] = True
    vote_activation: ClassVar[str] = "softmax"

    def __init__(self, in_dim: int, word_embeddings: nn.Embedding, num_modalities: int | None = None) -> None:
        super().__init__()
        if num_modalities is not None and num_modalities < 1:
            raise ValueError(f"num_modalities must be None (feature-level) or >= 1, got {num_modalities}")
        self.in_dim = in_dim
        self.vocab_size = word_embeddings.num_embeddings
        self.num_modalities = num_modalities
        self.predictors = nn.ModuleList(LMPredictor(in_dim, word_embeddings) for _ in range(num_modalities or 1))

    @classmethod
    def from_parts(
        cls,
        fusion: FusionModule,
        text: nn.Module,
        vocabulary: Sequence[str] | None,
        **kwargs: object,
    ) -> "CaptioningHead":
        """Build the head for a built fusion and text encoder (used by ``create_model``)."""
        if vocabulary is not None:
            raise ValueError("the captioning head predicts tokenizer ids; it takes no answer/label vocabulary")
        num_modalities = fusion.num_modalities if fusion.decision_level else None
        return cls(fusion.out_dim, text.word_embeddings(), num_modalities=num_modalities, **kwargs)

    def forward(self, features: FusionOutput, vote: VoteFn | None = None) -> Tensor:
        """
        Args:
            features: the fusion output; reads ``text_tokens`` (B, T, D), or
                ``modality_text_tokens`` (B, K, T, D) for a decision-level fusion.
            vote: the fusion's ``vote`` (required for a decision-level fusion).
        Returns:
            logits (B, T, V); position ``t`` scores token ``t + 1``.
        """
        if self.num_modalities is None:
            return self.predictors[0](features.text_tokens)  # (B, T, V)
        per_modality = features.modality_text_tokens
        if per_modality is None or per_modality.dim() != 4 or per_modality.shape[1] != self.num_modalities:
            got = None if per_modality is None else tuple(per_modality.shape)
            raise ValueError(
                f"this head was built for a decision-level fusion with {self.num_modalities} modalities and "
                f"expects FusionOutput.modality_text_tokens of shape (B, {self.num_modalities}, T, D), got {got}"
            )
        if vote is None:
            raise ValueError("a decision-level head needs the fusion's vote function: head(features, vote=fusion.vote)")
        logits = torch.stack(
            [p(per_modality[:, k]) for k, p in enumerate(self.predictors)], dim=1
        )  # (B, K, T, V)
        return vote(logits, activation=self.vote_activation)  # (B, T, V)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Next-token loss of logits (B, T, V) against caption ids (B, T) (-100 = ignore)."""
        if labels.dtype != torch.long or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"caption labels must be a LongTensor of shape {tuple(logits.shape[:2])} (token ids, "
                f"{IGNORE_INDEX} at padding), got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        return caption_lm_loss(logits, labels)


register_head("captioning")(CaptioningHead)
