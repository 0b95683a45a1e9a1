"""Hugging Face ``evaluate`` modules shipped with fusionzoo, loadable offline.

Each module is a script ``<name>/<name>.py`` in this folder (installed with the
package), so ``evaluate.load`` reads it from disk and never contacts the Hub:

* ``vqa_accuracy`` -- the official VQA v2 accuracy (:mod:`fusionzoo.tasks.vqa_eval`);
* ``coco_caption`` -- COCO caption scores with pycocoevalcap (:mod:`fusionzoo.tasks.caption_eval`).

``load("vqa_accuracy")`` is ``evaluate.load(str(metric_path("vqa_accuracy")))``.
evaluate copies the script into its modules cache (``$HF_MODULES_CACHE``,
default ``~/.cache/huggingface/modules``) and imports it from there; that works
with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` / ``HF_EVALUATE_OFFLINE=1``
and no network, because a local path never goes through the Hub code.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

#: The folder holding the metric scripts.
METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the shipped evaluate modules."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """The folder of the evaluate module ``name`` (what ``evaluate.load`` takes)."""
    names = available_metrics()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown fusionzoo metric {name!r}; expected one of {', '.join(names)}{hint}")
    return METRICS_DIR / name


def load(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of a shipped module, from its installed path (offline).

    Args:
        name: ``"vqa_accuracy"`` or ``"coco_caption"`` (see :func:`available_metrics`).
        **kwargs: passed to ``evaluate.load`` (``keep_in_memory=True``, ``cache_dir=...``,
            ``experiment_id=...``, ``process_id`` / ``num_process`` for distributed use).

    Returns:
        The ``evaluate.EvaluationModule``; call ``.compute(predictions=..., references=...)``.
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS_DIR", "available_metrics", "load", "metric_path"]
