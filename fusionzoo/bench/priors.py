"""The priors a task's scores are read against: the majority prior and the question prior.

:func:`majority_prior` scores giving every test sample the test split's commonest answer or
label (computed by the run, stored in ``run.json``); the question prior is
:func:`~fusionzoo.tasks.scoring.question_prior`'s. :func:`plot_priors` turns both into the
lines the plots draw.
"""

from __future__ import annotations

from typing import Any

from .formatting import format_number


def majority_prior(task: Any) -> dict[str, Any] | None:
    """What giving every test sample the test split's commonest answer (VQA) or label scores.

    The answer is the one with the largest summed soft score (VQA) or the commonest
    label id (classification); it is scored by the task's own benchmark metrics, so
    the per-type breakdowns come with it.

    Returns:
        ``answer``, ``kind`` (``"answer"`` / ``"label"``) and ``metrics`` (as a row's,
        numbers only); None for a task without labels (captioning).
    """
    import torch

    from ..tasks import VQATask, get_task

    task_object = get_task(task.task)
    labels = task.test.labels
    if task_object.generates_text or labels is None or not task.vocabulary or len(task.test) == 0:
        return None
    counts = (labels.float().sum(dim=0) if labels.dim() == 2
              else torch.bincount(labels.long(), minlength=len(task.vocabulary)).float())
    best = int(counts.argmax())
    logits = torch.zeros(len(task.test), len(task.vocabulary))
    logits[:, best] = 1.0
    metrics = task_object.bench_metrics(task, task.test, logits)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict))}
    return {"answer": str(task.vocabulary[best]), "kind": "answer" if isinstance(task_object, VQATask) else "label",
            "metrics": numbers}


def _question_prior_shown(prior: dict[str, Any] | None) -> bool:
    """Drawn in a plot when it covers at least half of the test questions (else only results.md reports it)."""
    return bool(prior and prior.get("seen_in_train") and "train_answer_accuracy" in prior
                and prior["seen_in_train"] >= 0.5 * prior["test_questions"])


def plot_priors(task: str, run: dict[str, Any], metric: str) -> list[tuple[str, str, float]]:
    """The priors of ``task`` on the scale of ``metric``: ``(style, label, value)`` for each line to draw."""
    lines = []
    majority = run.get("majority_prior", {}).get(task)
    if majority and metric in majority["metrics"]:
        lines.append(("majority", f"majority {majority['kind']} \"{majority['answer']}\" "
                                  f"{format_number(majority['metrics'][metric], metric)}", majority["metrics"][metric]))
    question = run.get("question_prior", {}).get(task)
    if metric == "accuracy" and _question_prior_shown(question):
        share = question["seen_in_train"] / question["test_questions"]
        lines.append(("question", f"question prior {question['train_answer_accuracy']:.2f}"
                                  + (f" ({100 * share:.0f}% of questions)" if share < 1 else ""),
                      question["train_answer_accuracy"]))
    return lines
