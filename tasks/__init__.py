"""Tasks: what a model is trained for, with its head, data and metrics.

This folder is the repository's top-level ``tasks/``; it installs as
``fusionzoo.tasks`` (see ``[tool.setuptools] package-dir`` in pyproject.toml),
so it never shadows a user's own ``tasks`` module.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusionzoo.registry import TASKS, register_task


@dataclass(frozen=True)
class TaskSpec:
    """A task the zoo knows.

    Attributes:
        name: registry name, the ``task`` argument of ``create_model``.
        head: registry name of the head that serves it.
        vocabulary_key: keyword of ``create_model`` that names the output
            vocabulary (``answers`` for VQA, ``labels`` for classification),
            or ``None`` when the tokenizer is the vocabulary (captioning).
        description: one line for ``fusionzoo list``.
    """

    name: str
    head: str
    vocabulary_key: str | None
    description: str


for _spec in (
    TaskSpec("vqa", "vqa", "answers", "visual question answering over an answer vocabulary (soft-score BCE)"),
    TaskSpec("captioning", "captioning", None, "image captioning with a fusion-conditioned text decoder"),
    TaskSpec("classification", "classification", "labels", "image+text classification (e.g. Hateful Memes, image-caption match)"),
):
    register_task(_spec.name)(_spec)

# The dataset loaders register themselves (easy-vqa, vqa-v2, vqa-jsonl, coco-captions,
# karpathy-captions, classification-jsonl, caption-match).
from . import caption_data, classification_data, vqa_data  # noqa: E402,F401

__all__ = ["TASKS", "TaskSpec", "caption_data", "classification_data", "vqa_data"]
