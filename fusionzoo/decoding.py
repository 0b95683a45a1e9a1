"""Caption decoding: the generation options fusionzoo takes from ``transformers``, and beam search.

The options of :class:`DecodingOptions` mean what the keywords of the same names mean to
``transformers``' ``generate``:

* ``num_beams`` -- beams per image; 1 is greedy decoding.
* ``max_new_tokens`` -- most tokens written after the start token, the end token included.
* ``min_new_tokens`` -- the end token is forbidden until this many tokens were written
  (``MinNewTokensLengthLogitsProcessor``).
* ``length_penalty`` -- beams are ranked by ``sum log p / length ** length_penalty``
  (``length``: tokens written, the end token included); above 0 favours longer captions,
  below 0 shorter ones. Greedy decoding ignores it.
* ``no_repeat_ngram_size`` -- ``n > 0``: no ``n`` tokens in a row occur twice in a caption, the
  start token counted (``NoRepeatNGramLogitsProcessor``); 0 allows repeats.
* ``repetition_penalty`` -- the penalty of CTRL (Keskar et al., 2019, "CTRL: A Conditional
  Transformer Language Model for Controllable Generation"): the score of every token already in
  the caption is divided by it where positive and multiplied by it where negative
  (``RepetitionPenaltyLogitsProcessor``); 1.0 changes nothing.

As in ``transformers``, the last three act on the raw next-token logits in greedy decoding and
on their log-probabilities in beam search, so ``repetition_penalty`` may choose differently in
the two. :func:`beam_search` runs the search over any next-token function; the model provides
one (:meth:`fusionzoo.model.FusionModel.decode`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .errors import ConfigError


@dataclass(frozen=True)
class DecodingOptions:
    """How captions are generated (see the module docstring for each field's meaning)."""

    num_beams: int = 1
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name, low in (("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0),
                          ("no_repeat_ngram_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"key {name!r} must be an integer >= {low}, got {value!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"key 'min_new_tokens' ({self.min_new_tokens}) must not exceed "
                              f"max_new_tokens ({self.max_new_tokens})")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"key 'repetition_penalty' must be > 0 (1.0: no penalty), got {self.repetition_penalty!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, config: Any) -> "DecodingOptions":
        """The options of a run config (any object with the attributes of :meth:`names`)."""
        return cls(**{name: getattr(config, name) for name in cls.names()})

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :meth:`~fusionzoo.model.FusionModel.generate_ids`."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "DecodingOptions":
        return dataclasses.replace(self, **changes)


def with_decoding(options: Mapping[str, Any]) -> tuple[DecodingOptions, dict[str, Any]]:
    """Split keyword ``options`` into the :class:`DecodingOptions` among them and the rest."""
    names = DecodingOptions.names()
    decoding = DecodingOptions(**{k: v for k, v in options.items() if k in names})
    return decoding, {k: v for k, v in options.items() if k not in names}


# --------------------------------------------------------------------------------------
# Score processors (transformers' logits processors of the same meaning)
# --------------------------------------------------------------------------------------
def penalize_repetitions(ids: Tensor, scores: Tensor, penalty: float) -> Tensor:
    """``scores`` (R, V) with every token of ``ids`` (R, t) divided by ``penalty`` where positive,
    multiplied where negative (CTRL's repetition penalty)."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, ids)  # (R, t)
    return scores.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def ban_repeated_ngrams(ids: Tensor, scores: Tensor, n: int) -> Tensor:
    """``scores`` (R, V) with ``-inf`` for each token that would repeat an ``n``-gram of ``ids`` (R, t).

    A token is banned when the last ``n - 1`` tokens followed by it already occur in the row.
    """
    rows, length = ids.shape
    if n <= 0 or length < n:
        return scores
    windows = ids.unfold(1, n, 1)  # (R, W, n): every n-gram so far, W = t - n + 1
    prefix = ids[:, length - n + 1:]  # (R, n - 1): what the next token would continue
    hit = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (R, W)
    row, window = hit.nonzero(as_tuple=True)
    banned = scores.clone()
    banned[row, windows[row, window, -1]] = float("-inf")
    return banned


def process_scores(ids: Tensor, scores: Tensor, options: DecodingOptions, written: int, eos: int) -> Tensor:
    """The repetition penalty, the n-gram ban and the minimum length applied to next-token ``scores``
    (R, V) of sequences ``ids`` (R, t) that have ``written`` tokens after the start token."""
    scores = penalize_repetitions(ids, scores, options.repetition_penalty)
    scores = ban_repeated_ngrams(ids, scores, options.no_repeat_ngram_size)
    if written < options.min_new_tokens:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    return scores


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------
@dataclass
class Decoded:
    """What :func:`beam_search` returns.

    Attributes:
        ids: (B, 1 + L) long: the start token, the best caption of each image, the end token
            and padding after it.
        scores: (B,) float64: that caption's ``sum log p / length ** length_penalty`` (in greedy
            decoding ``sum log p / length``, the mean log-probability of its tokens), log-probabilities
            after the options' processing.
    """

    ids: Tensor
    scores: Tensor


#: ``(ids (R, t)) -> (R, V) float64 logits of the next token``; ``(rows (R,)) -> None`` reorders its caches.
NextLogits = Callable[[Tensor], Tensor]
Reorder = Callable[[Tensor], None]


def beam_search(next_logits: NextLogits, batch_size: int, options: DecodingOptions, *, bos: int, eos: int,
                pad: int, device: torch.device, reorder: Reorder | None = None) -> Decoded:
    """Beam search (greedy decoding is the one-beam case) over ``batch_size`` inputs.

    Each step scores the next token of every beam; a beam that wrote ``eos`` is finished and only
    extends with ``pad`` at no cost. Beams are ranked by ``sum log p / length ** length_penalty``,
    which for unfinished beams of equal length orders as the plain sum, so one beam is exactly
    greedy decoding. ``next_logits`` sees the B*K rows with the K beams of an input adjacent;
    after a step that regroups them, ``reorder(rows)`` gets the source row of each new row.
    """
    b, k = batch_size, options.num_beams
    ids = torch.full((b * k, 1), bos, dtype=torch.long, device=device)  # (B*K, 1)
    scores = torch.zeros(b, k, dtype=torch.float64, device=device)  # (B, K) summed log-probabilities
    scores[:, 1:] = float("-inf")  # all beams start identical: expand the first only
    lengths = torch.zeros(b * k, dtype=torch.float64, device=device)  # (B*K,) tokens written so far
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)  # (B*K,)
    for written in range(options.max_new_tokens):
        logits = next_logits(ids).double()  # (B*K, V)
        if k == 1:  # greedy: the processors see the logits, as in transformers' greedy search
            log_probs = process_scores(ids, logits, options, written, eos).log_softmax(dim=-1)
        else:  # beam search: they see the log-probabilities
            log_probs = process_scores(ids, logits.log_softmax(dim=-1), options, written, eos)
        vocab = log_probs.shape[-1]
        # A finished beam may only append padding, at no cost (one candidate per finished beam).
        pad_only = torch.full_like(log_probs[:1], float("-inf"))
        pad_only[0, pad] = 0.0
        log_probs = torch.where(finished[:, None], pad_only, log_probs)
        candidates = scores.reshape(b * k, 1) + log_probs  # (B*K, V)
        new_lengths = lengths + (~finished).to(lengths.dtype)  # (B*K,)
        ranked = candidates / new_lengths.clamp_min(1.0)[:, None] ** options.length_penalty  # (B*K, V)
        best = ranked.reshape(b, k * vocab).topk(k, dim=-1).indices  # (B, K), best first
        beam, token = best // vocab, best % vocab  # (B, K) source beam, appended token
        rows = (torch.arange(b, device=device)[:, None] * k + beam).reshape(-1)  # (B*K,)
        scores = candidates.reshape(b, k * vocab).gather(1, best)  # (B, K)
        ids = torch.cat([ids[rows], token.reshape(-1, 1)], dim=1)  # (B*K, t+1)
        lengths = new_lengths[rows]
        finished = finished[rows] | (token.reshape(-1) == eos)
        if reorder is not None and k > 1:
            reorder(rows)
        if bool(finished.all()):
            break
    # Beams are sorted by their normalised score: the first of each input is the best.
    first = torch.arange(b, device=device) * k
    best_scores = scores[:, 0] / lengths[first].clamp_min(1.0) ** (options.length_penalty if k > 1 else 1.0)
    return Decoded(ids=ids.reshape(b, k, -1)[:, 0], scores=best_scores)
