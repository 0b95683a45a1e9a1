"""create_model: a new FusionModel for a task from names and hyperparameters.

Following timm's ``create_model`` and house rule 3, this is where hyperparameters become
built modules: the registry names of the task, fusion and encoders are resolved (an
unknown name lists what exists), the encoders, fusion, head and (for retrieval) the
alignment are built and checked against each other, and the model config of
:mod:`fusionzoo.model_config` records how to build them again. A saved model is loaded
with :func:`fusionzoo.model.load_model` instead.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Sequence

from .alignment import Alignment
from .encoders import build_text_encoder, build_vision_encoder
from .fusions.base import FusionModule
from .init_weights import load_matching_weights
from .model import FusionModel
from .model_config import check_vocabulary, model_config
from .registry import FUSIONS, HEADS, TASKS

logger = logging.getLogger(__name__)


def _fusion_kwargs_for_head(fusion_cls: type[FusionModule], head_cls: type, given: dict[str, Any] | None
                            ) -> dict[str, Any]:
    """``given`` plus, for a fusion with ``supports_head_reads``, ``head_reads`` = what ``head_cls`` reads."""
    kwargs = dict(given or {})
    if not getattr(fusion_cls, "supports_head_reads", False):
        return kwargs
    reads = getattr(head_cls, "reads", "all")
    head_reads = kwargs.setdefault("head_reads", reads)
    if head_reads not in ("all", reads):
        raise ValueError(
            f"fusion_kwargs head_reads={head_reads!r} would leave out what the {head_cls.__name__} reads "
            f"({reads!r}); leave it out (the default is what the head reads) or pass 'all'"
        )
    return kwargs


def fusion_kwargs_for_tokens(fusion_cls: type[FusionModule], vision: Any, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` plus, for a fusion with an image position table (``max_image_tokens``) too small for
    ``vision``'s tokens (a DINOv2 ViT: 256 patches, a class and 4 register tokens), a table that fits."""
    default = inspect.signature(fusion_cls).parameters.get("max_image_tokens")
    if default is None or "max_image_tokens" in given or not isinstance(default.default, int):
        return given
    tokens = vision.num_tokens()
    if tokens <= default.default:
        return given
    logger.info("%s: %d image tokens, more than the default max_image_tokens=%d; building the fusion with %d",
                vision.spec, tokens, default.default, tokens)
    return {**given, "max_image_tokens": tokens}


def create_model(
    task: str,
    fusion: str,
    vision: str | dict[str, Any] = "tiny",
    text: str | dict[str, Any] = "tiny",
    *,
    pretrained: bool = True,
    freeze_encoders: bool = False,
    answers: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    fusion_kwargs: dict[str, Any] | None = None,
    head_kwargs: dict[str, Any] | None = None,
    align_kwargs: dict[str, Any] | None = None,
    max_text_len: int = 32,
    init_from: str | os.PathLike | None = None,
) -> FusionModel:
    """Build a model for ``task`` with the named fusion and encoders.

    Args:
        task: a registered task (``fusionzoo.list_tasks()``): ``"vqa"``,
            ``"captioning"`` or ``"classification"``.
        fusion: a registered fusion (``fusionzoo.list_fusions()``).
        vision: image encoder preset, timm name or spec dict (``build_vision_encoder``).
        text: text encoder preset, folder, hub id or spec dict (``build_text_encoder``);
            built causal for captioning.
        pretrained: load the encoders' pretrained weights (False: random, e.g. for tests).
        freeze_encoders: freeze both encoders (no gradients, eval mode).
        answers: VQA answer vocabulary (required for ``vqa``; unique strings).
        labels: classification label names (required for ``classification``).
        fusion_kwargs: hyperparameters of the fusion (its constructor keywords). A fusion
            with ``supports_head_reads`` also gets ``head_reads``, what the task head reads
            (``head.reads``, ``"all"`` for a head that does not say), unless given here:
            it then builds only the parameters that feed that head, so every trainable
            parameter gets a gradient (DDP needs no ``find_unused_parameters``); the
            value is saved in the fusion's config. ``head_reads="all"`` builds every part.
        head_kwargs: hyperparameters of the head (e.g. ``dropout``).
        align_kwargs: hyperparameters of the :class:`~fusionzoo.alignment.Alignment` a task
            that embeds images and texts apart (``retrieval``) builds when the fusion does not
            align its own streams (``embed_dim``, ``temperature``, ``text_summary``, ``image_summary``).
        max_text_len: tokens kept per question / text in ``predict``.
        init_from: a saved model folder, a run's output_dir, a LoRA adapters folder or a Hub repo
            id (``owner/name[@revision]``, from the Hub cache; offline with ``HF_HUB_OFFLINE=1``):
            every tensor of it whose name and shape match this model's is copied in
            (:func:`fusionzoo.init_weights.load_matching_weights`), as ``fusionzoo train init_from=``.
    Raises:
        RegistryError: unknown task or fusion (lists what exists).
        ValueError / TypeError: a missing, empty, duplicated or misplaced vocabulary, or a
            ``head_reads`` in ``fusion_kwargs`` that leaves out what the head reads.
    """
    task_spec = TASKS.get(task)
    fusion_cls = FUSIONS.get(fusion)
    head_cls = HEADS.get(task_spec.head)
    vocabulary = check_vocabulary(task, task_spec.vocabulary_key, {"answers": answers, "labels": labels})
    if not isinstance(max_text_len, int) or max_text_len < 2:
        raise ValueError(f"max_text_len must be an int >= 2 ([CLS] and [SEP] count), got {max_text_len!r}")
    head_kwargs = dict(head_kwargs or {})

    vision_encoder = build_vision_encoder(vision, pretrained=pretrained)
    text_encoder = build_text_encoder(text, pretrained=pretrained, causal=bool(getattr(head_cls, "causal", False)))
    if max_text_len > text_encoder.max_length:
        raise ValueError(
            f"max_text_len={max_text_len} exceeds the {text_encoder.max_length} positions of text encoder "
            f"{text_encoder.spec}"
        )
    fusion_kwargs = _fusion_kwargs_for_head(fusion_cls, head_cls, fusion_kwargs)
    fusion_kwargs = fusion_kwargs_for_tokens(fusion_cls, vision_encoder, fusion_kwargs)
    fusion_module = fusion_cls(text_encoder.out_dim, vision_encoder.out_dim, **fusion_kwargs)
    head = head_cls.from_parts(fusion_module, text_encoder, vocabulary, **head_kwargs)
    align = None
    if task_spec.aligns and not fusion_module.aligns:
        align = Alignment(text_encoder.out_dim, vision_encoder.out_dim, **dict(align_kwargs or {}))
    elif align_kwargs and not task_spec.aligns:
        raise ValueError(f"align_kwargs are for a task that embeds images and texts apart (retrieval), not {task!r}")
    if freeze_encoders:
        vision_encoder.freeze()
        text_encoder.freeze()

    config = model_config(task, fusion, fusion_module, vision_encoder, text_encoder, max_text_len=max_text_len,
                          freeze_encoders=freeze_encoders, head_kwargs=head_kwargs, vocabulary=vocabulary,
                          align=align)
    model = FusionModel(vision_encoder, text_encoder, fusion_module, head, config, align=align)
    if init_from is not None:
        load_matching_weights(model, init_from)
    return model
