"""Running the run's rows: each row to its task's row function, in this process, in forked workers or on several GPUs.

A run's work list holds ``(task index, row name, settings)``; a *unit* is one row of it with
some of its seeds, ``(index in work, seeds)``, and the run's units are every row once per
seed (:func:`seed_units`), so the seeds of one row train at once in other workers and a
``--shard`` of a run can hold any of them. :func:`run_units` yields every unit's one-seed row
as it finishes: one at a time here (``--jobs 1``), in forked worker processes that share the
features and encoders (``--jobs N`` on a CPU), or one thread per GPU, the longest units
(:func:`row_cost`) started first. :func:`run_rows` runs every row of a work list for the
config's seeds and yields each row once all its seeds are in
(:func:`~fusionzoo.bench.row.combine_seed_rows`). :func:`run_row` sends a unit to
:func:`~fusionzoo.bench.row.run_prediction_row` or, for a retrieval task, to
:func:`~fusionzoo.bench.retrieval.run_retrieval_row`; :func:`task_rows` names a task's rows.
"""

from __future__ import annotations

import copy
import multiprocessing
import queue
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .config import BenchConfig
from .retrieval import ITC_ROW, row_names, run_retrieval_row
from .row import combine_seed_rows, run_prediction_row
from .run_features import Features
from .settings import TrainSettings, fusion_kwargs_for, row_precision
from .suites import BenchTask


def run_row(task: BenchTask, fusion: str, settings: TrainSettings, features: Features, encoders: dict[str, Any],
            seeds: Sequence[int], precision: str, device: torch.device, progress: bool,
            captions_out: dict[str, Any], auto_precision: bool = False) -> dict[str, Any]:
    """Train and score one row for every seed: a retrieval task's by
    :func:`~fusionzoo.bench.retrieval.run_retrieval_row`, any other by
    :func:`~fusionzoo.bench.row.run_prediction_row`; the aggregated results row.

    ``auto_precision``: ``precision`` is what ``--mixed-precision auto`` chose, which a fusion
    unsafe in bf16 with the row's fusion arguments (:func:`~fusionzoo.training.step.bf16_unsafe`)
    runs in float32 instead."""
    precision = row_precision(fusion, precision, auto_precision, fusion_kwargs_for(fusion, task.name))
    if task.task == "retrieval":
        return run_retrieval_row(task, fusion, settings, features, encoders, seeds, precision, device, progress)
    return run_prediction_row(task, fusion, settings, features, encoders, seeds, precision, device, progress,
                              captions_out)


def task_rows(task: BenchTask, fusions: Sequence[str]) -> list[str]:
    """The rows of ``task``: the run's fusions; for retrieval its own (:func:`~fusionzoo.bench.retrieval.row_names`)."""
    if task.task == "retrieval":
        return row_names(fusions)
    return list(fusions)


def row_cost(task: BenchTask, fusion: str, settings: TrainSettings) -> float:
    """A row's rough cost, to start the longest rows first: fusion passes over training samples.

    A retrieval step runs the fusion on three pairs per sample (the positive and two hard
    negatives) and its scoring on every test pair; the dual-encoder row runs no fusion.
    """
    if task.task == "retrieval":
        if fusion == ITC_ROW:
            return 0.0
        images = len(set(task.test.image_paths))
        return settings.epochs * len(task.train) * 3 + 2 * images * len(task.test)
    return settings.epochs * len(task.train)


def row_devices(device: torch.device, jobs: int) -> list[torch.device]:
    """The device of each row slot: ``cuda:0`` .. ``cuda:jobs-1`` for ``--device cuda``, else ``device``."""
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(jobs)]
    return [device] * jobs


#: A row of the work list with the seeds to train it for: ``(index in work, seeds)``.
Unit = tuple[int, tuple[int, ...]]


def seed_units(work_size: int, seeds: Sequence[int]) -> list[Unit]:
    """Every row of a work list of ``work_size`` rows once per seed, in work, then seed order."""
    return [(index, (seed,)) for index in range(work_size) for seed in seeds]


def unit_cost(work: Sequence[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask], unit: Unit) -> float:
    """:func:`row_cost` of the unit's row, times its seeds."""
    t, fusion, settings = work[unit[0]]
    return row_cost(tasks[t], fusion, settings) * len(unit[1])


#: What forked row workers read (set by :func:`run_units` just before it forks).
_WORKER_STATE: dict[str, Any] = {}


def _row_worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _row_worker(position: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    state = _WORKER_STATE
    index, seeds = state["units"][position]
    t, fusion, settings = state["work"][index]
    captions: dict[str, Any] = {}
    row = run_row(state["tasks"][t], fusion, settings, state["features"], state["encoders"], seeds,
                  state["precision"], state["device"], False, captions, state["auto_precision"])
    return position, row, captions


def run_units(work: list[tuple[int, str, TrainSettings]], units: Sequence[Unit], tasks: Sequence[BenchTask],
              features: Features, encoders: dict[str, Any], config: BenchConfig, precision: str,
              device: torch.device, jobs: int, devices: Sequence[torch.device] | None = None):
    """Train and score every unit; yield ``(position in units, row, captions)`` as units finish.

    ``jobs == 1``: in this process, in order, with per-step progress bars. More on a CPU:
    forked worker processes of ``torch.get_num_threads() // jobs`` threads each (the features
    and encoders are inherited, not copied), the longest units started first, a bar counting
    finished units; on CUDA (or given ``devices``) :func:`run_units_on_devices`.
    """
    auto = config.mixed_precision == "auto"
    if devices is None and device.type == "cuda" and jobs > 1:
        devices = row_devices(device, jobs)
    if devices:
        yield from run_units_on_devices(work, units, tasks, features, encoders, config, precision, devices)
        return
    if jobs == 1:
        for position, (index, seeds) in enumerate(units):
            t, fusion, settings = work[index]
            captions: dict[str, Any] = {}
            row = run_row(tasks[t], fusion, settings, features, encoders, seeds, precision, device,
                          config.progress, captions, auto)
            yield position, row, captions
        return
    _WORKER_STATE.update(work=work, units=list(units), tasks=tasks, features=features, encoders=encoders,
                         precision=precision, device=device, auto_precision=auto)
    threads = max(1, torch.get_num_threads() // jobs)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_row_worker_init, initargs=(threads,)) as pool, \
                tqdm(total=len(units), desc=f"rows x seeds ({jobs} at once)", unit="row",
                     disable=not config.progress) as bar:
            futures = [pool.submit(_row_worker, k) for k in longest_first(work, units, tasks)]
            for future in as_completed(futures):
                bar.update(1)
                yield future.result()
    finally:
        _WORKER_STATE.clear()


def longest_first(work: Sequence[tuple[int, str, TrainSettings]], units: Sequence[Unit],
                  tasks: Sequence[BenchTask]) -> list[int]:
    """The positions of ``units``, the costliest (:func:`unit_cost`) first; ties in order."""
    return sorted(range(len(units)), key=lambda k: -unit_cost(work, tasks, units[k]))


def run_rows(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask], features: Features,
             encoders: dict[str, Any], config: BenchConfig, precision: str, device: torch.device, jobs: int,
             devices: Sequence[torch.device] | None = None):
    """Train and score every row of ``work`` for every seed of ``config``; yield ``(index, row, captions)``.

    Each row once all its seeds have finished (:func:`run_units` over :func:`seed_units`; ``devices``
    as there), as one row over the seeds (:func:`~fusionzoo.bench.row.combine_seed_rows`); rows in
    the order their last seed finishes.
    """
    units = seed_units(len(work), config.seeds)
    done: dict[int, dict[int, tuple[dict[str, Any], dict[str, Any]]]] = {}  # index -> seed -> (row, captions)
    for position, row, captions in run_units(work, units, tasks, features, encoders, config, precision, device,
                                             jobs, devices):
        index, (seed,) = units[position]
        done.setdefault(index, {})[seed] = (row, captions)
        if len(done[index]) == len(config.seeds):
            of_row = done.pop(index)
            parts = [of_row[s] for s in config.seeds]
            yield index, combine_seed_rows([row for row, _ in parts]), merge_captions([c for _, c in parts])


def merge_captions(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Captions ``task -> fusion -> seed -> {image id: caption}`` of several units, as one dict."""
    merged: dict[str, Any] = {}
    for part in parts:
        for task, per_fusion in part.items():
            for fusion, per_seed in per_fusion.items():
                merged.setdefault(task, {}).setdefault(fusion, {}).update(per_seed)
    return merged


def run_units_on_devices(work: list[tuple[int, str, TrainSettings]], units: Sequence[Unit],
                         tasks: Sequence[BenchTask], features: Features, encoders: dict[str, Any],
                         config: BenchConfig, precision: str, devices: Sequence[torch.device]):
    """:func:`run_units` with one unit at a time per device of ``devices`` (one per GPU), in threads.

    Threads, not processes: a forked process cannot use CUDA once its parent has, and the
    features are shared, not copied. Each device gets its own copy of the frozen encoders
    (the models hold them as submodules and are moved to their device); the GPUs run the
    kernels while the threads take turns in Python. Longest units first, as :func:`run_units`.
    """
    per_device = []
    for k, device in enumerate(devices):
        copied = encoders if k == 0 else {name: copy.deepcopy(module) for name, module in encoders.items()}
        per_device.append({name: (module.to(device) if module is not None else None)
                           for name, module in copied.items()})
    threads = max(1, torch.get_num_threads() // len(devices))  # CPU "devices" (tests) share the cores
    free: "queue.Queue[int]" = queue.Queue()
    for k in range(len(devices)):
        free.put(k)

    def one(position: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        k = free.get()
        if devices[k].type == "cpu":
            torch.set_num_threads(threads)  # per thread: a new thread starts with the default count
        try:
            index, seeds = units[position]
            t, fusion, settings = work[index]
            captions: dict[str, Any] = {}
            row = run_row(tasks[t], fusion, settings, features, per_device[k], seeds, precision, devices[k],
                          False, captions, config.mixed_precision == "auto")
            return position, row, captions
        finally:
            free.put(k)

    with ThreadPoolExecutor(len(devices)) as pool, \
            tqdm(total=len(units), desc=f"rows x seeds ({len(devices)} devices)", unit="row",
                 disable=not config.progress) as bar:
        futures = [pool.submit(one, k) for k in longest_first(work, units, tasks)]
        for future in as_completed(futures):
            bar.update(1)
            yield future.result()
