"""The model config: the plain dict a :class:`~fusionzoo.model.FusionModel` carries and ``config.json`` stores.

It names the task, the fusion (its registry name and constructor config), the image and
text encoders (their specs), the head (its registry name and keywords), ``max_text_len``,
``freeze_encoders``, the task's output vocabulary (``answers`` for VQA, ``labels`` for
classification) and, for a task that embeds images and texts apart (retrieval), ``align``.
:func:`model_config` builds it for whoever assembles a model (``create_model``, the
bench); :func:`check_vocabulary` is the rule its vocabulary follows, applied both to
``create_model``'s arguments and to a saved folder's config.json.
"""

from __future__ import annotations

from typing import Any, Sequence

from .alignment import Alignment
from .encoders import TextEncoder, VisionEncoder
from .fusions.base import FusionModule
from .registry import TASKS


def model_config(
    task: str,
    fusion: str,
    fusion_module: FusionModule,
    vision: VisionEncoder,
    text: TextEncoder,
    *,
    max_text_len: int,
    freeze_encoders: bool,
    head_kwargs: dict[str, Any] | None = None,
    vocabulary: Sequence[str] | None = None,
    align: Alignment | None = None,
) -> dict[str, Any]:
    """The config of a model for ``task`` built from these modules.

    Args:
        task: a registered task; its head name, vocabulary key and whether it aligns come from it.
        fusion: the registry name the fusion is rebuilt from; ``fusion_module`` gives its config.
        vision, text: the built encoders (their specs and the image preprocessing are recorded).
        max_text_len: tokens kept per question / text in ``predict``.
        freeze_encoders: whether the encoders are frozen (a loaded model freezes them again).
        head_kwargs: the head's keywords (``{}`` when None).
        vocabulary: the output vocabulary of a task that has one (``answers`` / ``labels``).
        align: the model's Alignment; recorded (None: the fusion aligns itself) for a task that aligns.
    Raises:
        ValueError: the task has an output vocabulary and none is given.
    """
    task_spec = TASKS.get(task)
    config: dict[str, Any] = {
        "task": task,
        "fusion": {"name": fusion, "config": fusion_module.config},
        "vision": {"spec": vision.spec, "data_config": vision.data_config},
        "text": {"spec": text.spec},
        "head": {"name": task_spec.head, "kwargs": dict(head_kwargs or {})},
        "max_text_len": max_text_len,
        "freeze_encoders": bool(freeze_encoders),
    }
    if task_spec.vocabulary_key:
        if vocabulary is None:
            raise ValueError(f"task {task!r} needs its {task_spec.vocabulary_key} in the model config")
        config[task_spec.vocabulary_key] = list(vocabulary)
    if task_spec.aligns:
        config["align"] = None if align is None else align.config  # None: the fusion aligns itself
    return config


def check_vocabulary(task: str, vocabulary_key: str | None, given: dict[str, Any]) -> list[str] | None:
    """The output vocabulary of ``task`` among ``given`` (``{"answers": ..., "labels": ...}``), checked.

    Returns:
        the vocabulary as a list, or None for a task without one (captioning, retrieval).
    Raises:
        ValueError / TypeError: a vocabulary given under the wrong key, missing, not a list of
            strings, empty or with duplicates.
    """
    for key, value in given.items():
        if value is not None and key != vocabulary_key:
            wanted = f"{vocabulary_key}=[...]" if vocabulary_key else "no output vocabulary (the tokenizer is)"
            raise ValueError(f"task {task!r} takes {wanted}, not {key}=")
    if vocabulary_key is None:
        return None
    value = given.get(vocabulary_key)
    if value is None:
        raise ValueError(f"task {task!r} needs {vocabulary_key}=[...]: the list of output strings the head predicts")
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{vocabulary_key} must be a list of strings, got {type(value).__name__}")
    value = list(value)
    if not value:
        raise ValueError(f"{vocabulary_key} must not be empty")
    not_str = [v for v in value if not isinstance(v, str)]
    if not_str:
        raise TypeError(f"{vocabulary_key} must hold strings only, got {not_str[:3]!r}")
    seen: set[str] = set()
    duplicates = sorted({v for v in value if v in seen or seen.add(v)})
    if duplicates:
        raise ValueError(f"{vocabulary_key} must be unique, got duplicates {duplicates[:5]!r}")
    return value
