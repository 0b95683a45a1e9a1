"""Tasks: what a model is trained for, with its head, data, metrics and inference.

This folder is the repository's top-level ``tasks/``; it installs as
``fusionzoo.tasks`` (see ``[tool.setuptools] package-dir`` in pyproject.toml),
so it never shadows a user's own ``tasks`` module.

A task is a :class:`Task` object (see :mod:`fusionzoo.tasks.base`) registered by
name; subclass one of the built-ins to add your own::

    @fusionzoo.register_task("snli-ve")
    class VisualEntailment(ClassificationTask):
        description = "3-way image-text entailment"
"""

from __future__ import annotations

from fusionzoo.registry import TASKS, register_task

from .base import CaptioningTask, ClassificationTask, Task, VQATask, get_task
from .retrieval import RetrievalTask

register_task("vqa")(VQATask)
register_task("captioning")(CaptioningTask)
register_task("classification")(ClassificationTask)
register_task("retrieval")(RetrievalTask)

# The dataset loaders register themselves (easy-vqa, vqa-v2, vqa-jsonl, coco-captions,
# karpathy-captions, classification-jsonl, caption-match, sort-of-clevr, and the pretraining-scale
# image-text sources image-text-jsonl, webdataset, hf-datasets).
from . import caption_data, classification_data, vqa_data  # noqa: E402,F401
from . import sort_of_clevr  # noqa: E402,F401
from . import hf_data, image_text_jsonl, webdataset_data  # noqa: E402,F401

__all__ = ["TASKS", "CaptioningTask", "ClassificationTask", "RetrievalTask", "Task", "VQATask", "caption_data",
           "classification_data", "get_task", "hf_data", "image_text_jsonl", "sort_of_clevr", "vqa_data",
           "webdataset_data"]
