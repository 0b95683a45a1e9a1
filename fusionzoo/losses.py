"""Vision-language pre-training losses: ITC, ITM and MLM, as modules with function twins.

Follows ALBEF (Li et al., "Align before Fuse: Vision and Language Representation
Learning with Momentum Distillation", NeurIPS 2021):

* **ITC**, image-text contrastive: a symmetric InfoNCE over in-batch pairs of
  unit-norm image and text embeddings divided by a learnable temperature,
  optionally against gathered columns and the soft targets of momentum
  distillation (:func:`itc_similarities`, :func:`itc_targets`,
  :func:`contrastive_loss`; :func:`itc_loss` is the in-batch case).
* **ITM**, image-text matching: a binary head on the fused [CLS] state, trained
  on the positive pairs and on one hard negative per image and per text, drawn
  with probability ``softmax(similarity)`` over the other pairs of the batch
  (:func:`hard_negative_candidates`, :func:`sample_hard_negatives`,
  :class:`ITMLoss`, :func:`itm_loss`).
* **MLM**, masked language modelling on the fused text states, with BERT's
  80/10/10 corruption (:func:`mask_tokens`, :class:`MLMHead`,
  :class:`MLMLoss`, :func:`mlm_loss`).

Every module is a thin wrapper over its plain function (the TorchMultimodal
convention). This is the one implementation: ALBEF's fusion calls :func:`itc_loss`
for its auxiliary loss, pretraining calls the same pieces with the columns it
gathers from every process. Nothing here draws random numbers on its own: sampling
takes a ``torch.Generator`` argument. A CPU generator may
drive tensors on any device; the draws are made on the generator's device and
moved, so a seed gives the same draws on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # label of positions that no loss reads (PyTorch's cross-entropy default)


#: One generator for a whole batch, or one per row (see :func:`sample_hard_negatives`, :func:`mask_tokens`).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Where random numbers are drawn: the generator's device, else the data's."""
    return generator.device if generator is not None else fallback


def _per_row(generator: Generators, rows: int) -> list[torch.Generator] | None:
    """The per-row generators, checked to be one a row; None for a single generator (or none)."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    generators = list(generator)
    if len(generators) != rows:
        raise ValueError(f"got {len(generators)} per-row generators for {rows} rows")
    return generators


# -- ITC: image-text contrastive -------------------------------------------------


def itc_similarities(
    image_embed: Tensor,
    text_embed: Tensor,
    temperature: Tensor | float,
    *,
    image_columns: Tensor | None = None,
    text_columns: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled cosine similarities of each image with every text column, and of each text with every image column.

    Args:
        image_embed: (B, E) unit-norm image embeddings (the rows).
        text_embed: (B, E) unit-norm text embeddings; row i is paired with image i.
        temperature: scalar (float or 0-d tensor), > 0.
        image_columns: (C, E) the images each text is compared with; default
            ``image_embed`` (in-batch). Pretraining passes the embeddings gathered
            from every process, and with momentum distillation the momentum
            features and the queue.
        text_columns: (C, E) the texts each image is compared with; default ``text_embed``.
    Returns:
        ``(sim_i2t, sim_t2i)``, each (B, C): ``sim_i2t[i, j] = <image_i, text_col_j> / temperature``,
        ``sim_t2i[i, j] = <text_i, image_col_j> / temperature``. In-batch, ``sim_t2i = sim_i2t.T``.
    """
    if image_embed.dim() != 2 or text_embed.dim() != 2 or image_embed.shape != text_embed.shape:
        raise ValueError(
            f"expected image_embed and text_embed of the same shape (B, E), got "
            f"{tuple(image_embed.shape)} and {tuple(text_embed.shape)}"
        )
    if not torch.is_tensor(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    text_columns = text_embed if text_columns is None else text_columns
    image_columns = image_embed if image_columns is None else image_columns
    for name, columns in (("image_columns", image_columns), ("text_columns", text_columns)):
        if columns.dim() != 2 or columns.shape[1] != image_embed.shape[1]:
            raise ValueError(f"{name} must be (C, {image_embed.shape[1]}), got {tuple(columns.shape)}")
    sim_i2t = image_embed @ text_columns.t() / temperature  # (B, C)
    sim_t2i = text_embed @ image_columns.t() / temperature  # (B, C)
    return sim_i2t, sim_t2i


def itc_targets(same_image: Tensor, momentum_sim: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """ITC targets (B, C): uniform over each row's matching columns, mixed with ``softmax(momentum_sim)``.

    ``targets = alpha * softmax(momentum_sim) + (1 - alpha) * same_image / same_image.sum(1)``:
    with one-hot ``same_image`` (no repeated images) and ``alpha`` > 0 this is ALBEF's
    momentum distillation; with several captions of one image marked, they are
    positives of each other (as BLIP does).

    Args:
        same_image: (B, C) bool, True at the columns that show the row's image
            (its own pair at least).
        momentum_sim: (B, C) similarities of the momentum model, or None.
        alpha: distillation weight in [0, 1] (ALBEF: 0.4, ramped up in the first epoch).
    Returns:
        (B, C) rows summing to 1, no gradient.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if same_image.dim() != 2 or not bool(same_image.any(dim=1).all()):
        raise ValueError("same_image must be (B, C) with at least one True column (the positive) in every row")
    with torch.no_grad():
        hard = same_image.float() / same_image.sum(dim=1, keepdim=True)  # (B, C)
        if momentum_sim is None or alpha == 0:
            return hard
        if momentum_sim.shape != same_image.shape:
            raise ValueError(f"momentum_sim must be {tuple(same_image.shape)}, got {tuple(momentum_sim.shape)}")
        return alpha * momentum_sim.float().softmax(dim=-1) + (1 - alpha) * hard


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j targets[i, j] * log_softmax(logits)[i, j]``; (R, C) each -> scalar."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1).mean()


def contrastive_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """Symmetric contrastive loss: the mean of the image->text and text->image soft cross-entropies.

    Args:
        sim_i2t, sim_t2i: (B, C) similarities from :func:`itc_similarities`.
        targets_i2t, targets_t2i: (B, C) rows summing to 1 (:func:`itc_targets`).
    Returns:
        scalar ``(CE(sim_i2t, targets_i2t) + CE(sim_t2i, targets_t2i)) / 2``.
    """
    for name, sim, target in (("i2t", sim_i2t, targets_i2t), ("t2i", sim_t2i, targets_t2i)):
        if target.shape != sim.shape:
            raise ValueError(f"targets_{name} must be {tuple(sim.shape)} like sim_{name}, got {tuple(target.shape)}")
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def itc_loss(image_embed: Tensor, text_embed: Tensor, temperature: Tensor | float) -> Tensor:
    """In-batch symmetric InfoNCE: image i's positive is text i and back, every other pair a negative.

    Args:
        image_embed: (B, E) unit-norm image embeddings.
        text_embed: (B, E) unit-norm text embeddings, row i paired with image i.
        temperature: scalar > 0 (ALBEF's is learnable, clamped to [0.001, 0.5]).
    Returns:
        scalar: :func:`contrastive_loss` with one-hot targets on the diagonal.
    """
    sim_i2t, sim_t2i = itc_similarities(image_embed, text_embed, temperature)  # (B, B) each
    eye = torch.eye(sim_i2t.shape[0], dtype=torch.bool, device=sim_i2t.device)  # (B, B)
    targets = itc_targets(eye)
    return contrastive_loss(sim_i2t, sim_t2i, targets, targets)


# -- ITM: image-text matching with hard negatives ---------------------------------


def hard_negative_candidates(sim: Tensor, same_image: Tensor, positives: Tensor) -> Tensor:
    """``sim`` (B, C) with the other captions of a row's own image ruled out (-inf) as its hard negatives.

    A row whose columns all show its image keeps them (any column but the positive may then
    be drawn); :func:`sample_hard_negatives` rules out the positive itself.

    Args:
        sim: (B, C) similarities; same_image: (B, C) bool; positives: (B,) column of each row's pair.
    """
    rows = torch.arange(sim.shape[0], device=sim.device)
    blocked = same_image.clone()  # (B, C)
    blocked[rows, positives] = False
    has_other_image = (~same_image).any(dim=1, keepdim=True)  # (B, 1)
    return sim.detach().masked_fill(blocked & has_other_image, float("-inf"))


def sample_hard_negatives(sim: Tensor, generator: Generators, positives: Tensor | None = None) -> Tensor:
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
        generator: the source of randomness (``None``: PyTorch's global RNG), or
            one generator per row: each row's draw then depends only on its own
            generator and similarities, not on which rows share its batch (so
            N processes, each drawing for its own rows, draw what one does).
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
        per_row = _per_row(generator, rows)
        if per_row is None:
            device = _draw_device(generator, sim.device)  # type: ignore[arg-type]
            drawn = torch.multinomial(weights.to(device), 1, generator=generator).squeeze(1)  # (R,)
        else:
            drawn = torch.cat([torch.multinomial(w.to(g.device), 1, generator=g).cpu()
                               for w, g in zip(weights, per_row)])  # (R,)
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
        loss: scalar cross-entropy over the P positive and N negative pairs.
        logits: (P + N, 2) ITM logits, positives first.
        labels: (P + N,) long, 1 for the positives and 0 for the negatives.
        accuracy: () fraction of the pairs classified right (no gradient).
    """

    loss: Tensor
    logits: Tensor
    labels: Tensor
    accuracy: Tensor


class ITMLoss(nn.Module):
    """ALBEF's image-text matching: a 2-way head on the fused pooled state of matching and hard-negative pairs.

    The caller fuses the pairs (pretraining draws the negatives with
    :func:`hard_negative_candidates` and :func:`sample_hard_negatives` from the
    global batch); this module scores them.

    Args:
        dim: the fusion's ``out_dim`` (width of ``pooled``).
        head: the Linear(dim, 2) to score with (a retrieval model's ITM head); default a new one.
    """

    def __init__(self, dim: int, head: nn.Linear | None = None) -> None:
        super().__init__()
        if head is not None and (head.in_features, head.out_features) != (dim, 2):
            raise ValueError(f"the ITM head must be Linear({dim}, 2), got Linear({head.in_features}, "
                             f"{head.out_features})")
        self.head = nn.Linear(dim, 2) if head is None else head

    def forward(self, positive: Tensor, negative: Tensor) -> ITMOutput:
        """positive (P, D), negative (N, D) pooled fused states -> :class:`ITMOutput` over the P + N pairs."""
        logits = self.head(torch.cat([positive, negative])).float()  # (P + N, 2)
        labels = torch.cat([torch.ones(len(positive), dtype=torch.long),
                            torch.zeros(len(negative), dtype=torch.long)]).to(logits.device)  # (P + N,)
        accuracy = (logits.detach().argmax(-1) == labels).float().mean()
        return ITMOutput(itm_loss(logits, labels), logits, labels, accuracy)


# -- MLM: masked language modelling ------------------------------------------------


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_tokens_mask: Tensor,
    generator: Generators,
    probability: float = 0.15,
    attention_mask: Tensor | None = None,
    width: int | None = None,
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
        generator: source of randomness (``None``: PyTorch's global RNG), or one
            generator per row: each row then draws ``width`` numbers of each kind
            and uses the first T, so its mask depends neither on the other rows
            of its batch nor on how far the batch is padded.
        probability: selection probability (BERT and ALBEF: 0.15).
        attention_mask: optional (B, T), False (0) at padding; padding is then
            never selected even if ``special_tokens_mask`` misses it.
        width: numbers drawn per row with per-row generators (>= T; default T).
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
    per_row = _per_row(generator, shape[0])
    if per_row is None:
        draw_on = _draw_device(generator, device)  # type: ignore[arg-type]
        select_u = torch.rand(shape, generator=generator, device=draw_on).to(device)  # (B, T)
        split_u = torch.rand(shape, generator=generator, device=draw_on).to(device)  # (B, T)
        random_ids = torch.randint(vocab_size, shape, generator=generator, device=draw_on).to(device)  # (B, T)
    else:
        t = shape[1]
        width = t if width is None else width
        if width < t:
            raise ValueError(f"width={width} is shorter than the batch's {t} positions")
        draws = [(torch.rand(2, width, generator=g, device=g.device), torch.randint(vocab_size, (width,), generator=g,
                                                                                 device=g.device)) for g in per_row]
        select_u = torch.stack([u[0, :t] for u, _ in draws]).to(device)  # (B, T)
        split_u = torch.stack([u[1, :t] for u, _ in draws]).to(device)  # (B, T)
        random_ids = torch.stack([ids[:t] for _, ids in draws]).to(device)  # (B, T)

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


def mlm_loss(logits: Tensor, labels: Tensor, count: Tensor | float | None = None) -> Tensor:
    """Token cross-entropy, summed over the positions whose label is not -100 and divided by ``count``.

    Args:
        logits: (B, T, V); labels: (B, T) long, -100 where not predicted.
        count: the divisor; default the number of labelled positions (a mean).
            Pretraining on N processes passes (labelled positions of all
            processes) / N, so that the average DDP takes of the processes'
            losses is the mean over every labelled position of the global batch.
    Returns:
        scalar; 0 (with a gradient path) when no position is labelled, instead of NaN.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if count is None:
        count = (labels != IGNORE_INDEX).sum()
    divisor = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / divisor.clamp_min(1e-6)  # no labelled position anywhere: total is 0, and so is the loss


@dataclass
class MLMOutput:
    """What :class:`MLMLoss` returns.

    Attributes:
        loss: scalar cross-entropy over the labelled positions (mixed with the
            distillation term when soft targets are given).
        logits: (..., V) vocabulary logits at the positions passed in.
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

    def forward(self, text_tokens: Tensor, labels: Tensor, soft_targets: Tensor | None = None,
                alpha: float = 0.0, count: Tensor | float | None = None) -> MLMOutput:
        """Predict the original tokens of a fusion run on masked text.

        Args:
            text_tokens: (B, T, D) fused states of the masked text, or (M, D) those
                at the selected positions only (cheaper: the vocabulary product
                runs for M rows).
            labels: (B, T) from :func:`mask_tokens`, or (M,) for the selected rows.
            soft_targets: (M, V) the momentum model's predicted distributions at
                the selected positions (ALBEF's MLM distillation), or None.
            alpha: weight of the distillation term: ``(1 - alpha) * CE + alpha * soft CE``.
            count: divisor of both sums (see :func:`mlm_loss`); default the labelled positions.
        """
        logits = self.head(text_tokens).float()  # (..., V)
        loss = mlm_loss(logits, labels, count)
        if soft_targets is not None and alpha > 0:
            selected = logits[labels != IGNORE_INDEX]  # (M, V)
            if soft_targets.shape != selected.shape:
                raise ValueError(f"soft_targets must be {tuple(selected.shape)} (labelled positions, vocabulary), "
                                 f"got {tuple(soft_targets.shape)}")
            soft_sum = -(F.log_softmax(selected, dim=-1) * soft_targets).sum()
            divisor = len(selected) if count is None else count
            loss = (1 - alpha) * loss + alpha * soft_sum / max(float(divisor), 1e-6)
        return MLMOutput(loss, logits)


__all__ = [
    "IGNORE_INDEX",
    "ITMLoss",
    "ITMOutput",
    "MLMHead",
    "MLMLoss",
    "MLMOutput",
    "contrastive_loss",
    "hard_negative_candidates",
    "itc_loss",
    "itc_similarities",
    "itc_targets",
    "itm_loss",
    "mask_tokens",
    "mlm_loss",
    "sample_hard_negatives",
    "soft_cross_entropy",
]
