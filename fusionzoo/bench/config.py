"""What a benchmark run is asked to do: :class:`BenchConfig` (``fusionzoo bench``'s options) and its checks.

The ``resolve_*`` functions turn an option into what the run uses and fail with a
:class:`~fusionzoo.bench.suites.BenchError` that names the option: the suite's tasks
(:func:`resolve_tasks`), the fusions (:func:`resolve_fusions`), the device
(:func:`resolve_device`) and how many rows train at once (:func:`resolve_jobs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..registry import FUSIONS
from .baselines import REFERENCES
from .settings import TEXT_ENCODER, VISION_ENCODER
from .suites import SUITES, BenchError


@dataclass
class BenchConfig:
    """Everything ``fusionzoo bench`` takes (see ``fusionzoo bench --help``).

    Attributes:
        suite: ``sort-of-clevr`` (the default), ``easy-vqa``, ``coco``, ``vqav2`` or ``flickr30k``.
        data_dir: the data folder of the ``coco``, ``vqav2`` and ``flickr30k`` suites (layouts:
            :mod:`fusionzoo.bench.suites`); for ``sort-of-clevr``, where its generated sets are cached.
        fusions: fusion names (registered fusions and ``text_only`` / ``image_only``);
            None = every registered fusion plus both references.
        tasks: task names of the suite; None = all.
        epochs: overrides every task's epochs.
        seeds: one model per seed; scores averaged, spread reported.
        out: report folder.
        mixed_precision: ``auto``, ``no``, ``bf16`` or ``fp16``.
        quick: a few hundred samples per task (tests, smoke runs).
        cache_dir: feature cache folder; None = ``$FUSIONZOO_CACHE`` or
            ``~/.cache/fusionzoo/features``.
        no_cache: extract features in memory, never read or write the cache.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        jobs: rows x seeds trained at once in worker processes (None = 2 on a multi-core CPU,
            every GPU on CUDA); see :func:`resolve_jobs`.
        image_size: overrides the suite's encoder input size.
        image_grid: overrides the suite's pooled token grid (0 = keep every token).
        vision: the frozen image encoder: a preset (``efficientnet-lite0/1/2``), a timm model
            name or a spec dict (:func:`~fusionzoo.encoders.build_vision_encoder`).
        text: the frozen text encoder: a preset (``minilm-l6``), a transformers hub id or a local
            folder (:func:`~fusionzoo.encoders.build_text_encoder`).
        eval_split: ``test`` (the report's numbers) or ``val`` (choosing settings): every task's
            validation split, its own or one held out of train by image
            (:func:`~fusionzoo.bench.suites.carve_validation`).
        max_train, max_test: at most this many images of each task's train split and of its
            scored split (``eval_split``), a seeded choice keeping every sample of each kept
            image (quick studies on the full datasets); None = all.
        vision_weights: ``pretrained`` (the preset's or timm's weights) or ``random`` (the
            same architecture, initialised under seed 0: a control, or a timm model offline).
        tune: choose each row's settings on the validation split first
            (:mod:`fusionzoo.bench.tune`), then train with them and score ``eval_split`` once.
        tune_grid: the grid ``tune`` tries for every row (setting -> values); None = each
            task's :func:`~fusionzoo.bench.tune.grid_for`.
        train_encoders: 0 = frozen encoders; N > 0 = fine-tune the last N blocks of both encoders
            with every row (each row its own copy; the cache keeps the inputs of those blocks;
            VQA and classification tasks only; meant for a GPU): :mod:`fusionzoo.bench.tails`.
        encoder_lora: with ``train_encoders`` N: the rank of the LoRA adapters those blocks train
            through instead of their weights (``--train-encoders lora:N``, ``--lora-r``); 0 = their weights.
        compile: ``torch.compile`` every row's trained modules for its training steps
            (:class:`~fusionzoo.training.step.CompiledModules`; eager where compiling fails, with a
            warning); the seconds spent compiling are left out of a row's ``train_seconds``.
        shard: ``"I/N"``: run only the I-th of N disjoint parts of the run's rows x seeds (whole
            rows with ``tune``) and write that part to ``out``; ``fusionzoo bench merge`` makes the
            report of the N parts (:mod:`fusionzoo.bench.shards`). None = the whole run.
        robustness: score every trained VQA / classification row again on corrupted test inputs
            (image removed or noisy, question removed or its words dropped or shuffled), without
            retraining: :mod:`fusionzoo.bench.robustness`.
        modality_dropout: train every VQA / classification row with this chance per sample of
            losing its image or its question (:mod:`fusionzoo.training.modality_dropout`); 0 = off.
        progress: show progress bars.
    """

    suite: str = "sort-of-clevr"
    data_dir: Path | None = None
    fusions: list[str] | None = None
    tasks: list[str] | None = None
    epochs: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    out: Path = Path("bench-results")
    mixed_precision: str = "auto"
    quick: bool = False
    cache_dir: Path | None = None
    no_cache: bool = False
    device: str = "auto"
    jobs: int | None = None
    image_size: int | None = None
    image_grid: int | None = None
    vision: str = VISION_ENCODER
    text: str = TEXT_ENCODER
    eval_split: str = "test"
    max_train: int | None = None
    max_test: int | None = None
    vision_weights: str = "pretrained"
    tune: bool = False
    tune_grid: dict[str, list[Any]] | None = None
    train_encoders: int = 0
    encoder_lora: int = 0
    compile: bool = False
    shard: str | None = None
    robustness: bool = False
    modality_dropout: float = 0.0
    progress: bool = True


def reference_fusions() -> list[str]:
    return list(REFERENCES)


def resolve_fusions(names: Sequence[str] | None) -> list[str]:
    """The fusions of the run: registered ones first, references last; unknown names fail clearly."""
    if not names:
        return FUSIONS.list() + reference_fusions()
    unknown = [n for n in names if n not in FUSIONS and n not in REFERENCES]
    if unknown:
        raise BenchError(f"unknown fusion(s) {', '.join(map(repr, unknown))}; expected registered fusions "
                         f"({', '.join(FUSIONS.list())}) or references ({', '.join(REFERENCES)})")
    ordered = list(dict.fromkeys(names))
    return [n for n in ordered if n not in REFERENCES] + [n for n in ordered if n in REFERENCES]


def resolve_tasks(suite: str, names: Sequence[str] | None) -> list[str]:
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    available = SUITES[suite].tasks
    if not names:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BenchError(f"suite {suite!r} has no task(s) {', '.join(map(repr, unknown))}; "
                         f"its tasks: {', '.join(available)}")
    return [n for n in available if n in names]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def resolve_jobs(jobs: int | None, device: torch.device, rows: int, gpus: int | None = None) -> int:
    """Rows trained at once: ``--jobs``, else 2 on a CPU with 2+ cores or every GPU on CUDA; never more than rows.

    On CPU the benchmark's fusions are small: a training step is mostly per-operator
    overhead that one thread carries, so two 1-thread processes get more rows done than
    one 2-thread process (the README's benchmark section has the figures).
    On CUDA each row at a time has a GPU of its own (:func:`~fusionzoo.bench.workers.row_devices`): ``--device
    cuda`` uses all of them (``gpus``, default ``torch.cuda.device_count()``), ``cuda:N``
    only that one.
    """
    if device.type == "cuda":
        available = 1 if device.index is not None else max(1, gpus if gpus is not None else torch.cuda.device_count())
        if jobs is None:
            jobs = available
        elif jobs > available:
            raise BenchError(f"--jobs {jobs}: on CUDA each row at a time needs a GPU of its own, and --device "
                             f"{device} gives {available}" + ("" if device.index is None else
                                                              " (--device cuda uses every GPU)"))
    elif jobs is None:
        jobs = min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise BenchError(f"--jobs must be >= 1, got {jobs}")
    return max(1, min(jobs, rows))


def spec_name(spec: Any) -> str:
    """How the report names an encoder spec: the string as given, or a spec dict's preset / name."""
    if isinstance(spec, dict):
        return str(spec.get("preset") or spec.get("name"))
    return str(spec)
