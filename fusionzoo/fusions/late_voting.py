"""Late (decision-level) fusion: one expert per modality, predictions combined by a vote.

Follows the late-fusion scheme of Snoek, Worring and Smeulders ("Early versus
Late Fusion in Semantic Video Analysis", ACM Multimedia 2005): each modality is
classified on its own and the per-modality decisions are combined. The combiners
are the mean of probabilities (a uniform or learned-weight mixture of experts)
and the product of experts (Hinton, "Training Products of Experts by Minimizing
Contrastive Divergence", Neural Computation 2002).

The module fuses decisions, not features: it returns one feature per modality
(``modality_pooled`` (B, 2, D), ``modality_text_tokens`` (B, 2, T, D)); the head
runs a separate predictor on each and calls :meth:`LateVotingFusion.vote`.
``text_tokens`` / ``pooled`` hold the (weighted) mean over the two experts so
that feature-level heads still work.

The text expert reads each text position on its own, so causal mode needs no
mask; the image expert reads the image summary only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MLP, KVCache, init_weights, masked_mean, running_masked_mean
from ..registry import register_fusion
from .base import FusionModule, FusionOutput

VOTES = ("mean", "learned", "poe")
ACTIVATIONS = ("softmax", "sigmoid")


class LateVotingFusion(FusionModule):
    """Per-modality experts combined by a vote over their predictions.

    Args:
        text_dim: width Dt of the text token states.
        image_dim: width Di of the image token states.
        dim: width of each expert's feature (``out_dim``).
        num_layers: unused (accepted so every fusion builds from the same arguments).
        num_heads: unused, likewise.
        mlp_ratio: hidden width of each expert's projection MLP as a multiple of ``dim``.
        dropout: dropout inside the projection MLPs.
        vote: how predictions are combined: ``"mean"`` (mean of probabilities),
            ``"learned"`` (mean of probabilities with learned softmax-normalised
            expert weights) or ``"poe"`` (product of experts).
    """

    decision_level = True
    num_modalities = 2

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        *,
        dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        vote: str = "mean",
    ) -> None:
        super().__init__(
            text_dim, image_dim, dim=dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dropout=dropout, vote=vote,
        )
        if vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
        hidden = int(dim * mlp_ratio)
        self.out_dim = dim
        self.vote_kind = vote
        self.text_proj = MLP(text_dim, hidden, dim, dropout=dropout)  # text expert's feature
        self.image_proj = MLP(image_dim, hidden, dim, dropout=dropout)  # image expert's feature
        # Expert-weight logits, only for the learned vote; zeros = uniform at the start.
        self.vote_logits = nn.Parameter(torch.zeros(self.num_modalities)) if vote == "learned" else None
        init_weights(self)

    def expert_log_weights(self) -> Tensor:
        """(K,) log of the expert weights: learned softmax weights or uniform 1/K."""
        if self.vote_logits is not None:
            return F.log_softmax(self.vote_logits, dim=0)
        return torch.full((self.num_modalities,), -math.log(self.num_modalities))

    def forward(
        self,
        text: Tensor,
        text_mask: Tensor,
        image: Tensor,
        image_mask: Tensor | None = None,
        *,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> FusionOutput:
        """
        Args:
            text: (B, T, Dt) text token states (with a cache: the T new positions).
            text_mask: (B, T) bool, True = real token (with a cache: all positions so far).
            image: (B, N, Di) image token states.
            image_mask: (B, N) bool or None.
            causal: accepted for the contract; the experts never mix text positions.
            cache: for incremental decoding; advanced by T.
        Returns:
            FusionOutput with modality_pooled (B, 2, D), modality_text_tokens
            (B, 2, T, D), and their weighted means text_tokens (B, T, D), pooled (B, D).
        """
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        new_mask = text_mask[:, offset:]  # (B, T)

        if cache is None or offset == 0:
            image_feature = self.image_proj(masked_mean(image, image_mask))  # (B, D)
            if cache is not None:
                cache.state["late_voting.image_feature"] = image_feature
        else:
            image_feature = cache.state["late_voting.image_feature"]
        text_summary = running_masked_mean(text, new_mask, cache, "late_voting.text")  # (B, Dt)
        modality_pooled = torch.stack([self.text_proj(text_summary), image_feature], dim=1)  # (B, 2, D)

        text_per_token = self.text_proj(text)  # (B, T, D), position by position
        image_per_token = image_feature[:, None].expand_as(text_per_token)  # (B, T, D)
        modality_text_tokens = torch.stack([text_per_token, image_per_token], dim=1)  # (B, 2, T, D)

        weights = self.expert_log_weights().to(text_per_token).exp()  # (K,)
        pooled = torch.einsum("k,bkd->bd", weights, modality_pooled)  # (B, D)
        text_tokens = torch.einsum("k,bktd->btd", weights, modality_text_tokens)  # (B, T, D)
        if cache is not None:
            cache.offset += text.shape[1]
        return FusionOutput(
            text_tokens=text_tokens,
            pooled=pooled,
            modality_pooled=modality_pooled,
            modality_text_tokens=modality_text_tokens,
        )

    def vote(self, logits: Tensor, activation: str = "softmax") -> Tensor:
        """Combine the experts' predictions.

        Args:
            logits: (B, K, ..., C), one prediction per expert (K = 2: text, image).
            activation: ``"softmax"`` (one class out of C) or ``"sigmoid"`` (C
                independent binary labels).
        Returns:
            (B, ..., C) logits; their activation is the combined prediction:

            * softmax, mean/learned: ``log sum_k w_k softmax(l_k)`` (log of the
              mixture of probabilities, already normalised);
            * softmax, poe: ``sum_k log_softmax(l_k)`` (softmax of it is the
              normalised product of the experts' distributions);
            * sigmoid, mean/learned: ``logit(sum_k w_k sigmoid(l_k))``, computed
              in log space so saturated experts stay finite;
            * sigmoid, poe: ``sum_k l_k`` (the normalised product of Bernoulli experts).
        """
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if logits.dim() < 3 or logits.shape[1] != self.num_modalities:
            raise ValueError(
                f"expected logits (B, K={self.num_modalities}, ..., C) with one prediction per "
                f"modality, got shape {tuple(logits.shape)}"
            )
        if self.vote_kind == "poe":
            return logits.sum(dim=1) if activation == "sigmoid" else F.log_softmax(logits, dim=-1).sum(dim=1)
        # Mixture: log w_k broadcast over (B, K, ..., C).
        log_w = self.expert_log_weights().to(logits).view(1, -1, *([1] * (logits.dim() - 2)))
        if activation == "softmax":
            return torch.logsumexp(F.log_softmax(logits, dim=-1) + log_w, dim=1)
        log_p = torch.logsumexp(F.logsigmoid(logits) + log_w, dim=1)  # log of the mean probability
        log_not_p = torch.logsumexp(F.logsigmoid(-logits) + log_w, dim=1)  # log of 1 - it
        return log_p - log_not_p


register_fusion("late_voting")(LateVotingFusion)
