"""The benchmark run: load a suite, cache encoder features, train and score every fusion, write the report.

:func:`run_bench` does, in order:

1. load the suite's tasks (``--quick``: a small image subset, see
   :mod:`fusionzoo.bench.suites`);
2. build the frozen encoders once (``efficientnet-lite0``, ``minilm-l6``; a causal
   MiniLM for captioning) and get their features from the
   :class:`~fusionzoo.bench.cache.FeatureCache`: one entry for every distinct
   image of the run, one for every distinct question / text, one for every
   distinct training caption (causal states). A warm cache skips extraction;
3. for each task, fusion and seed: build the fusion and head under the seed,
   train them on the train split (:func:`~fusionzoo.bench.loop.train_model`),
   score the test split, and average over the seeds;
4. write ``results.json``, ``results.md``, ``run.json`` and the plots
   (:mod:`fusionzoo.bench.report`) to ``--out``.

Training settings (:data:`TASK_SETTINGS`, :data:`FUSION_KWARGS`) were tuned so
the default easy-VQA run fits its time budget on a 2-core CPU; the README's
benchmark section reports what they give.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..encoders import TextEncoder, VisionEncoder, build_text_encoder, build_vision_encoder
from ..model import FusionModel
from ..registry import FUSIONS, HEADS, TASKS
from .baselines import REFERENCES
from .cache import FeatureCache
from .features import image_features, image_preprocessing, text_features
from .loop import (
    FeatureView,
    PeakMemory,
    as_tensor,
    generate_captions,
    predict_logits,
    resolve_precision,
    train_model,
)
from .standardize import StandardizedFusion, channel_stats
from .scoring import score_caption_predictions, score_classification_predictions, score_vqa_predictions
from .suites import SUITES, BenchError, BenchTask, SplitData, load_tasks

logger = logging.getLogger(__name__)

VISION_ENCODER = "efficientnet-lite0"
TEXT_ENCODER = "minilm-l6"


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """How one task's models are trained.

    Attributes:
        epochs: passes over the train split.
        batch_size: samples per optimiser step.
        lr: AdamW peak learning rate (warmup, then cosine to 0).
        weight_decay: AdamW weight decay of matrices.
        warmup: fraction of steps of linear warmup.
        max_text_len: tokens kept per question / caption.
        eval_batch_size: samples per inference call.
        num_beams: beams for caption generation (1 = greedy).
        max_new_tokens: longest generated caption.
    """

    epochs: float
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup: float = 0.05
    max_text_len: int = 32
    eval_batch_size: int = 1024
    num_beams: int = 1
    max_new_tokens: int = 20


TASK_SETTINGS: dict[str, TrainSettings] = {
    "easy-vqa": TrainSettings(epochs=3, batch_size=64, lr=1e-3),
    "coco-yesno": TrainSettings(epochs=6, batch_size=128, lr=3e-4, weight_decay=0.05),
    "coco-captioning": TrainSettings(epochs=8, batch_size=64, lr=5e-4, eval_batch_size=128, max_new_tokens=20),
    "coco-match": TrainSettings(epochs=6, batch_size=128, lr=3e-4, weight_decay=0.05),
}

#: Fusion hyperparameters used for every task (merged over each fusion's defaults).
COMMON_FUSION_KWARGS: dict[str, Any] = {"dim": 128, "num_layers": 1, "num_heads": 4, "dropout": 0.1}
#: Per-fusion changes to :data:`COMMON_FUSION_KWARGS`.
FUSION_KWARGS: dict[str, dict[str, Any]] = {}

#: ``--quick``: at most this many epochs (the data is a few hundred samples).
QUICK_EPOCHS = 2


@dataclass
class BenchConfig:
    """Everything ``fusionzoo bench`` takes (see ``fusionzoo bench --help``).

    Attributes:
        suite: ``easy-vqa`` or ``coco``.
        data_dir: the COCO folder (``coco`` suite).
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
        image_size: overrides the suite's encoder input size.
        progress: show progress bars.
    """

    suite: str = "easy-vqa"
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
    image_size: int | None = None
    progress: bool = True


def default_cache_dir() -> Path:
    """``$FUSIONZOO_CACHE``, else ``$XDG_CACHE_HOME/fusionzoo/features``, else ``~/.cache/fusionzoo/features``."""
    if os.environ.get("FUSIONZOO_CACHE"):
        return Path(os.environ["FUSIONZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusionzoo" / "features"


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


def fusion_kwargs_for(fusion: str) -> dict[str, Any]:
    return {**COMMON_FUSION_KWARGS, **FUSION_KWARGS.get(fusion, {})}


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def build_bench_model(task: BenchTask, fusion: str, vision: VisionEncoder, text: TextEncoder,
                      fusion_kwargs: dict[str, Any], max_text_len: int,
                      stats: dict[str, torch.Tensor] | None = None) -> FusionModel:
    """A :class:`FusionModel` around the shared frozen encoders (as ``create_model`` builds one).

    The encoders are built once per run and shared by every model (they are
    frozen); the fusion is a registered one or a one-modality reference, wrapped
    in a :class:`~fusionzoo.bench.standardize.StandardizedFusion` when ``stats``
    (``text_mean``, ``text_std``, ``image_mean``, ``image_std``) are given.
    """
    fusion_cls = REFERENCES.get(fusion) or FUSIONS.get(fusion)
    fusion_module = fusion_cls(text.out_dim, vision.out_dim, **fusion_kwargs)
    if stats is not None:
        fusion_module = StandardizedFusion(fusion_module, **stats)
    head_name = TASKS.get(task.task).head
    head = HEADS.get(head_name).from_parts(fusion_module, text, task.vocabulary)
    config: dict[str, Any] = {
        "task": task.task,
        "fusion": {"name": fusion, "config": fusion_module.config},
        "vision": {"spec": vision.spec, "data_config": vision.data_config},
        "text": {"spec": text.spec},
        "head": {"name": head_name, "kwargs": {}},
        "max_text_len": max_text_len,
        "freeze_encoders": True,
    }
    key = TASKS.get(task.task).vocabulary_key
    if key:
        config[key] = list(task.vocabulary)
    return FusionModel(vision, text, fusion_module, head, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------
@dataclass
class Features:
    """The run's cached arrays as tensors, with lookups from image path / text to row."""

    image_tokens: torch.Tensor
    image_row: dict[str, int]
    texts: dict[bool, tuple[dict[str, torch.Tensor], dict[str, int]]]  # causal? -> (arrays, text -> row)

    def stats(self, split: SplitData, causal: bool) -> dict[str, torch.Tensor]:
        """Per-channel mean and std of the image tokens and text states of ``split`` (its distinct rows)."""
        images = torch.as_tensor(sorted({self.image_row[p] for p in split.image_paths}), dtype=torch.long)
        image_mean, image_std = channel_stats(self.image_tokens, images)
        arrays, row = self.texts[causal]
        texts = torch.as_tensor(sorted({row[t] for t in split.texts}), dtype=torch.long)
        text_mean, text_std = channel_stats(arrays["states"], texts, arrays["mask"])
        return {"text_mean": text_mean, "text_std": text_std, "image_mean": image_mean, "image_std": image_std}

    def view(self, split: SplitData, causal: bool) -> FeatureView:
        image_rows = torch.as_tensor([self.image_row[p] for p in split.image_paths], dtype=torch.long)
        view = FeatureView(image_tokens=self.image_tokens, image_rows=image_rows, labels=split.labels)
        if split.texts is not None:
            arrays, row = self.texts[causal]
            view.text_rows = torch.as_tensor([row[t] for t in split.texts], dtype=torch.long)
            view.text_states, view.text_ids, view.text_mask = arrays["states"], arrays["input_ids"], arrays["mask"]
        return view


def extract_features(tasks: Sequence[BenchTask], vision: VisionEncoder, text: TextEncoder,
                     causal_text: TextEncoder | None, cache: FeatureCache, image_size: int,
                     device: torch.device, progress: bool) -> tuple[Features, dict[str, Any]]:
    """Get (from the cache, or by extracting) every feature the run's tasks need."""
    paths = sorted({p for task in tasks for split in (task.train, task.test) for p in split.image_paths})
    data_config = image_preprocessing(vision, image_size)
    images = image_features(cache, vision, paths, data_config, device=device, progress=progress)
    info: dict[str, Any] = {"images": len(paths), "image_size": image_size,
                            "image_tokens": list(images["tokens"].shape[1:])}
    texts: dict[bool, tuple[dict[str, torch.Tensor], dict[str, int]]] = {}
    for causal, encoder in ((False, text), (True, causal_text)):
        wanted = sorted({t for task in tasks if task.causal_text == causal
                         for split in (task.train, task.test) if split.texts is not None for t in split.texts})
        if not wanted:
            continue
        max_len = max(TASK_SETTINGS[task.name].max_text_len for task in tasks if task.causal_text == causal)
        entry = text_features(cache, encoder, wanted, max_length=max_len, device=device, progress=progress)
        arrays = {name: as_tensor(entry[name]) for name in ("input_ids", "mask", "states")}
        texts[causal] = (arrays, {t: i for i, t in enumerate(wanted)})
        info["captions" if causal else "texts"] = len(wanted)
    features = Features(image_tokens=as_tensor(images["tokens"]), image_row={p: i for i, p in enumerate(paths)},
                        texts=texts)
    return features, info


# --------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------
def _mean_metrics(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every number (nested dicts too); ``<name>_std`` for top-level numbers of several seeds."""
    out: dict[str, Any] = {}
    for name, first in per_seed[0].items():
        if isinstance(first, dict):
            out[name] = _mean_metrics([m[name] for m in per_seed])
        else:
            values = [float(m[name]) for m in per_seed]
            out[name] = float(np.mean(values))
            if len(values) > 1:
                out[f"{name}_std"] = float(np.std(values, ddof=1))
    return out


def run_row(task: BenchTask, fusion: str, settings: TrainSettings, features: Features, encoders: dict[str, Any],
            seeds: Sequence[int], precision: str, device: torch.device, progress: bool,
            captions_out: dict[str, Any]) -> dict[str, Any]:
    """Train and score one fusion on one task for every seed; the aggregated results row."""
    train_view = features.view(task.train, task.causal_text)
    test_view = features.view(task.test, task.causal_text)
    text = encoders["causal_text"] if task.causal_text else encoders["text"]
    kwargs = fusion_kwargs_for(fusion)
    feature_stats = features.stats(task.train, task.causal_text)
    per_seed, seconds, throughput, memory, losses = [], [], [], [], []
    params = (0, 0)
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_bench_model(task, fusion, encoders["vision"], text, kwargs, settings.max_text_len,
                                  feature_stats).to(device)
        params = count_parameters(model)
        with PeakMemory(device) as peak:
            train_stats = train_model(model, train_view, epochs=settings.epochs, batch_size=settings.batch_size,
                                      lr=settings.lr, weight_decay=settings.weight_decay, warmup=settings.warmup,
                                      precision=precision, device=device, seed=seed,
                                      desc=f"{task.name} {fusion} seed {seed}", progress=progress)
            if task.task == "captioning":
                captions, eval_seconds = generate_captions(
                    model, test_view, batch_size=settings.eval_batch_size, precision=precision, device=device,
                    max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams)
            else:
                logits, eval_seconds = predict_logits(model, test_view, batch_size=settings.eval_batch_size,
                                                      precision=precision, device=device)
        if task.task == "captioning":
            metrics = score_caption_predictions(task.test, captions)
            captions_out.setdefault(task.name, {}).setdefault(fusion, {})[str(seed)] = dict(
                zip(map(str, task.test.image_ids), captions))
        elif task.task == "vqa":
            metrics = score_vqa_predictions(task, task.test, logits)
        else:
            metrics = score_classification_predictions(task.test, logits)
        per_seed.append(metrics)
        seconds.append(train_stats.seconds)
        throughput.append(len(test_view) / max(eval_seconds, 1e-9))
        memory.append(peak.peak_mb)
        losses.append(train_stats.final_loss)
        del model
    metrics = _mean_metrics(per_seed)
    metrics["final_train_loss"] = float(np.mean(losses))
    if len(seeds) > 1:
        metrics["per_seed"] = [{"seed": s, **{k: v for k, v in m.items() if not isinstance(v, dict)}}
                               for s, m in zip(seeds, per_seed)]
    return {
        "task": task.name,
        "fusion": fusion,
        "metrics": metrics,
        "params_trainable": params[0],
        "params_total": params[1],
        "train_seconds": round(float(np.mean(seconds)), 3),
        "eval_samples_per_second": round(float(np.mean(throughput)), 1),
        "peak_memory_mb": round(float(np.max(memory)), 1),
        "seeds": list(seeds),
        "config": {
            "reference": fusion in REFERENCES,
            "model_task": task.task,
            "headline_metric": task.metric,
            "fusion_kwargs": kwargs,
            **{k: v for k, v in asdict(settings).items()},
            "precision": precision,
            "device": str(device),
            "vision": VISION_ENCODER,
            "text": TEXT_ENCODER,
            "frozen_encoders": True,
            "train_samples": len(train_view),
            "test_samples": len(test_view),
        },
    }


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, GPU name: what the README's numbers need next to them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def run_bench(config: BenchConfig, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the benchmark described by ``config``; write the report; return the results rows.

    Args:
        config: see :class:`BenchConfig`.
        echo: where the per-task summary lines and status messages go.
    """
    from .report import summary_line, write_report

    started = time.perf_counter()
    suite = SUITES.get(config.suite)
    task_names = resolve_tasks(config.suite, config.tasks)
    fusions = resolve_fusions(config.fusions)
    device = resolve_device(config.device)
    precision = resolve_precision(config.mixed_precision, device)
    if not config.seeds:
        raise BenchError("--seeds needs at least one seed")
    if config.epochs is not None and config.epochs <= 0:
        raise BenchError(f"--epochs must be > 0, got {config.epochs}")
    image_size = config.image_size or suite.image_size

    tasks = load_tasks(suite, task_names, config.data_dir, config.quick)
    vision = build_vision_encoder(VISION_ENCODER)
    vision.freeze()
    text = build_text_encoder(TEXT_ENCODER)
    text.freeze()
    causal_text = None
    if any(task.causal_text for task in tasks):
        causal_text = build_text_encoder(TEXT_ENCODER, causal=True)
        causal_text.freeze()
    encoders = {"vision": vision.to(device), "text": text.to(device),
                "causal_text": causal_text.to(device) if causal_text is not None else None}

    cache = FeatureCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir(),
                         enabled=not config.no_cache)
    features, feature_info = extract_features(tasks, vision, text, causal_text, cache, image_size, device,
                                              config.progress)
    if not cache.enabled:
        echo(f"feature cache off (--no-cache): extracted features in {cache.extraction_seconds:.1f}s")
    elif cache.misses == 0:
        echo(f"feature cache: {cache.hits} hits, 0 misses -- extraction skipped ({cache.root})")
    else:
        echo(f"feature cache: {cache.hits} hits, {cache.misses} misses -- extracted in "
             f"{cache.extraction_seconds:.1f}s, stored in {cache.root}")

    rows: list[dict[str, Any]] = []
    captions: dict[str, Any] = {}
    for task in tasks:
        settings = TASK_SETTINGS[task.name]
        if config.epochs is not None:
            settings = replace(settings, epochs=config.epochs)
        elif config.quick:
            settings = replace(settings, epochs=min(settings.epochs, QUICK_EPOCHS))
        task_start = time.perf_counter()
        task_rows = []
        for fusion in fusions:
            row = run_row(task, fusion, settings, features, encoders, config.seeds, precision, device,
                          config.progress, captions)
            row["config"].update(image_size=image_size, quick=config.quick)
            task_rows.append(row)
            logger.info("%s %s: %s", task.name, fusion, row["metrics"].get(task.metric))
        rows.extend(task_rows)
        echo(summary_line(task, task_rows, time.perf_counter() - task_start))

    run_info = {
        "suite": config.suite,
        "tasks": [task.name for task in tasks],
        "task_descriptions": {task.name: task.description for task in tasks},
        "headline_metrics": {task.name: task.metric for task in tasks},
        "fusions": fusions,
        "seeds": list(config.seeds),
        "quick": config.quick,
        "precision": precision,
        "machine": machine_description(device),
        "features": feature_info,
        "cache": cache.stats(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    write_report(Path(config.out), rows, run_info, captions)
    run_info["wall_seconds"] = round(time.perf_counter() - started, 1)
    echo(f"wrote {Path(config.out) / 'results.md'} (and results.json, run.json, plots) "
         f"in {run_info['wall_seconds']:.0f}s")
    return rows
