"""The benchmark run as a whole: load a suite, cache encoder features, train and score every row, write the report.

:func:`run_bench` does, in order:

1. check the options (:mod:`fusionzoo.bench.config`) and load the suite's tasks (``--quick``:
   a small image subset, see :mod:`fusionzoo.bench.suites`);
2. build the frozen encoders once (``efficientnet-lite0``, ``minilm-l6``; a causal
   MiniLM for captioning) and get their features from the
   :class:`~fusionzoo.features.cache.FeatureCache` (:mod:`fusionzoo.bench.run_features`): one
   entry for every distinct image of the run, one for every distinct question / text, one for
   every distinct training caption (causal states). A warm cache skips extraction;
3. with ``--tune``, choose every row's settings on the validation split first (:func:`tune_settings`);
4. for each task, fusion and seed: build the fusion and head under the seed, train them on the
   train split, score the test split, and average over the seeds (:mod:`fusionzoo.bench.row`;
   a retrieval task's rows -- the dual-encoder ``itc`` reference and each fusion reranking --
   are :mod:`fusionzoo.bench.retrieval`'s), the rows run by :func:`~fusionzoo.bench.workers.run_rows`;
5. write ``results.json``, ``results.md``, ``run.json``, the plots, the retrieval
   score files and the VQA results files (:mod:`fusionzoo.bench.report`) to ``--out``, replacing the report
   there, and print the results tables (:func:`finish_report`).

``--shard I/N`` stops after step 2 has been done for the whole run: it runs only its part of
steps 3 and 4 and writes that part (:func:`run_shard`, :mod:`fusionzoo.bench.shards`);
:func:`merge_parts` (``fusionzoo bench merge``) checks that the parts make one whole run and does
step 5 for it.

``--train-encoders N`` (:mod:`fusionzoo.bench.tails`) caches the inputs of the encoders' last N
blocks instead of their outputs in step 2, and in step 4 trains a copy of those blocks with
each fusion and head. Every row's training settings are :mod:`fusionzoo.bench.settings`'.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..encoders import build_text_encoder, build_vision_encoder
from ..features.cache import FeatureCache
from ..features.layout import default_cache_dir
from ..hardware import describe_machine
from ..lora import LoraSpec
from ..registry import RegistryError
from ..tasks.scoring import question_prior
from ..training.checkpoint import git_commit
from .config import BenchConfig, resolve_device, resolve_fusions, resolve_jobs, resolve_tasks, spec_name
from .loop import resolve_precision
from .priors import majority_prior
from .report import write_report
from .robustness import CORRUPTIONS, prepare_texts
from .row import ANSWERS_KEY, SCORES_KEY, combine_seed_rows
from .run_features import Features, extract_features
from .settings import QUICK_EPOCHS, TASK_SETTINGS, TrainSettings, settings_for
from .suites import SUITES, BenchError, BenchTask, load_tasks
from .tables import print_results, summary_line
from .tails import check_tail_blocks, check_tail_tasks
from .tune import apply_trial, grid_for, grid_trials, tune_record
from .shards import check_parts, parse_shard, part_rows, read_part, run_identity, shard_units, write_part
from .workers import merge_captions, row_cost, run_rows, run_units, task_rows

logger = logging.getLogger(__name__)


def tune_settings(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask],
                  val_tasks: Sequence[BenchTask], grids: dict[str, dict[str, list[Any]]], features: Features,
                  encoders: dict[str, Any], config: BenchConfig, precision: str, device: torch.device,
                  echo: Callable[[str], None]) -> tuple[list[tuple[int, str, TrainSettings]], dict[int, dict[str, Any]]]:
    """``--tune``: every row of ``work`` with its best trial's settings on the validation split.

    ``val_tasks[t]`` is ``tasks[t]`` loaded with its validation split as the scored one (the
    same train split); ``features`` cover both. Every trial of every row is one row of
    :func:`run_rows` (first seed only), scored on validation. Returns the new work list and,
    per index, the row's tuning record (:func:`fusionzoo.bench.tune.tune_record`).
    """
    started = time.perf_counter()
    cap = QUICK_EPOCHS if config.quick and config.epochs is None else None
    trials: list[tuple[int, dict[str, Any]]] = []  # (index in work, trial)
    trial_work: list[tuple[int, str, TrainSettings]] = []
    if cap is not None:  # --quick: the grid's epochs capped as every row's are (and trials that became equal, once)
        grids = {name: {key: list(dict.fromkeys(min(v, cap) if key == "epochs" else v for v in values))
                        for key, values in grid.items()} for name, grid in grids.items()}
    for index, (t, fusion, settings) in enumerate(work):
        for trial in grid_trials(grids[tasks[t].name]):
            trials.append((index, trial))
            trial_work.append((len(tasks) + t, fusion, apply_trial(replace(settings, robustness=False), trial, cap)))
    echo(f"--tune: {len(trial_work)} trials ({len(work)} rows x their task's grid) on the validation split, "
         f"seed {config.seeds[0]}")
    scores: dict[int, float] = {}
    jobs = resolve_jobs(config.jobs, device, len(trial_work))
    for i, row, _ in run_rows(trial_work, [*tasks, *val_tasks], features, encoders,
                              replace(config, seeds=config.seeds[:1]), precision, device, jobs):
        scores[i] = float(row["metrics"][tasks[work[trials[i][0]][0]].metric])
    tuned, records = [], {}
    for index, (t, fusion, settings) in enumerate(work):
        mine = [i for i, (owner, _) in enumerate(trials) if owner == index]
        record = tune_record(grids[tasks[t].name], [trials[i][1] for i in mine], [scores[i] for i in mine],
                             config.seeds[0])
        records[index] = record
        tuned.append((t, fusion, apply_trial(settings, record["chosen"], cap)))
    echo(f"--tune: chose every row's settings on validation in {time.perf_counter() - started:.0f}s; "
         "training them and scoring the test split")
    return tuned, records


def run_bench(config: BenchConfig, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the benchmark described by ``config``; write the report; return the results rows.

    Args:
        config: see :class:`BenchConfig`.
        echo: where the status messages, the per-task summary lines and the final results tables go.
    """
    started = time.perf_counter()
    suite = SUITES.get(config.suite)
    task_names = resolve_tasks(config.suite, config.tasks)
    fusions = resolve_fusions(config.fusions)
    device = resolve_device(config.device)
    precision = resolve_precision(config.mixed_precision, device)
    if not config.seeds:
        raise BenchError("--seeds needs at least one seed")
    resolve_jobs(config.jobs, device, rows=1)  # --jobs checked before any data is generated or extracted
    shard = parse_shard(config.shard) if config.shard is not None else None
    if config.epochs is not None and config.epochs <= 0:
        raise BenchError(f"--epochs must be > 0, got {config.epochs}")
    image_size = config.image_size or suite.image_size
    image_grid = suite.image_grid if config.image_grid is None else config.image_grid
    if image_grid is not None and image_grid < 0:
        raise BenchError(f"--image-grid must be >= 0 (0 = every token), got {image_grid}")

    for option, limit in (("--max-train", config.max_train), ("--max-test", config.max_test)):
        if limit is not None and limit < 1:  # before any data is read (load_tasks checks them too)
            raise BenchError(f"{option} must be a whole number of images >= 1, got {limit!r}")
    if config.vision_weights not in ("pretrained", "random"):
        raise BenchError(f"--vision-weights must be pretrained or random, got {config.vision_weights!r}")
    if not 0.0 <= config.modality_dropout < 1.0:
        raise BenchError(f"--modality-dropout must be a probability in [0, 1) (the chance that a training sample "
                         f"loses its image or its question), got {config.modality_dropout}")
    if config.train_encoders and (config.robustness or config.modality_dropout):
        raise BenchError("--robustness and --modality-dropout act on the cached final features, which "
                         "--train-encoders replaces by the encoders' tail inputs; leave --train-encoders out")
    check_tail_tasks(config.train_encoders, suite, task_names)  # --train-encoders: which suites and tasks
    if config.encoder_lora and (isinstance(config.encoder_lora, bool) or not isinstance(config.encoder_lora, int)
                                or config.encoder_lora < 0 or not config.train_encoders):
        raise BenchError(f"--lora-r {config.encoder_lora!r}: LoRA adapters of rank >= 1 go on the blocks "
                         "--train-encoders lora:N trains")
    if config.tune:
        if config.eval_split != "test":
            raise BenchError("--tune scores the validation split itself, then the test split: leave --eval-split "
                             "at test")
        grids = {name: config.tune_grid or grid_for(name, TASK_SETTINGS[name]) for name in task_names}
        if config.epochs is not None and any("epochs" in grid for grid in grids.values()):
            raise BenchError("--epochs fixes what the --tune grid chooses; give one of them, or a --tune-grid "
                             "without epochs")

    # Encoders first: a name that cannot be built fails before any data is generated or read.
    try:
        torch.manual_seed(0)  # --vision-weights random: the same initial weights (and cache entry) every run
        vision = build_vision_encoder(config.vision, pretrained=config.vision_weights == "pretrained")
    except (RegistryError, RuntimeError, ImportError, FileNotFoundError) as exc:
        hint = " (here: --vision-weights random)" if config.vision_weights == "pretrained" else ""
        raise BenchError(f"--vision {config.vision}: {exc}{hint}") from exc
    vision.freeze()
    if suite.image_stage is not None:
        try:
            vision.stage_index(suite.image_stage)
        except ValueError as exc:
            raise BenchError(f"the {suite.name!r} suite reads stage {suite.image_stage} of the image encoder's "
                             f"feature maps, which --vision {config.vision} cannot give: {exc}") from exc
    try:
        text = build_text_encoder(config.text)
    except (RegistryError, RuntimeError, ImportError, FileNotFoundError, OSError) as exc:
        raise BenchError(f"--text {config.text}: {exc}") from exc
    text.freeze()
    if config.train_encoders:
        check_tail_blocks(config.train_encoders, vision, text, spec_name(config.vision), spec_name(config.text))
    tasks = load_tasks(suite, task_names, config.data_dir, config.quick, eval_split=config.eval_split,
                       max_train=config.max_train, max_test=config.max_test, drop_missing=not config.tasks)
    causal_text = None
    if any(task.causal_text for task in tasks):
        causal_text = build_text_encoder(config.text, causal=True)
        causal_text.freeze()
    encoders = {"vision": vision.to(device), "text": text.to(device),
                "causal_text": causal_text.to(device) if causal_text is not None else None}
    if config.train_encoders:  # views of the frozen encoders' last blocks; every row trains a copy
        encoders.update(vision_tail=vision.tail(config.train_encoders), text_tail=text.tail(config.train_encoders),
                        tail_lora=LoraSpec(config.encoder_lora, 2.0 * config.encoder_lora) if config.encoder_lora
                        else None)

    cache = FeatureCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir(),
                         enabled=not config.no_cache)
    # --tune: the same tasks (and train images), scored on validation for the trials
    val_tasks = (load_tasks(suite, [task.name for task in tasks], config.data_dir, config.quick, eval_split="val",
                            max_train=config.max_train, max_test=config.max_test) if config.tune else [])
    features, feature_info = extract_features([*tasks, *val_tasks], vision, text, causal_text, cache, image_size,
                                              device,
                                              config.progress, image_grid, suite.image_stage,
                                              suite.image_positions, config.train_encoders)
    if config.robustness or config.modality_dropout > 0:  # the empty question, the corrupted test questions
        feature_info["extra_texts"] = prepare_texts(tasks, features, text, cache, device, config.progress,
                                                        config.robustness)
    if feature_info.get("image_tokens_note"):
        echo(feature_info["image_tokens_note"])  # e.g. a ViT's prefix tokens dropped before pooling
    if not cache.enabled:
        echo(f"feature cache off (--no-cache): extracted features in {cache.extraction_seconds:.1f}s")
    elif cache.misses == 0:
        echo(f"feature cache: {cache.hits} hits, 0 misses -- extraction skipped ({cache.root})")
    else:
        echo(f"feature cache: {cache.hits} hits, {cache.misses} misses -- extracted in "
             f"{cache.extraction_seconds:.1f}s, stored in {cache.root}")

    work = [(t, fusion, replace(settings_for(task.name, fusion, config.epochs, config.quick), compile=config.compile,
                                modality_dropout=config.modality_dropout, robustness=config.robustness))
            for t, task in enumerate(tasks) for fusion in task_rows(task, fusions)]
    context = dict(image_size=image_size, image_grid=image_grid, image_stage=suite.image_stage,
                   image_positions=suite.image_positions, eval_split=config.eval_split,
                   vision=spec_name(config.vision), text=spec_name(config.text), quick=config.quick)
    run_info = {
        "suite": config.suite,
        "tasks": [task.name for task in tasks],
        "task_descriptions": {task.name: task.description for task in tasks},
        "question_prior": {task.name: prior for task in tasks if (prior := question_prior(task)) is not None},
        "majority_prior": {task.name: prior for task in tasks if (prior := majority_prior(task)) is not None},
        "headline_metrics": {task.name: task.metric for task in tasks},
        "fusions": fusions,
        "seeds": list(config.seeds),
        "quick": config.quick,
        "robustness": [c.name for c in CORRUPTIONS] if config.robustness else [],
        "precision": precision,
        "machine": describe_machine(device),
        "features": feature_info,
        "cache": cache.stats(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    if shard is not None:
        identity = run_identity(asdict(config), precision,
                                [(tasks[t].name, fusion, asdict(settings)) for t, fusion, settings in work],
                                cache.entries, git_commit())
        return run_shard(shard, identity, work, tasks, val_tasks, grids if config.tune else {}, features, encoders,
                         config, precision, device, context, run_info, started, echo)
    tuning: dict[int, dict[str, Any]] = {}  # index in `work` -> its tuning record
    if config.tune:
        work, tuning = tune_settings(work, tasks, val_tasks, grids, features, encoders, config, precision, device,
                                     echo)
    jobs = resolve_jobs(config.jobs, device, len(work) * len(config.seeds))
    finished: dict[int, dict[str, Any]] = {}  # index in `work` -> row; rows finish in any order
    captions: list[dict[str, Any]] = []
    rows_start = time.perf_counter()
    for index, row, row_captions in run_rows(work, tasks, features, encoders, config, precision, device, jobs):
        t = work[index][0]
        row["config"].update(context, jobs=jobs)
        captions.append(row_captions)
        logger.info("%s %s: %s", tasks[t].name, row["fusion"], row["metrics"].get(tasks[t].metric))
        finished[index] = row
        of_task = [i for i, (task_index, _, _) in enumerate(work) if task_index == t]
        if all(i in finished for i in of_task):
            with tqdm.external_write_mode():  # above the progress bar, not glued to its line
                echo(summary_line(tasks[t], [finished[i] for i in of_task], time.perf_counter() - rows_start))
                sys.stdout.flush()
    rows = [finished[i] for i in range(len(work))]  # `work` is in task, then fusion order
    run_info["cache"] = cache.stats()
    run_info["wall_seconds"] = round(time.perf_counter() - started, 1)
    return finish_report(Path(config.out), rows, tuning, run_info, merge_captions(captions), started, echo)


def finish_report(out: Path, rows: list[dict[str, Any]], tuning: dict[int, dict[str, Any]], run_info: dict[str, Any],
                  captions: dict[str, Any], started: float, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Write the report of a run's rows (in work order) to ``out`` and print its tables; return the rows.

    The rows' retrieval score arrays and VQA answers (the private keys) go to files of their own;
    ``tuning`` (index -> record) becomes each tuned row's ``tune``.
    """
    scores: dict[tuple[str, str], dict[str, Any]] = {}  # (task, row) -> seed -> retrieval score arrays
    answers: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (task, fusion) -> VQA results entries
    for row in rows:
        if SCORES_KEY in row:  # retrieval: the score matrices go to their own files, not results.json
            scores[(row["task"], row["fusion"])] = row.pop(SCORES_KEY)
        if ANSWERS_KEY in row:  # VQA with official question ids: a results file of its own
            answers[(row["task"], row["fusion"])] = row.pop(ANSWERS_KEY)
    for index, record in tuning.items():
        rows[index]["tune"] = record
    write_report(out, rows, run_info, captions, scores, answers)
    run_info["wall_seconds"] = round(time.perf_counter() - started, 1)
    echo(f"wrote {out / 'results.md'} (and results.json, run.json, plots) in {run_info['wall_seconds']:.0f}s")
    print_results(rows, run_info, echo)
    return rows


def run_shard(shard: tuple[int, int], identity: dict[str, Any], work: list[tuple[int, str, TrainSettings]],
              tasks: Sequence[BenchTask], val_tasks: Sequence[BenchTask], grids: dict[str, dict[str, list[Any]]],
              features: Features, encoders: dict[str, Any], config: BenchConfig, precision: str, device: torch.device,
              context: dict[str, Any], run_info: dict[str, Any], started: float,
              echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """``--shard I/N``: train this part's units (:func:`~fusionzoo.bench.shards.shard_units`) and write the part.

    With ``--tune`` the part's rows are tuned here first (their trials are the part's too).
    Returns the part's one-seed rows.
    """
    costs = [row_cost(tasks[t], fusion, settings) for t, fusion, settings in work]
    trials = [len(grid_trials(grids[tasks[t].name])) if config.tune else 0 for t, _, _ in work]
    units = shard_units(costs, config.seeds, config.tune, trials, shard)
    mine = sorted({index for index, _ in units})
    tuning: dict[int, dict[str, Any]] = {}
    if config.tune and mine:
        tuned, records = tune_settings([work[i] for i in mine], tasks, val_tasks, grids, features, encoders, config,
                                       precision, device, echo)
        for k, index in enumerate(mine):
            work[index] = tuned[k]
            tuning[index] = records[k]
    one_seed = [(index, (seed,)) for index, seeds in units for seed in seeds]
    jobs = resolve_jobs(config.jobs, device, max(1, len(one_seed)))
    echo(f"--shard {shard[0]}/{shard[1]}: {len(one_seed)} of the run's {len(work) * len(config.seeds)} row x seed "
         f"units ({len(mine)} rows)")
    results = []
    for position, row, row_captions in run_units(work, one_seed, tasks, features, encoders, config, precision,
                                                 device, jobs):
        row["config"].update(context, jobs=jobs)
        results.append((one_seed[position][0], row, row_captions))
    results.sort(key=lambda item: (item[0], item[1]["seeds"][0]))
    run_info["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = write_part(Path(config.out), shard, identity, units, results, tuning, run_info)
    echo(f"wrote part {shard[0]}/{shard[1]} to {path} in {run_info['wall_seconds']:.0f}s; when every part is done: "
         f"fusionzoo bench merge PART_DIR... --out REPORT_DIR")
    return [row for _, row, _ in results]


def merge_parts(folders: Sequence[Path], out: Path, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``fusionzoo bench merge``: check the ``--shard`` parts in ``folders`` are one whole run; write its report.

    The report is the one the run without ``--shard`` writes: every row combined over its seeds
    from the parts' one-seed rows (:func:`~fusionzoo.bench.row.combine_seed_rows`). ``run.json``
    also lists the parts (folder, machine, wall seconds); its ``wall_seconds`` is the longest part's.
    """
    started = time.perf_counter()
    parts = sorted((read_part(Path(folder)) for folder in folders), key=lambda part: part["shard"][0])
    count, seeds = check_parts(parts)
    by_row = part_rows(parts)
    rows, captions = [], []
    for index in range(count):
        pieces = [by_row[index][seed] for seed in seeds]
        rows.append(combine_seed_rows([row for row, _ in pieces]))
        captions += [part_captions for _, part_captions in pieces]
    tuning = {int(index): record for part in parts for index, record in part["tuning"].items()}
    run_info = dict(parts[0]["run"])
    run_info["config"] = {**run_info["config"], "shard": None, "out": str(out)}
    caches = [part["run"]["cache"] for part in parts]
    run_info["cache"] = {**caches[0], "enabled": all(c["enabled"] for c in caches),
                         "hits": sum(c["hits"] for c in caches), "misses": sum(c["misses"] for c in caches),
                         "extraction_seconds": round(sum(c["extraction_seconds"] for c in caches), 2),
                         "parts": caches}
    run_info["wall_seconds"] = max(part["run"]["wall_seconds"] for part in parts)
    run_info["shards"] = [{"shard": f"{part['shard'][0]}/{part['shard'][1]}", "folder": str(Path(part["path"]).parent),
                           "machine": part["run"]["machine"], "wall_seconds": part["run"]["wall_seconds"],
                           "units": len(part["rows"])} for part in parts]
    echo(f"bench merge: {len(parts)} parts of one run, {count} rows x {len(seeds)} seeds, all present")
    return finish_report(Path(out), rows, tuning, run_info, merge_captions(captions), started, echo)
