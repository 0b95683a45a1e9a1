"""Classification metrics: accuracy, macro F1, ROC AUC (plain functions, NumPy).

:func:`classification_metrics` gives all that apply to (N, C) scores and (N,) labels: ``accuracy``
and ``macro_f1`` of the argmax, and ``roc_auc`` for two classes (Hateful Memes' AUROC).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of ``predictions`` (N,) equal to ``labels`` (N,)."""
    predictions, labels = _as_array(predictions), _as_array(labels)
    if predictions.shape != labels.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"accuracy needs predictions and labels of the same shape (N,), N > 0; "
                         f"got {predictions.shape} and {labels.shape}")
    return float((predictions == labels).mean())


def macro_f1(predictions: Any, labels: Any) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``labels`` or ``predictions``.

    A class's F1 is ``2 TP / (2 TP + FP + FN)`` (0 when it has no true positive).
    """
    predictions, labels = _as_array(predictions), _as_array(labels)
    if predictions.shape != labels.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"macro_f1 needs predictions and labels of the same shape (N,), N > 0; "
                         f"got {predictions.shape} and {labels.shape}")
    scores = []
    for cls in np.union1d(labels, predictions):
        tp = np.sum((predictions == cls) & (labels == cls))
        fp = np.sum((predictions == cls) & (labels != cls))
        fn = np.sum((predictions != cls) & (labels == cls))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of binary ``labels`` (N,) in {0, 1} ranked by ``scores`` (N,).

    The Mann-Whitney form: the probability that a random positive scores above a
    random negative, ties counting one half (average ranks).
    """
    scores, labels = _as_array(scores).astype(np.float64), _as_array(labels)
    if scores.shape != labels.shape or labels.ndim != 1:
        raise ValueError(f"roc_auc needs scores and labels of the same shape (N,); "
                         f"got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"roc_auc needs binary labels in {{0, 1}}, got values {np.unique(labels).tolist()}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc is undefined when only one class is present in labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(labels.size, dtype=np.float64)
    start = 0
    while start < labels.size:  # average 1-based ranks over runs of tied scores
        end = start
        while end + 1 < labels.size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits: Any, labels: Any) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` of argmax predictions, plus ``roc_auc`` for two classes.

    Args:
        logits: (N, C) scores (logits or probabilities).
        labels: (N,) label ids; unlabeled (-1) examples are an error.
    """
    logits, labels = _as_array(logits), _as_array(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} examples are unlabeled (label -1) and cannot be scored")
    predictions = logits.argmax(axis=1)  # (N,)
    out = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    if logits.shape[1] == 2 and 0 < labels.sum() < labels.size:
        out["roc_auc"] = roc_auc(logits[:, 1] - logits[:, 0], labels)  # monotone in P(class 1)
    return out
