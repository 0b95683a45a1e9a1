"""Image-text matching head: does this text describe this image? (retrieval's reranker)

Follows ALBEF's and ViLT's ITM heads (Li et al., 2021; Kim et al., 2021): one
Linear layer from the fusion's joint vector to two logits, "no match" (0) and
"match" (1), trained with cross-entropy on matching pairs and hard negatives.
A retrieval model ranks the ITC shortlist of each query by the match log-odds
``logits[:, 1] - logits[:, 0]``.

What each fusion means with this head (it reads ``FusionOutput.pooled``):

=====================  =========================================================
fusion                 matching means
=====================  =========================================================
early_concat           a Linear on the MLP of the concatenated summaries: the
                       pair interacts only inside that MLP.
late_voting            a Linear on the mean of a text-only and an image-only
                       feature: a sum of two one-modality scores, which cannot
                       tell a matching pair from a mismatched one (its ITM stays
                       near chance; reranking with it shows what a fusion buys).
attention_weighted     a Linear on a learned convex mix of the two summaries.
co_attention           a Linear on the co-attended streams (ViLBERT / METER).
merged_transformer     ViLT's ITM: a Linear on the pooler of the joint Transformer.
albef                  ALBEF's ITM: a Linear on the fused [CLS] state.
=====================  =========================================================
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fusions.base import FusionModule, FusionOutput
from ..registry import register_head


class ITMHead(nn.Module):
    """Joint vector (B, D) -> 2 logits (no match, match); cross-entropy against 0/1 labels.

    Args:
        in_dim: the fusion's ``out_dim``.
    """

    loss_name: ClassVar[str] = "itm"
    causal: ClassVar[bool] = False
    reads: ClassVar[str] = "pooled"
    reads_pooled_only: ClassVar[bool] = True
    #: Names of pretraining's ITM weights -> this head's (``init_from`` carries them over).
    init_aliases: ClassVar[dict[str, str]] = {"itm.head.": "linear."}
    #: What ``FusionModel.predict`` says for each logit.
    labels: ClassVar[tuple[str, str]] = ("no match", "match")

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.linear = nn.Linear(in_dim, 2)

    @classmethod
    def from_parts(cls, fusion: FusionModule, text: nn.Module, vocabulary: Sequence[str] | None,
                   **kwargs: object) -> "ITMHead":
        """Build the head for a built fusion (used by ``create_model``); there is no output vocabulary."""
        if vocabulary:
            raise ValueError("the ITM head predicts match / no match and takes no output vocabulary")
        return cls(fusion.out_dim, **kwargs)

    def forward(self, features: FusionOutput, vote: object = None) -> Tensor:
        """``features.pooled`` (B, D) -> logits (B, 2); a decision-level fusion's vote is not used."""
        return self.linear(features.pooled)

    @staticmethod
    def log_odds(logits: Tensor) -> Tensor:
        """(B, 2) logits -> (B,) ``log p(match) - log p(no match)``, the reranking score."""
        return logits[..., 1] - logits[..., 0]

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of (B, 2) logits against (B,) long labels (1 = match)."""
        if labels.dtype != torch.long or labels.shape != logits.shape[:1]:
            raise ValueError(f"ITM labels must be a LongTensor of shape ({logits.shape[0]},) holding 0 (no match) "
                             f"or 1 (match), got dtype {labels.dtype} and shape {tuple(labels.shape)}")
        return F.cross_entropy(logits.float(), labels)


register_head("itm")(ITMHead)
