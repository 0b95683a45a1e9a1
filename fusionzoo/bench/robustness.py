"""Robustness: every trained row scored again on corrupted test inputs (``fusionzoo bench --robustness``).

A row trains as usual; then, without retraining, it scores the test split once per
:data:`CORRUPTIONS` entry, on what a row sees -- the cached image tokens and the questions:

* **image** (on the image tokens the fusion is fed, position channels left as they are):
  ``image zeros`` (every token zero), ``image mean`` (every token the training split's
  per-channel mean), ``noise K sd`` (Gaussian noise of K times the training split's per-channel
  standard deviation added, K = 0.5, 1, 2);
* **text** (on the question's words, before the frozen text encoder, which encodes the
  corrupted questions once, through the feature cache, as it encodes the clean ones):
  ``empty question`` (no words: the encoder's ``[CLS] [SEP]``), ``word dropout P`` (each word
  left out with probability P, P = 0.25, 0.5), ``word shuffle`` (the words in a random order).

Every draw is seeded (:data:`ROBUSTNESS_SEED`): a word corruption by the question's own text,
so a question asked of several images is corrupted the same way each time and every run
corrupts alike; the noise by its level, drawn over the test split's distinct images in the
order of their cache rows (one noisy copy per image). The mean and standard deviation are
those :class:`~fusionzoo.bench.standardize.StandardizedFusion` standardises with.

A row's ``metrics["robustness"]`` holds the clean score, each corruption's score (the task's
headline metric) and the relative drops ``image drop %`` / ``text drop %``: the mean over that
family's corruptions of ``100 (clean - corrupted) / clean`` (negative where a corruption helps).
Over several seeds (and ``--shard`` parts) they are averaged with their spread like every metric
(:func:`~fusionzoo.bench.row.mean_metrics`).

Removing a modality in training (``--modality-dropout``) follows the same rules ("image
zeros", "empty question"): :mod:`fusionzoo.training.modality_dropout`, with
:func:`empty_text` the run's empty question.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from ..data.streaming import derive_seed
from ..features.cache import FeatureCache
from ..tasks import get_task
from ..training.modality_dropout import EmptyText
from .features import text_features
from .loop import FeatureView, as_tensor, predict_logits
from .run_features import Features
from .settings import TASK_SETTINGS
from .suites import BenchTask

#: Seeds every corruption's draws (with the corruption and the question, or the noise level).
ROBUSTNESS_SEED = 20240


@dataclass(frozen=True)
class Corruption:
    """One corrupted scoring of the test split.

    Attributes:
        name: its key in ``metrics["robustness"]`` and its column in the report.
        family: ``image`` or ``text``: what it corrupts.
        kind: ``zeros``, ``mean``, ``noise`` (image), ``dropout``, ``shuffle`` (text).
        level: the noise's standard deviation in units of the channel's; the chance of dropping a word.
    """

    name: str
    family: str
    kind: str
    level: float = 0.0


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("image zeros", "image", "zeros"),
    Corruption("image mean", "image", "mean"),
    Corruption("noise 0.5 sd", "image", "noise", 0.5),
    Corruption("noise 1 sd", "image", "noise", 1.0),
    Corruption("noise 2 sd", "image", "noise", 2.0),
    Corruption("empty question", "text", "dropout", 1.0),
    Corruption("word dropout 0.25", "text", "dropout", 0.25),
    Corruption("word dropout 0.5", "text", "dropout", 0.5),
    Corruption("word shuffle", "text", "shuffle"),
)
#: The key of the uncorrupted score in ``metrics["robustness"]``, and of each family's relative drop.
CLEAN = "clean"
DROPS = {"image": "image drop %", "text": "text drop %"}
#: Model tasks whose rows are scored again (a choice among outputs, with a question).
ROBUST_TASKS = ("vqa", "classification")


def trained_on(rows: Sequence[dict[str, Any]]) -> str:
    """How the rows of a report were trained, as the robustness table and plot say it."""
    dropout = max((float(r["config"].get("modality_dropout", 0.0)) for r in rows), default=0.0)
    return f"trained with modality dropout {dropout:g}" if dropout else "trained on clean inputs"


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(ROBUSTNESS_SEED, *parts))


# --------------------------------------------------------------------------------------
# The corruptions themselves
# --------------------------------------------------------------------------------------
def drop_words(text: str, probability: float) -> str:
    """``text`` with each whitespace-separated word left out with ``probability`` (1: the empty question).

    Word ``i`` goes when the ``i``-th uniform of the generator seeded by ``("dropout", probability,
    text)`` is below ``probability``.
    """
    words = text.split()
    if probability >= 1.0 or not words:
        return ""
    draws = torch.rand(len(words), generator=_generator("dropout", probability, text)).tolist()
    return " ".join(word for word, u in zip(words, draws) if u >= probability)


def shuffle_words(text: str) -> str:
    """``text``'s words in the order of a permutation drawn by the generator seeded by ``("shuffle", text)``."""
    words = text.split()
    order = torch.randperm(len(words), generator=_generator("shuffle", text)).tolist()
    return " ".join(words[i] for i in order)


def corrupt_text(text: str, corruption: Corruption) -> str:
    """The question ``text`` as ``corruption`` (a text one) leaves it."""
    if corruption.kind == "dropout":
        return drop_words(text, corruption.level)
    if corruption.kind == "shuffle":
        return shuffle_words(text)
    raise ValueError(f"{corruption.name!r} is not a text corruption")


def corrupt_image_tokens(tokens: Tensor, corruption: Corruption, mean: Tensor, std: Tensor,
                         channels: int | None = None) -> Tensor:
    """(R, N, D) image tokens as ``corruption`` (an image one) leaves them, float32.

    Args:
        tokens: the rows to corrupt, in order (the noise is drawn for them in that order).
        mean, std: (D,) the training split's per-channel statistics.
        channels: the first ``channels`` channels are the encoder's and are corrupted; the rest (2-D
            position channels) are kept. None: all.
    """
    out = tokens.float().clone()
    c = out.shape[-1] if channels is None else channels
    if corruption.kind == "zeros":
        out[..., :c] = 0.0
    elif corruption.kind == "mean":
        out[..., :c] = mean[:c].float()
    elif corruption.kind == "noise":
        noise = torch.randn(out.shape[0], out.shape[1], c, generator=_generator("noise", corruption.level))
        out[..., :c] += corruption.level * std[:c].float() * noise
    else:
        raise ValueError(f"{corruption.name!r} is not an image corruption")
    return out


# --------------------------------------------------------------------------------------
# The run's corrupted questions, encoded once
# --------------------------------------------------------------------------------------
def prepare_texts(tasks: Sequence[BenchTask], features: Features, text: Any, cache: FeatureCache,
                  device: torch.device, progress: bool, robustness: bool) -> int:
    """Give ``features`` the empty question (for ``--modality-dropout``) and, with ``robustness``, every
    test question's corrupted versions (``features.corrupted_texts``), encoded into one cache entry of
    their own (``features.extra_texts``, so the clean arrays stay as they are); returns how many."""
    tasks = [t for t in tasks if t.task in ROBUST_TASKS and not t.causal_text and t.test.texts is not None]
    if not tasks or False not in features.texts:
        return 0
    wanted = {""}
    if robustness:
        questions = sorted({q for task in tasks for q in task.test.texts})
        for corruption in CORRUPTIONS:
            if corruption.family == "text":
                mapping = {q: corrupt_text(q, corruption) for q in questions}
                features.corrupted_texts[corruption.name] = mapping
                wanted.update(mapping.values())
    max_length = max(TASK_SETTINGS[task.name].max_text_len for task in tasks)
    texts = sorted(wanted)
    entry = text_features(cache, text, texts, max_length=max_length, device=device, progress=progress)
    features.extra_texts = ({name: as_tensor(entry[name]) for name in ("input_ids", "mask", "states")},
                            {t: i for i, t in enumerate(texts)})
    return len(texts)


def empty_text(features: Features) -> EmptyText:
    """The run's empty question (:func:`prepare_texts` encoded it): ids and cached states."""
    arrays, row = features.extra_texts
    index = row[""]
    mask = arrays["mask"][index].bool()
    return EmptyText(input_ids=arrays["input_ids"][index][mask].long(), states=arrays["states"][index][mask].float())


# --------------------------------------------------------------------------------------
# Scoring a trained row
# --------------------------------------------------------------------------------------
def corrupted_view(view: FeatureView, split_texts: Sequence[str] | None, corruption: Corruption,
                   features: Features, stats: dict[str, Tensor]) -> FeatureView:
    """The test ``view`` with ``corruption`` applied: new image token rows, or the corrupted questions' rows."""
    if corruption.family == "image":
        rows, inverse = torch.unique(view.image_rows, sorted=True, return_inverse=True)  # distinct images, in row order
        channels = features.image_dim - 4 * max(0, features.image_positions)
        tokens = corrupt_image_tokens(features.image_tokens[rows], corruption, stats["image_mean"],
                                      stats["image_std"], channels)
        return replace(view, image_tokens=tokens.to(features.image_tokens.dtype), image_rows=inverse)
    if view.text_rows is None or split_texts is None:
        return view
    arrays, row = features.extra_texts
    mapping = features.corrupted_texts[corruption.name]
    rows = torch.as_tensor([row[mapping[q]] for q in split_texts], dtype=torch.long)
    return replace(view, text_rows=rows, text_states=arrays["states"], text_ids=arrays["input_ids"],
                   text_mask=arrays["mask"])


def relative_drops(scores: dict[str, float]) -> dict[str, float]:
    """Per family with a scored corruption, the mean over them of ``100 (clean - corrupted) / clean``
    (0 where the clean score is 0: nothing to lose; every seed of a row has the same keys)."""
    clean = scores[CLEAN]
    out = {}
    for family, key in DROPS.items():
        values = [scores[c.name] for c in CORRUPTIONS if c.family == family and c.name in scores]
        if values:
            out[key] = float(sum(100.0 * (clean - v) / clean for v in values) / len(values)) if clean else 0.0
    return out


def robustness_scores(model: Any, task: BenchTask, view: FeatureView, features: Features, stats: dict[str, Tensor],
                      clean: float, *, batch_size: int, precision: str, device: torch.device) -> dict[str, float]:
    """``metrics["robustness"]`` of a trained row: ``clean``, every corruption's headline score, the drops."""
    task_object = get_task(task.task)
    scores = {CLEAN: float(clean)}
    for corruption in CORRUPTIONS:
        if corruption.family == "text" and (view.text_rows is None or corruption.name not in features.corrupted_texts):
            continue
        corrupted = corrupted_view(view, task.test.texts, corruption, features, stats)
        logits, _ = predict_logits(model, corrupted, batch_size=batch_size, precision=precision, device=device)
        scores[corruption.name] = float(task_object.bench_metrics(task, task.test, logits)[task.metric])
    return {**scores, **relative_drops(scores)}
