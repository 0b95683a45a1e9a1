"""Scores of a task from its predictions, with per-type breakdowns (the bench and ``fusionzoo eval`` share them).

``split`` below is any object with the fields of :class:`fusionzoo.bench.suites.SplitData`
(``answers``, ``groups``, ``labels``, ``image_ids``, ``references``) and ``task`` one with those of
``BenchTask`` (``vocabulary``, ``scoring``, ``train``, ``test``): the scores read those fields alone.

* VQA: exact match of the predicted answer (one gold answer per question:
  easy-VQA, the COCO yes/no questions) or VQA v2 accuracy (ten answers), via
  :mod:`fusionzoo.tasks.vqa_eval`; in percent, overall and per answer / question type.
* Classification: accuracy and macro-F1 (percent), ROC-AUC (0..1) via
  :func:`fusionzoo.tasks.classification_eval.classification_metrics`, and the
  accuracy per gold label.
* Captioning: pycocoevalcap's BLEU-1/4, METEOR, ROUGE-L and CIDEr-D via
  :func:`fusionzoo.tasks.caption_eval.score_caption_dicts` (needs Java).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .classification_eval import classification_metrics
from .vqa_eval import normalize_answer, score_vqa

#: pycocoevalcap key -> the name the benchmark reports.
CAPTION_NAMES = {"Bleu_1": "BLEU-1", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}


def _per_group(correct: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean of ``correct`` (0..1) per group, in percent, groups sorted by name."""
    sums: dict[str, list[float]] = {}
    for value, group in zip(correct, groups):
        sums.setdefault(group, []).append(value)
    return {group: 100.0 * float(np.mean(values)) for group, values in sorted(sums.items())}


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]], scoring: str,
               groups: dict[str, Sequence[str]] | None = None) -> dict[str, object]:
    """The one VQA accuracy: ``accuracy`` (%) of predicted answer strings, with ``per_answer_type`` and
    ``per_question_type`` (%) where ``groups`` has those categories.

    Args:
        predictions: one answer per question, as the model says it.
        answers: the human answers of each question, raw.
        scoring: ``vqa`` -- the official VQA accuracy (:func:`~fusionzoo.tasks.vqa_eval.score_vqa`,
            ten answers a question); ``exact_match`` -- 100 when the normalised prediction is one of
            the normalised gold answers (one answer a question: easy-VQA, yes/no sets).
        groups: breakdown name (``answer_type``, ``question_type``) -> one category per question.
    """
    groups = groups or {}
    if scoring == "vqa":
        report = score_vqa(list(predictions), [list(a) for a in answers], groups.get("answer_type"),
                           groups.get("question_type"))
        return {"accuracy": report["overall"], "per_answer_type": report["perAnswerType"],
                "per_question_type": report["perQuestionType"]}
    correct = [float(normalize_answer(p) in {normalize_answer(a) for a in gold})
               for p, gold in zip(predictions, answers)]
    metrics: dict[str, object] = {"accuracy": 100.0 * float(np.mean(correct))}
    for name in ("answer_type", "question_type"):
        if name in groups:
            metrics[f"per_{name}"] = _per_group(correct, groups[name])
    return metrics


def score_vqa_predictions(task: Any, split: Any, logits: torch.Tensor) -> dict[str, object]:
    """:func:`vqa_scores` of the argmax answers of ``logits`` (S, A) on a bench split."""
    predictions = [task.vocabulary[i] for i in logits.argmax(dim=-1).tolist()]
    return vqa_scores(predictions, split.answers, task.scoring, split.groups)


def question_prior(task: Any) -> dict[str, float] | None:
    """How far the train split's answers to the same question predict the test answers (VQA tasks).

    A question matches when its text does (case and spacing ignored). For the test
    questions that the train split asks too, the commonest train answer to the same
    question (soft scores summed) is scored like a model's prediction. This is the
    ceiling of a model that memorises questions, and it explains the text-only row:
    on easy-VQA every test question is a train template; on VQA v2-style data, where
    the same question is asked of two similar images with opposite answers, a split by
    image puts the two on either side and the train answer is mostly wrong.

    Returns:
        ``test_questions``, ``seen_in_train`` and, when any is seen, ``train_answer_accuracy``
        (%, as the task scores); None for a task that is not VQA.
    """
    # a VQA task: an answer vocabulary and (S, A) soft-score labels (classification's are (S,))
    vqa_labels = task.vocabulary is not None and task.train.labels is not None and task.train.labels.dim() == 2
    if not vqa_labels or not task.test.texts or not task.train.texts:
        return None
    key = lambda text: " ".join(text.lower().split())  # noqa: E731
    group: dict[str, int] = {}
    ids = torch.as_tensor([group.setdefault(key(q), len(group)) for q in task.train.texts], dtype=torch.long)
    totals = torch.zeros(len(group), task.train.labels.shape[1]).index_add_(0, ids, task.train.labels.float())
    seen = [i for i, q in enumerate(task.test.texts) if key(q) in group]
    out: dict[str, float] = {"test_questions": len(task.test), "seen_in_train": len(seen)}
    if seen:
        logits = totals[torch.as_tensor([group[key(task.test.texts[i])] for i in seen], dtype=torch.long)]
        out["train_answer_accuracy"] = float(score_vqa_predictions(task, task.test.subset(seen), logits)["accuracy"])
    return out


def score_classification_predictions(split: Any, logits: torch.Tensor) -> dict[str, object]:
    """``accuracy``, ``macro_f1`` (%), ``roc_auc`` (two classes) and ``per_label`` accuracy (%)."""
    labels = split.labels.numpy()
    metrics: dict[str, object] = {}
    for name, value in classification_metrics(logits.numpy(), labels).items():
        metrics[name] = 100.0 * value if name in ("accuracy", "macro_f1") else float(value)
    correct = (logits.argmax(dim=-1).numpy() == labels).astype(float)
    if "label" in split.groups:
        metrics["per_label"] = _per_group(correct.tolist(), split.groups["label"])
    return metrics


#: What a caption without a word is scored as (see :func:`score_caption_predictions`).
NO_CAPTION = "nocaption"


def score_caption_predictions(split: Any, captions: Sequence[str]) -> dict[str, object]:
    """BLEU-1, BLEU-4, METEOR, ROUGE-L, CIDEr of one caption per test image."""
    from .caption_eval import score_caption_dicts

    scored, wordless = scorable_captions(captions)
    res = {image_id: [caption] for image_id, caption in zip(split.image_ids, scored)}
    gts = {image_id: split.references[image_id] for image_id in res}
    scores = score_caption_dicts(gts, res)
    metrics: dict[str, object] = {name: float(scores[key]) for key, name in CAPTION_NAMES.items()}
    metrics["wordless_captions"] = float(wordless)
    return metrics


def scorable_captions(captions: Sequence[str]) -> tuple[list[str], int]:
    """The captions as they are scored, and how many had no word.

    A model may write nothing, or only punctuation (the PTB tokeniser leaves no word): such a
    caption is scored as :data:`NO_CAPTION`, which no reference contains -- a score near 0 for
    that image, where the strict scorer would reject the whole file -- and counted.
    """
    wordless = [not any(ch.isalnum() for ch in caption) for caption in captions]
    return [NO_CAPTION if empty else caption for caption, empty in zip(captions, wordless)], sum(wordless)
