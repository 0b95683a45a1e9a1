"""Attention-weighted modality fusion: a learned, input-dependent convex mix of modalities.

Follows the modality attention of Hori et al. ("Attention-Based Multimodal Fusion
for Video Description", ICCV 2017): each modality's vector gets a score from a
small tanh network, ``s_k = w^T tanh(W x_k + b)``, the scores are softmax-normalised
over modalities and the fused vector is ``sum_k beta_k x_k``. Here the scorer is
shared by the modalities (all projected to the same width) and there is no
decoder state, so the weights depend on the inputs only:

* per sample: modalities [text summary, image summary] -> ``pooled`` with
  weights ``aux["modality_weights"]`` (B, 2);
* per text position t: modalities [text_t, image summary] -> ``text_tokens``
  with weights ``aux["token_weights"]`` (B, T, 2).

A text position never reads other text positions, so causal mode needs no mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import KVCache, init_weights, masked_mean, running_masked_mean
from ..registry import register_fusion
from .base import FusionModule, FusionOutput


class ModalityScorer(nn.Module):
    """``w^T tanh(W x + b)``: one scalar score per modality vector, (..., D) -> (...)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, hidden_dim)
        # No bias: a constant added to every modality's score cancels in the softmax.
        self.score = nn.Linear(hidden_dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(torch.tanh(self.hidden(x))).squeeze(-1)


def weighted_sum(candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the modality axis and mix.

    Args:
        candidates: (..., K, D) one vector per modality.
        scores: (..., K).
    Returns:
        the mix (..., D) and the weights (..., K), which sum to 1.
    """
    weights = scores.softmax(dim=-1)
    return (weights.unsqueeze(-1) * candidates).sum(dim=-2), weights


class AttentionWeightedFusion(FusionModule):
    """Convex combination of the text and image vectors with learned attention weights.

    Args:
        text_dim: width Dt of the text token states.
        image_dim: width Di of the image token states.
        dim: width both modalities are projected to (``out_dim``).
        num_layers: unused (accepted so every fusion builds from the same arguments).
        num_heads: unused, likewise.
        mlp_ratio: hidden width of the scoring network as a multiple of ``dim``.
        dropout: dropout on the projected token states.
    """

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
    ) -> None:
        super().__init__(
            text_dim, image_dim, dim=dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dropout=dropout,
        )
        self.out_dim = dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.scorer = ModalityScorer(dim, max(1, int(dim * mlp_ratio)))
        init_weights(self)

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
            causal: accepted for the contract; text positions are never mixed.
            cache: for incremental decoding; advanced by T.
        Returns:
            FusionOutput with text_tokens (B, T, D), pooled (B, D) and
            aux ``modality_weights`` (B, 2), ``token_weights`` (B, T, 2).
        """
        self.check_inputs(text, text_mask, image, image_mask)
        offset = self.check_step(text, text_mask, causal, cache)
        new_mask = text_mask[:, offset:]  # (B, T)

        t = self.drop(self.text_proj(text))  # (B, T, D)
        if cache is None or offset == 0:
            image_summary = masked_mean(self.drop(self.image_proj(image)), image_mask)  # (B, D)
            if cache is not None:
                cache.state["attention_weighted.image_summary"] = image_summary
        else:
            image_summary = cache.state["attention_weighted.image_summary"]
        text_summary = running_masked_mean(t, new_mask, cache, "attention_weighted.text")  # (B, D)

        summaries = torch.stack([text_summary, image_summary], dim=1)  # (B, 2, D)
        pooled, modality_weights = weighted_sum(summaries, self.scorer(summaries))  # (B, D), (B, 2)

        per_token = torch.stack([t, image_summary[:, None].expand_as(t)], dim=2)  # (B, T, 2, D)
        text_tokens, token_weights = weighted_sum(per_token, self.scorer(per_token))  # (B, T, D), (B, T, 2)
        if cache is not None:
            cache.offset += text.shape[1]
        return FusionOutput(
            text_tokens=text_tokens,
            pooled=pooled,
            aux={"modality_weights": modality_weights, "token_weights": token_weights},
        )


register_fusion("attention_weighted")(AttentionWeightedFusion)
