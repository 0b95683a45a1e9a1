"""Classification head: one label per image-text pair from the fusion's joint vector.

Follows the classifier heads of ViLT (Kim et al., 2021) and VisualBERT (Li et al.,
2019): the pooled joint vector goes through a small MLP to ``C`` logits and is
trained with cross-entropy. For a decision-level fusion (late voting, Ramachandram
& Taylor 2017, "Deep multimodal learning: a survey") there is one such predictor
per modality, each reading only its own modality's vector, and the fusion's
:meth:`~fusionzoo.fusions.base.FusionModule.vote` combines their softmax
predictions.

What each fusion means with this head (the joint vector is ``FusionOutput.pooled``):

=====================  =========================================================
fusion                 classification means
=====================  =========================================================
early_concat           an MLP on ``MLP([text summary; image summary])`` of the
                       projected features: the concatenation baseline (Ngiam
                       et al. 2011; Antol et al. 2015).
late_voting            a text-only and an image-only classifier whose softmax
                       outputs are combined by the fusion's vote (mean, learned
                       weights or product of experts); no feature ever sees
                       the other modality.
attention_weighted     an MLP on a per-sample convex mix of the text and image
                       summaries, weighted by a learned scorer (Hori et al.
                       2017 modality attention).
co_attention           an MLP on ``Linear([text mean; image mean])`` of the two
                       co-attended streams (ViLBERT / METER).
merged_transformer     an MLP on ViLT's pooler (first text token) of one
                       Transformer over the joined [image; text] sequence.
albef                  an MLP on the fused [CLS] state of ALBEF's cross-attention
                       layers; the model adds ALBEF's image-text contrastive
                       (ITC) loss from ``fusion.aux_loss``.
=====================  =========================================================
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fusions.base import FusionModule, FusionOutput
from ..layers import MLP, init_weights
from ..registry import register_head

#: ``vote(logits (B, K, ..., C), activation) -> (B, ..., C)``: a decision-level
#: fusion's :meth:`~fusionzoo.fusions.base.FusionModule.vote`.
VoteFn = Callable[..., Tensor]


class Predictor(nn.Module):
    """LayerNorm -> MLP (Linear, GELU, dropout, Linear): a joint vector (B, D) -> (B, C)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = MLP(in_dim, hidden_dim, num_outputs, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))  # (B, C)


class ClassificationHead(nn.Module):
    """Pooled joint vector -> ``num_classes`` logits; cross-entropy against label ids.

    Args:
        in_dim: the fusion's ``out_dim``.
        num_classes: number of labels ``C``.
        num_modalities: ``None`` for a feature-level fusion (one predictor on
            ``pooled``); ``K`` for a decision-level fusion (one predictor per
            modality on ``modality_pooled[:, k]``, combined by the fusion's vote).
        hidden_mult: MLP hidden width as a multiple of ``in_dim`` (ViLT uses 2).
        dropout: dropout inside the MLP.
    """

    #: Name of the task loss in ``ModelOutput.losses``.
    loss_name: ClassVar[str] = "ce"
    #: True for heads that decode text left to right (needs a causal text encoder).
    causal: ClassVar[bool] = False
    #: How a decision-level fusion combines the per-modality predictions.
    vote_activation: ClassVar[str] = "softmax"
    #: What of the fusion output this head reads (one of :data:`~fusionzoo.fusions.base.HEAD_READS`):
    #: the per-sample vector, ``pooled`` (``modality_pooled`` for a decision-level fusion);
    #: ``create_model`` builds the fusion for it.
    reads: ClassVar[str] = "pooled"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_modalities: int | None = None,
        hidden_mult: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__} needs at least one output class, got num_classes={num_classes}")
        if num_modalities is not None and num_modalities < 1:
            raise ValueError(f"num_modalities must be None (feature-level) or >= 1, got {num_modalities}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.num_modalities = num_modalities
        hidden = max(1, int(in_dim * hidden_mult))
        self.predictors = nn.ModuleList(
            Predictor(in_dim, hidden, num_classes, dropout) for _ in range(num_modalities or 1)
        )
        init_weights(self)

    @classmethod
    def from_parts(
        cls,
        fusion: FusionModule,
        text: nn.Module,
        vocabulary: Sequence[str] | None,
        **kwargs: object,
    ) -> "ClassificationHead":
        """Build the head that fits a built fusion and a label list (used by ``create_model``)."""
        if not vocabulary:
            raise ValueError(f"the {cls.__name__} needs a non-empty list of output strings")
        num_modalities = fusion.num_modalities if fusion.decision_level else None
        return cls(fusion.out_dim, len(vocabulary), num_modalities=num_modalities, **kwargs)

    @property
    def reads_pooled_only(self) -> bool:
        """True for a feature-level head: it reads ``FusionOutput.pooled`` and nothing else."""
        return self.num_modalities is None

    def forward(self, features: FusionOutput, vote: VoteFn | None = None) -> Tensor:
        """
        Args:
            features: the fusion output; reads ``pooled`` (B, D), or
                ``modality_pooled`` (B, K, D) for a decision-level fusion.
            vote: the fusion's ``vote`` (required for a decision-level fusion).
        Returns:
            logits (B, C).
        """
        if self.num_modalities is None:
            return self.predictors[0](features.pooled)  # (B, C)
        per_modality = features.modality_pooled
        if per_modality is None or per_modality.dim() != 3 or per_modality.shape[1] != self.num_modalities:
            got = None if per_modality is None else tuple(per_modality.shape)
            raise ValueError(
                f"this head was built for a decision-level fusion with {self.num_modalities} modalities and "
                f"expects FusionOutput.modality_pooled of shape (B, {self.num_modalities}, D), got {got}"
            )
        if vote is None:
            raise ValueError("a decision-level head needs the fusion's vote function: head(features, vote=fusion.vote)")
        logits = torch.stack(
            [p(per_modality[:, k]) for k, p in enumerate(self.predictors)], dim=1
        )  # (B, K, C)
        return vote(logits, activation=self.vote_activation)  # (B, C)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of logits (B, C) against label ids (B,) (a LongTensor)."""
        if labels.dtype != torch.long or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"classification labels must be a LongTensor of shape ({logits.shape[0]},) holding "
                f"label ids, got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        return F.cross_entropy(logits, labels)


register_head("classification")(ClassificationHead)
