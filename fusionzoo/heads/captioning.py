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
from ..losses import IGNORE_INDEX  # the label that caption_lm_loss ignores (padding)
from ..registry import register_head
from .classification import VoteFn


#: The logit :meth:`CaptioningHead.full_vocabulary` gives tokens outside a head's ``output_ids``:
#: zero probability in any float type (``exp(-1e4)`` underflows), yet finite.
EXCLUDED_LOGIT = -1e4


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

    def __init__(self, in_dim: int, word_embeddings: nn.Embedding, output_ids: Tensor | None = None) -> None:
        super().__init__()
        width, vocab = word_embeddings.embedding_dim, word_embeddings.num_embeddings
        self.transform = nn.Sequential(Linear(in_dim, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab))
        init_weights(self.transform)
        # Kept out of the module tree (the text encoder owns it; it is tied, not copied).
        self._embeddings = (word_embeddings,)
        self.register_buffer("output_ids", output_ids, persistent=False)  # (V',) sorted ids, or None

    def forward(self, x: Tensor) -> Tensor:
        h = self.transform(x)  # (..., T, width)
        weight = self._embeddings[0].weight
        if self.output_ids is None:
            return linear(h, weight, self.bias)  # (..., T, V)
        return linear(h, weight[self.output_ids], self.bias[self.output_ids])  # (..., T, V')


class CaptioningHead(nn.Module):
    """Fused caption states -> next-token logits over the tokenizer's vocabulary.

    Args:
        in_dim: the fusion's ``out_dim``.
        word_embeddings: the text encoder's input embedding (V, width); the
            output projection is tied to its weight.
        num_modalities: ``None`` for a feature-level fusion (one predictor on
            ``text_tokens``); ``K`` for a decision-level fusion (one predictor per
            modality on ``modality_text_tokens[:, k]``, combined by the vote).
        output_ids: token ids the head may predict (e.g. every token of the
            training captions, their end token included); None = the whole
            vocabulary. With them, :meth:`forward` scores only these V' tokens
            (logits (B, T, V'), column j = token ``output_ids[j]``), :meth:`loss`
            maps the labels to columns, and :meth:`full_vocabulary` spreads
            logits back over the vocabulary (the others at :data:`EXCLUDED_LOGIT`)
            for generation. MiniLM's 30,522-token projection and softmax were most
            of a captioning training step; COCO captions use a few thousand tokens.
    """

    loss_name: ClassVar[str] = "lm"
    causal: ClassVar[bool] = True
    vote_activation: ClassVar[str] = "softmax"
    #: What of the fusion output this head reads: the per-position states, ``text_tokens``
    #: (``modality_text_tokens`` for a decision-level fusion); ``create_model`` builds the fusion for it.
    reads: ClassVar[str] = "text_tokens"

    def __init__(self, in_dim: int, word_embeddings: nn.Embedding, num_modalities: int | None = None,
                 output_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        if num_modalities is not None and num_modalities < 1:
            raise ValueError(f"num_modalities must be None (feature-level) or >= 1, got {num_modalities}")
        self.in_dim = in_dim
        self.vocab_size = word_embeddings.num_embeddings
        self.num_modalities = num_modalities
        self.output_ids = sorted(set(int(i) for i in output_ids)) if output_ids is not None else None
        ids = None
        if self.output_ids is not None:
            if not self.output_ids or self.output_ids[0] < 0 or self.output_ids[-1] >= self.vocab_size:
                span = f" in [{self.output_ids[0]}, {self.output_ids[-1]}]" if self.output_ids else ""
                raise ValueError(f"output_ids must be non-empty token ids in [0, {self.vocab_size}), got "
                                 f"{len(self.output_ids)} ids{span}")
            ids = torch.as_tensor(self.output_ids, dtype=torch.long)
            column = torch.full((self.vocab_size,), -1, dtype=torch.long)  # token id -> logit column, -1: none
            column[ids] = torch.arange(len(ids))
            self.register_buffer("_column", column, persistent=False)
        self.predictors = nn.ModuleList(
            LMPredictor(in_dim, word_embeddings, None if ids is None else ids.clone())
            for _ in range(num_modalities or 1)
        )

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
            logits (B, T, V), or (B, T, V') over ``output_ids``; position ``t`` scores token ``t + 1``.
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
        """Next-token loss of logits (B, T, V or V') against caption ids (B, T) (-100 = ignore)."""
        if labels.dtype != torch.long or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"caption labels must be a LongTensor of shape {tuple(logits.shape[:2])} (token ids, "
                f"{IGNORE_INDEX} at padding), got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        if self.output_ids is not None:
            targets = labels[:, 1:]
            real = targets != IGNORE_INDEX
            columns = self._column[targets.clamp_min(0)]  # (B, T-1)
            if bool((real & (columns < 0)).any()):
                missing = sorted(set(targets[real & (columns < 0)].tolist()))[:10]
                raise ValueError(f"caption labels contain token ids this head cannot predict (not in its "
                                 f"output_ids): {missing}")
            labels = torch.cat([labels[:, :1], torch.where(real, columns, IGNORE_INDEX)], dim=1)
        return caption_lm_loss(logits, labels)

    def full_vocabulary(self, logits: Tensor) -> Tensor:
        """Logits (..., V') over ``output_ids`` as logits (..., V) over the vocabulary; unchanged without them."""
        if self.output_ids is None or logits.shape[-1] == self.vocab_size:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), EXCLUDED_LOGIT)
        return full.index_copy(-1, self.predictors[0].output_ids, logits)  # the ids, on the head's device


register_head("captioning")(CaptioningHead)
