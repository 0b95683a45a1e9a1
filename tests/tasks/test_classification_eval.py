"""Classification metrics: accuracy, macro F1 and ROC AUC, by hand and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionzoo.tasks.classification_eval import accuracy, classification_metrics, macro_f1, roc_auc


def test_metrics_hand_computed() -> None:
    labels = [0, 1, 1, 0, 1, 0]
    preds = [0, 1, 0, 0, 1, 1]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert macro_f1(preds, labels) == pytest.approx(2 / 3)  # both classes: 2TP / (2TP + FP + FN) = 4/6
    assert accuracy([0, 2, 2, 1], [0, 1, 2, 2]) == pytest.approx(0.5)
    assert macro_f1([0, 2, 2, 1], [0, 1, 2, 2]) == pytest.approx((1 + 0 + 0.5) / 3)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)  # ties count one half
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([0.1, 0.2], [1, 1])
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.5], [0.2, 0.1]])
    out = classification_metrics(logits, torch.tensor([0, 1, 1, 0]))
    assert out == pytest.approx({"accuracy": 0.75, "macro_f1": (2 / 3 + 0.8) / 2, "roc_auc": 0.75})
    with pytest.raises(ValueError, match="unlabeled"):
        classification_metrics(logits, torch.tensor([0, 1, -1, 0]))


def test_metrics_match_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: many ties
    preds = (scores > 0.5).astype(int)
    assert roc_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    assert macro_f1(preds, labels) == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"))
    multi_labels, multi_preds = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    assert macro_f1(multi_preds, multi_labels) == pytest.approx(
        sklearn_metrics.f1_score(multi_labels, multi_preds, average="macro"))
    assert accuracy(multi_preds, multi_labels) == pytest.approx(
        sklearn_metrics.accuracy_score(multi_labels, multi_preds))
