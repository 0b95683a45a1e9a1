"""One row of the benchmark: a fusion and head built around the frozen encoders, trained, scored, summed up.

* :func:`build_bench_model` -- the :class:`~fusionzoo.model.FusionModel` of a row;
* :func:`run_prediction_row` -- a VQA, classification or captioning row: for every seed,
  build under the seed, train on the train split (:func:`~fusionzoo.bench.loop.train_model`),
  predict the scored split and score it with the task's metrics;
* :func:`mean_metrics`, :func:`count_parameters`, :func:`result_row` -- what a row of
  ``results.json`` holds; a retrieval row (:mod:`fusionzoo.bench.retrieval`) is summed up
  the same way; :func:`combine_seed_rows` -- one row from rows that each ran some of its seeds.

A row hands data that does not go into ``results.json`` to the run under private keys:
:data:`SCORES_KEY` (retrieval score matrices) and :data:`ANSWERS_KEY` (VQA answers).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch

from ..encoders import TextEncoder, VisionEncoder
from ..model import FusionModel
from ..model_config import model_config
from ..registry import FUSIONS, HEADS
from ..tasks import get_task
from ..training.optim import ENCODER_PREFIXES
from .baselines import REFERENCES
from .loop import PeakMemory, generate_captions, predict_logits, seeded, train_model
from .robustness import ROBUST_TASKS, empty_text, robustness_scores
from .run_features import Features
from .settings import TEXT_ENCODER, VISION_ENCODER, TrainSettings, fusion_kwargs_for
from .standardize import StandardizedFusion
from .suites import BenchError, BenchTask
from .tails import EncoderTailsModel, with_encoder_tails

#: The key under which a retrieval row carries its score matrices (see :mod:`fusionzoo.bench.retrieval`).
SCORES_KEY = "_scores"
#: The key under which a VQA row with official question ids carries its first seed's answers,
#: ``[{"question_id", "answer"}]`` (VQA v2's results format; :func:`~fusionzoo.bench.report.write_report`).
ANSWERS_KEY = "_answers"


def build_bench_model(task: BenchTask, fusion: str, vision: VisionEncoder, text: TextEncoder,
                      fusion_kwargs: dict[str, Any], max_text_len: int,
                      stats: dict[str, torch.Tensor] | None = None,
                      head_kwargs: dict[str, Any] | None = None, image_dim: int | None = None) -> FusionModel:
    """A :class:`FusionModel` around the shared frozen encoders (as ``create_model`` builds one).

    The encoders are built once per run and shared by every model (they are
    frozen); the fusion is a registered one or a one-modality reference, wrapped
    in a :class:`~fusionzoo.bench.standardize.StandardizedFusion` when ``stats``
    (``text_mean``, ``text_std``, ``image_mean``, ``image_std``) are given.
    ``image_dim`` is the width of the image tokens the fusion will be fed (default the
    encoder's last map; an intermediate stage with position channels is another width).
    """
    fusion_cls = REFERENCES.get(fusion) or FUSIONS.get(fusion)
    fusion_module = fusion_cls(text.out_dim, image_dim or vision.out_dim, **fusion_kwargs)
    if stats is not None:
        fusion_module = StandardizedFusion(fusion_module, **stats)
    task_object = get_task(task.task)
    head_name = task_object.head
    head = HEADS.get(head_name).from_parts(fusion_module, text, task.vocabulary, **(head_kwargs or {}))
    config = model_config(task.task, fusion, fusion_module, vision, text, max_text_len=max_text_len,
                          freeze_encoders=True, head_kwargs=head_kwargs, vocabulary=task.vocabulary)
    return FusionModel(vision, text, fusion_module, head, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def mean_metrics(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every number (nested dicts too); ``<name>_std`` for top-level numbers of several seeds."""
    out: dict[str, Any] = {}
    for name, first in per_seed[0].items():
        if isinstance(first, dict):
            out[name] = mean_metrics([m[name] for m in per_seed])
        else:
            values = [float(m[name]) for m in per_seed]
            out[name] = float(np.mean(values))
            if len(values) > 1:
                out[f"{name}_std"] = float(np.std(values, ddof=1))
    return out


def run_prediction_row(task: BenchTask, fusion: str, settings: TrainSettings, features: Features,
                       encoders: dict[str, Any], seeds: Sequence[int], precision: str, device: torch.device,
                       progress: bool, captions_out: dict[str, Any]) -> dict[str, Any]:
    """Train and score one fusion on one task (VQA, classification, captioning) for every seed; the aggregated row.

    With ``features.train_encoders``, every seed's model trains its own copies of the encoder tails
    (``encoders["vision_tail"]``, ``encoders["text_tail"]``; :func:`~fusionzoo.bench.tails.with_encoder_tails`).
    A captioning row's generated captions go to ``captions_out[task][fusion][seed]``.
    """
    train_view = features.view(task.train, task.causal_text)
    test_view = features.view(task.test, task.causal_text)
    text = encoders["causal_text"] if task.causal_text else encoders["text"]
    kwargs = fusion_kwargs_for(fusion, task.name)
    feature_stats = features.stats(task.train, task.causal_text)
    # Captioning: predict only the tokens of the training captions (their [SEP] end token included).
    task_object = get_task(task.task)
    head_kwargs = {"output_ids": features.token_ids(task.train, True)} if task_object.generates_text else None
    per_seed, seconds, throughput, memory, losses, compiling = [], [], [], [], [], []
    params = (0, 0)
    answers = None  # VQA with official question ids: the first seed's answers, for the results file
    trained = features.train_encoders  # --train-encoders N: last blocks each model trains
    if trained and (task_object.generates_text or task.task == "retrieval"):  # run_bench refuses these first
        raise BenchError(f"--train-encoders does not train {task.task} rows ({task.name})")
    robust = settings.robustness and task.task in ROBUST_TASKS  # run_bench refuses --train-encoders with them
    dropout = settings.modality_dropout if task.task in ROBUST_TASKS else 0.0
    empty = empty_text(features) if dropout > 0 else None
    for seed in seeds:
        with seeded(seed, device):
            model = build_bench_model(task, fusion, encoders["vision"], text, kwargs, settings.max_text_len,
                                      feature_stats, head_kwargs, image_dim=features.image_dim)
            if trained:  # the tails are copied under the seed, as the fusion and head are built
                model = with_encoder_tails(model, encoders["vision_tail"], encoders["text_tail"],
                                           features.image_grid, features.image_positions, features.image_prefix_tokens,
                                           lora=encoders.get("tail_lora"))
            model = model.to(device)
        params = count_parameters(model)
        if trained:  # the frozen blocks the tails stand in for never run: the same total as a frozen row
            params = (params[0], params[1] - model.replaced_parameters)
        with PeakMemory(device) as peak:
            train_stats = train_model(model, train_view, epochs=settings.epochs, batch_size=settings.batch_size,
                                      lr=settings.lr, weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
                                      precision=precision, device=device, seed=seed,
                                      desc=f"{task.name} {fusion} seed {seed}", progress=progress,
                                      encoder_prefixes=EncoderTailsModel.ENCODER_PREFIXES if trained
                                      else ENCODER_PREFIXES, compile=settings.compile,
                                      modality_dropout=dropout, empty_text=empty)
            if task_object.generates_text:
                outputs, eval_seconds = generate_captions(
                    model, test_view, batch_size=settings.eval_batch_size, precision=precision, device=device,
                    **settings.decoding.kwargs())
            else:
                outputs, eval_seconds = predict_logits(model, test_view, batch_size=settings.eval_batch_size,
                                                       precision=precision, device=device)
        metrics = task_object.bench_metrics(task, task.test, outputs)
        if robust:  # the same model on corrupted test inputs (--robustness)
            metrics["robustness"] = robustness_scores(
                model, task, test_view, features, feature_stats, metrics[task.metric],
                batch_size=settings.eval_batch_size, precision=precision, device=device)
        if answers is None and task.test.question_ids is not None:  # logits (S, A) over task.vocabulary
            answers = [{"question_id": int(q), "answer": task.vocabulary[a]}
                       for q, a in zip(task.test.question_ids, outputs.argmax(dim=-1).tolist())]
        if task_object.generates_text:
            captions_out.setdefault(task.name, {}).setdefault(fusion, {})[str(seed)] = dict(
                zip(map(str, task.test.image_ids), outputs))
        per_seed.append(metrics)
        seconds.append(train_stats.seconds)
        throughput.append(len(test_view) / max(eval_seconds, 1e-9))
        memory.append(peak.peak_mb)
        losses.append(train_stats.final_loss)
        compiling.append(train_stats.compile_seconds)
        del model
    metrics = mean_metrics(per_seed)
    metrics["final_train_loss"] = float(np.mean(losses))
    if settings.compile:  # torch.compile's own seconds, left out of train_seconds
        metrics["compile_seconds"] = float(np.mean(compiling))
    if len(seeds) > 1:
        metrics["per_seed"] = [{"seed": s, **{k: v for k, v in m.items() if not isinstance(v, dict)}}
                               for s, m in zip(seeds, per_seed)]
    row = result_row(task, fusion, metrics, params, seconds, throughput, memory, seeds, {
        "reference": fusion in REFERENCES,
        "fusion_kwargs": kwargs,
        **{k: v for k, v in asdict(settings).items()},
        "precision": precision,
        "device": str(device),
        "train_samples": len(train_view),
        "test_samples": len(test_view),
        "train_encoders": trained,
        "encoder_lora": encoders["tail_lora"].r if trained and encoders.get("tail_lora") else 0,
    })
    if answers is not None:
        row[ANSWERS_KEY] = answers
    return row


def combine_seed_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results row from rows of the same task and fusion, each trained and scored for its own seeds.

    A row's seeds can run apart (in other worker processes, or in other ``--shard`` parts of
    a run); this sums them up as one call over all the seeds would: metrics averaged over every
    seed with ``<name>_std`` (:func:`mean_metrics`), ``per_seed`` for several seeds, the mean
    training loss, seconds and throughput, the highest peak memory, and the private score and
    answer keys (scores per seed; the first seed's answers). ``rows`` in seed order; every row
    must hold one seed.
    """
    if not rows:
        raise ValueError("combine_seed_rows needs at least one row")
    first = rows[0]
    for row in rows:
        if len(row["seeds"]) != 1 or (row["task"], row["fusion"]) != (first["task"], first["fusion"]):
            raise ValueError(f"combine_seed_rows: expected one-seed rows of {first['task']} {first['fusion']}, "
                             f"got {row['task']} {row['fusion']} with seeds {row['seeds']}")
    if len(rows) == 1:
        return first
    seeds = [row["seeds"][0] for row in rows]
    costs = ("final_train_loss", "compile_seconds")  # means over the seeds, no spread, not per seed
    per_seed = [{k: v for k, v in row["metrics"].items() if k not in costs} for row in rows]
    metrics = mean_metrics(per_seed)
    for name in costs:
        if name in first["metrics"]:
            metrics[name] = float(np.mean([row["metrics"][name] for row in rows]))
    metrics["per_seed"] = [{"seed": s, **{k: v for k, v in m.items() if not isinstance(v, dict)}}
                           for s, m in zip(seeds, per_seed)]
    combined = {**first, "metrics": metrics, "seeds": seeds,
                "train_seconds": round(float(np.mean([row["train_seconds"] for row in rows])), 3),
                "eval_samples_per_second": round(float(np.mean([row["eval_samples_per_second"] for row in rows])), 1),
                "peak_memory_mb": max(row["peak_memory_mb"] for row in rows)}
    if SCORES_KEY in first:
        combined[SCORES_KEY] = {seed: arrays for row in rows for seed, arrays in row[SCORES_KEY].items()}
    return combined


def result_row(task: BenchTask, fusion: str, metrics: dict[str, Any], params: tuple[int, int],
               seconds: Sequence[float], throughput: Sequence[float], memory: Sequence[float],
               seeds: Sequence[int], config: dict[str, Any]) -> dict[str, Any]:
    """One row of ``results.json``: metrics, parameter counts, per-seed means of the costs, the row's config."""
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
        "config": {"reference": config.pop("reference"), "model_task": task.task, "headline_metric": task.metric,
                   **config, "vision": VISION_ENCODER, "text": TEXT_ENCODER,
                   "frozen_encoders": not config.get("train_encoders")},
    }
