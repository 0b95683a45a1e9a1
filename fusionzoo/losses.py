"""Vision-language pre-training losses: ITC, ITM and MLM, as modules with function twins.

Follows ALBEF (Li et al., "Align before Fuse: Vision and Language Representation
Learning with Momentum Distillation", NeurIPS 2021):

* **ITC**, image-text contrastive: a symmetric InfoNCE over in-batch pairs of
  unit-norm image and text embeddings divided by a learnable temperature,
  optionally against the soft targets of momentum distillation
  (:func:`itc_loss`, :class:`ITCLoss`, :func:`itc_similarities`,
  :func:`momentum_targets`).
* **ITM**, image-text matching: a binary head on the fused [CLS] state, trained
  on the positive pairs and on one hard negative per image and per text, drawn
  with probability ``softmax(similarity)`` over the other pairs of the batch
  (:func:`sample_hard_negatives`, :class:`ITMLoss`, :func:`itm_loss`).
* **MLM**, masked language modelling on the fused text states, with BERT's
  80/10/10 corruption (:func:`mask_tokens`, :class:`MLMHead`,
  :class:`MLMLoss`, :func:`mlm_loss`).

Every module is a thin wrapper over its plain function (the TorchMultimodal
convention, STYLE.md). Nothing here draws random numbers on its own: sampling
takes a ``torch.Generator`` argument (STYLE.md rule 9). A CPU generator may
drive tensors on any device; the draws are made on the generator's device and
moved, so a seed gives the same draws on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # typing only: fusions import this module (ALBEF's ITC), not the reverse
    from .fusions.base import FusionModule

IGNORE_INDEX = -100  # label of positions that no loss reads (PyTorch's cross-entropy default)


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Where random numbers are drawn: the generator's device, else the data's."""
    return generator.device if generator is not None else fallback


# -- ITC: image-text contrastive -------------------------------------------------


def itc_similarities(image_embed: Tensor, text_embed: Tensor, temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    """Scaled cosine similarities of every image with every text and back.

    Args:
        image_embed: (B, E) unit-norm image embeddings.
        text_embed: (B, E) unit-norm text embeddings; row i is paired with image i.
            To use negatives from other processes, pass the gathered embeddings
            (B_global, E) on both sides.
        temperature: scalar (float or 0-d tensor), > 0.
    Returns:
        ``(sim_i2t, sim_t2i)``, each (B, B): ``sim_i2t[i, j] = <image_i, text_j> / temperature``
        and ``sim_t2i = sim_i2t.T``.
    """
    if image_embed.dim() != 2 or text_embed.dim() != 2 or image_embed.shape != text_embed.shape:
        raise ValueError(
            f"expected image_embed and text_embed of the same shape (B, E), got "
            f"{tuple(image_embed.shape)} and {tuple(text_embed.shape)}"
        )
    if not torch.is_tensor(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sim_i2t = image_embed @ text_embed.t() / temperature  # (B, B)
    return sim_i2t, sim_i2t.t()


def momentum_targets(sim_i2t_m: Tensor, sim_t2i_m: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """ALBEF's momentum-distillation targets for :func:`itc_loss`.

    ``targets = alpha * softmax(sim_momentum) + (1 - alpha) * one_hot(diagonal)``,
    for each direction.

    Args:
        sim_i2t_m: (B, B) image-to-text similarities of the momentum model.
        sim_t2i_m: (B, B) text-to-image similarities of the momentum model.
        alpha: distillation weight in [0, 1] (ALBEF: 0.4, ramped up in the first epoch).
    Returns:
        ``(targets_i2t, targets_t2i)``, each (B, B), rows summing to 1, no gradient.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    with torch.no_grad():
        eye = torch.eye(sim_i2t_m.shape[0], sim_i2t_m.shape[1], device=sim_i2t_m.device, dtype=sim_i2t_m.dtype)
        targets_i2t = alpha * sim_i2t_m.softmax(dim=1) + (1 - alpha) * eye  # (B, B)
        targets_t2i = alpha * sim_t2i_m.softmax(dim=1) + (1 - alpha) * eye  # (B, B)
    return targets_i2t, targets_t2i


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j targets[i, j] * log_softmax(logits)[i, j]``."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_embed: Tensor,
    text_embed: Tensor,
    temperature: Tensor | float,
    soft_targets: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Symmetric InfoNCE: the mean of the image->text and text->image cross-entropies.

    Args:
        image_embed: (B, E) unit-norm image embeddings.
        text_embed: (B, E) unit-norm text embeddings, row i paired with image i.
        temperature: scalar > 0 (ALBEF's is learnable, clamped to [0.001, 0.5]).
        soft_targets: ``(targets_i2t, targets_t2i)``, each (B, B) with rows
            summing to 1 (see :func:`momentum_targets`); ``None`` means one-hot
            targets on the diagonal.
    Returns:
        scalar loss ``(CE(sim_i2t, targets_i2t) + CE(sim_t2i, targets_t2i)) / 2``.
    """
    sim_i2t, sim_t2i = itc_similarities(image_embed, text_embed, temperature)  # (B, B) each
    if soft_targets is None:
        positives = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)  # (B,)
        return (F.cross_entropy(sim_i2t, positives) + F.cross_entropy(sim_t2i, positives)) / 2
    targets_i2t, targets_t2i = soft_targets
    for name, t in (("targets_i2t", targets_i2t), ("targets_t2i", targets_t2i)):
        if t.shape != sim_i2t.shape:
            raise ValueError(f"soft target {name} must be (B, B) = {tuple(sim_i2t.shape)}, got {tuple(t.shape)}")
    return (_soft_cross_entropy(sim_i2t, targets_i2t) + _soft_cross_entropy(sim_t2i, targets_t2i)) / 2


class ITCLoss(nn.Module):
    """Module form of :func:`itc_loss` (no parameters: the temperature lives in the fusion)."""

    def forward(
        self,
        image_embed: Tensor,
        text_embed: Tensor,
        temperature: Tensor | float,
        soft_targets: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Shapes as in :func:`itc_loss`; returns a scalar."""
        return itc_loss(image_embed, text_embed, temperature, soft_targets)


# -- ITM: image-text matching with hard negatives ---------------------------------


def sample_hard_negatives(
    sim: Tensor, generator: torch.Generator | None, positives: Tensor | None = None
) -> Tensor:
    """Draw one hard negative per row, with probability ``softmax(sim)`` off the positive.

    ALBEF's sampler: row i picks column j != positive(i) with probability
    ``exp(sim[i, j]) / sum_{k != positive(i)} exp(sim[i, k])`` (the softmax with
    the positive's weight set to zero, renormalised), so similar but wrong
    pairs are drawn most often. Computed with the positive masked out before the
    softmax, so a row whose softmax sits almost entirely on its positive still
    has a valid distribution.

    Args:
        sim: (R, C) similarities, C >= 2; no gradient flows through the draw.
            The caller decides what the columns are: the local batch, or all
            candidates gathered across processes.
        generator: the source of randomness (``None``: PyTorch's global RNG).
        positives: (R,) column of each row's positive; defaults to the diagonal
            ``arange(R)`` (then R <= C).
    Returns:
        (R,) long column indices on ``sim``'s device, never the positive.
    """
    if sim.dim() != 2:
        raise ValueError(f"expected a (rows, candidates) similarity matrix, got shape {tuple(sim.shape)}")
    rows, cols = sim.shape
    if cols < 2:
        raise ValueError(
            f"hard-negative sampling needs at least 2 candidates per row (a batch of 2 or more pairs), "
            f"got a similarity matrix of shape {tuple(sim.shape)}"
        )
    if positives is None:
        if rows > cols:
            raise ValueError(f"with the diagonal as positives, sim needs rows <= columns, got {tuple(sim.shape)}")
        positives = torch.arange(rows, device=sim.device)
    elif positives.shape != (rows,):
        raise ValueError(f"positives must be ({rows},), got {tuple(positives.shape)}")
    with torch.no_grad():
        is_positive = torch.arange(cols, device=sim.device)[None, :] == positives.to(sim.device)[:, None]  # (R, C)
        weights = sim.detach().float().masked_fill(is_positive, float("-inf")).softmax(dim=1)  # (R, C)
        device = _draw_device(generator, sim.device)
        drawn = torch.multinomial(weights.to(device), 1, generator=generator).squeeze(1)  # (R,)
    return drawn.to(sim.device)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ITM logits (N, 2) against labels (N,) (1 = matching pair); a scalar."""
    if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected ITM logits (N, 2) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits, labels)


@dataclass
class ITMOutput:
    """What :class:`ITMLoss` returns.

    Attributes:
        loss: scalar cross-entropy over the 3B pairs.
        logits: (3B, 2) ITM logits; rows ``[0, B)`` positives ``(text_i, image_i)``,
            ``[B, 2B)`` ``(text_{negative_text_index[i]}, image_i)``,
            ``[2B, 3B)`` ``(text_i, image_{negative_image_index[i]})``.
        labels: (3B,) long, 1 for the positives and 0 for the negatives.
        negative_text_index: (B,) the hard-negative text drawn for each image.
        negative_image_index: (B,) the hard-negative image drawn for each text.
    """

    loss: Tensor
    logits: Tensor
    labels: Tensor
    negative_text_index: Tensor
    negative_image_index: Tensor


class ITMLoss(nn.Module):
    """ALBEF's image-text matching: a 2-way head on the fused pooled state, hard negatives.

    Args:
        dim: the fusion's ``out_dim`` (width of ``pooled``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, 2)

    def forward(
        self,
        fusion: FusionModule,
        text: Tensor,
        text_mask: Tensor,
        image: Tensor,
        image_mask: Tensor | None,
        sim_i2t: Tensor,
        sim_t2i: Tensor,
        generator: torch.Generator | None,
    ) -> ITMOutput:
        """Fuse positives and hard negatives in one batched call and score them.

        Args:
            fusion: the fusion module (run bidirectionally, ``causal=False``).
            text: (B, T, Dt) text token states; text_mask: (B, T) bool.
            image: (B, N, Di) image token states; image_mask: (B, N) bool or None.
            sim_i2t: (B, B) image-to-text similarities (e.g. from :func:`itc_similarities`),
                used to draw a negative text for each image.
            sim_t2i: (B, B) text-to-image similarities, to draw a negative image for each text.
            generator: randomness of the draws (texts first, then images).
        Returns:
            :class:`ITMOutput` with logits (3B, 2) and labels (3B,).
        """
        b = text.shape[0]
        neg_text = sample_hard_negatives(sim_i2t, generator)  # (B,) a wrong text for each image
        neg_image = sample_hard_negatives(sim_t2i, generator)  # (B,) a wrong image for each text

        # Three blocks of pairs: (text_i, image_i), (text_neg(i), image_i), (text_i, image_neg(i)).
        texts = torch.cat([text, text[neg_text], text], dim=0)  # (3B, T, Dt)
        text_masks = torch.cat([text_mask, text_mask[neg_text], text_mask], dim=0)  # (3B, T)
        images = torch.cat([image, image, image[neg_image]], dim=0)  # (3B, N, Di)
        image_masks = None
        if image_mask is not None:
            image_masks = torch.cat([image_mask, image_mask, image_mask[neg_image]], dim=0)  # (3B, N)

        fused = fusion(texts, text_masks, images, image_masks)
        logits = self.head(fused.pooled)  # (3B, 2)
        labels = torch.cat(
            [torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]
        ).to(logits.device)  # (3B,)
        return ITMOutput(itm_loss(logits, labels), logits, labels, neg_text, neg_image)


# -- MLM: masked language modelling ------------------------------------------------


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_tokens_mask: Tensor,
    generator: torch.Generator | None,
    probability: float = 0.15,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking (Devlin et al., 2019), as ALBEF uses it for MLM.

    Each position that is not special (and not padding) is selected with
    ``probability``; a selected token becomes ``mask_token_id`` 80% of the time,
    a uniformly random id in ``[0, vocab_size)`` 10% of the time, and stays as
    it is 10% of the time. Random numbers are drawn in this order: selection,
    the 80/10/10 split, the random ids.

    Args:
        input_ids: (B, T) long token ids (not modified).
        mask_token_id: id of the [MASK] token.
        vocab_size: size of the vocabulary the random replacements come from.
        special_tokens_mask: (B, T) bool/int, True (1) at [CLS], [SEP], padding
            and any other position that must never be selected.
        generator: source of randomness (``None``: PyTorch's global RNG).
        probability: selection probability (BERT and ALBEF: 0.15).
        attention_mask: optional (B, T), False (0) at padding; padding is then
            never selected even if ``special_tokens_mask`` misses it.
    Returns:
        ``(masked_ids, labels)``, both (B, T) long: the corrupted ids, and the
        original ids at the selected positions with -100 everywhere else.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"expected input_ids (B, T), got shape {tuple(input_ids.shape)}")
    if special_tokens_mask.shape != input_ids.shape:
        raise ValueError(
            f"special_tokens_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(special_tokens_mask.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")

    shape, device = input_ids.shape, input_ids.device
    draw_on = _draw_device(generator, device)
    select_u = torch.rand(shape, generator=generator, device=draw_on).to(device)  # (B, T)
    split_u = torch.rand(shape, generator=generator, device=draw_on).to(device)  # (B, T)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=draw_on).to(device)  # (B, T)

    allowed = ~special_tokens_mask.bool()  # (B, T)
    if attention_mask is not None:
        allowed &= attention_mask.bool()
    selected = allowed & (select_u < probability)  # (B, T)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)  # (B, T)

    to_mask = selected & (split_u < 0.8)  # 80%: [MASK]
    to_random = selected & (split_u >= 0.8) & (split_u < 0.9)  # 10%: a random token; the last 10% unchanged
    masked_ids = input_ids.masked_fill(to_mask, mask_token_id)
    masked_ids = torch.where(to_random, random_ids.to(input_ids.dtype), masked_ids)
    return masked_ids, labels


class MLMHead(nn.Module):
    """BERT's MLM prediction head: Linear, GELU, LayerNorm, then a decoder to the vocabulary.

    Args:
        dim: width of the fused text states.
        vocab_size: number of output token ids.
    """

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, text_tokens: Tensor) -> Tensor:
        """(B, T, D) fused text states -> (B, T, V) logits."""
        return self.decoder(self.norm(F.gelu(self.dense(text_tokens))))


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token cross-entropy, averaged over the positions whose label is not -100.

    Args:
        logits: (B, T, V); labels: (B, T) long, -100 where not predicted.
    Returns:
        scalar; 0 (with a gradient path) when no position is labelled, instead of NaN.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


@dataclass
class MLMOutput:
    """What :class:`MLMLoss` returns.

    Attributes:
        loss: scalar cross-entropy over the labelled positions.
        logits: (B, T, V) vocabulary logits at every text position.
    """

    loss: Tensor
    logits: Tensor


class MLMLoss(nn.Module):
    """Masked language modelling on fused text states: an :class:`MLMHead` and :func:`mlm_loss`.

    Args:
        dim: the fusion's ``out_dim``.
        vocab_size: the text tokenizer's vocabulary size.
    """

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.head = MLMHead(dim, vocab_size)

    def forward(self, text_tokens: Tensor, labels: Tensor) -> MLMOutput:
        """text_tokens (B, T, D) from a fusion run on masked text; labels (B, T) from :func:`mask_tokens`."""
        logits = self.head(text_tokens)  # (B, T, V)
        return MLMOutput(mlm_loss(logits, labels), logits)


__all__ = [
    "IGNORE_INDEX",
    "ITCLoss",
    "ITMLoss",
    "ITMOutput",
    "MLMHead",
    "MLMLoss",
    "MLMOutput",
    "itc_loss",
    "itc_similarities",
    "itm_loss",
    "mask_tokens",
    "mlm_loss",
    "momentum_targets",
    "sample_hard_negatives",
]
