"""Tasks: what a model is trained for, with its head, data, metrics and inference.

This folder is the repository's top-level ``tasks/``; it installs as
``fusionzoo.tasks`` (see ``[tool.setuptools] package-dir`` in pyproject.toml),
so it never shadows a user's own ``tasks`` module.

A task is what a model is trained for and how it is scored: its :class:`Task` object
(head, loss, prediction, evaluation; :mod:`~fusionzoo.tasks.base`, :mod:`~fusionzoo.tasks.retrieval`)
and its metrics (:mod:`~fusionzoo.tasks.vqa_eval`, :mod:`~fusionzoo.tasks.caption_eval`,
:mod:`~fusionzoo.tasks.classification_eval`, :mod:`~fusionzoo.tasks.retrieval_eval`, and
:mod:`~fusionzoo.tasks.scoring`, which scores predictions with per-type breakdowns). The data
readers live in :mod:`fusionzoo.data`.

A task is a :class:`Task` object (see :mod:`fusionzoo.tasks.base`) registered by
name; subclass one of the built-ins to add your own::

    @fusionzoo.register_task("snli-ve")
    class VisualEntailment(ClassificationTask):
        description = "3-way image-text entailment"
"""

from __future__ import annotations

from fusionzoo.registry import TASKS, register_task

from .base import CaptioningTask, ClassificationTask, Prediction, Task, VQATask, get_task
from .retrieval import RetrievalTask

register_task("vqa")(VQATask)
register_task("captioning")(CaptioningTask)
register_task("classification")(ClassificationTask)
register_task("retrieval")(RetrievalTask)

__all__ = ["TASKS", "CaptioningTask", "ClassificationTask", "Prediction", "RetrievalTask", "Task", "VQATask", "get_task"]
