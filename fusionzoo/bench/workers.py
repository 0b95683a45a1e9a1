"""Running the run's rows: each row to its task's row function, in this process, in forked workers or on several GPUs.

:func:`run_rows` takes the run's work list -- ``(task index, row name, settings)`` -- and
yields every row as it finishes: one at a time here (``--jobs 1``), in forked worker
processes that share the features and encoders (``--jobs N`` on a CPU), or one thread per GPU
(:func:`run_rows_on_devices`), the longest rows (:func:`row_cost`) started first.
:func:`run_row` sends a row to :func:`~fusionzoo.bench.row.run_prediction_row` or, for a
retrieval task, to :func:`~fusionzoo.bench.retrieval.run_retrieval_row`; :func:`task_rows`
names a task's rows.
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
from .row import run_prediction_row
from .run_features import Features
from .settings import TrainSettings, row_precision
from .suites import BenchTask


def run_row(task: BenchTask, fusion: str, settings: TrainSettings, features: Features, encoders: dict[str, Any],
            seeds: Sequence[int], precision: str, device: torch.device, progress: bool,
            captions_out: dict[str, Any], auto_precision: bool = False) -> dict[str, Any]:
    """Train and score one row for every seed: a retrieval task's by
    :func:`~fusionzoo.bench.retrieval.run_retrieval_row`, any other by
    :func:`~fusionzoo.bench.row.run_prediction_row`; the aggregated results row.

    ``auto_precision``: ``precision`` is what ``--mixed-precision auto`` chose, which a fusion
    unsafe in bf16 (:data:`~fusionzoo.bench.settings.BF16_UNSAFE`) runs in float32 instead."""
    precision = row_precision(fusion, precision, auto_precision)
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


#: What forked row workers read (set by :func:`run_rows` just before it forks).
_WORKER_STATE: dict[str, Any] = {}


def _row_worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _row_worker(index: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    state = _WORKER_STATE
    t, fusion, settings = state["work"][index]
    captions: dict[str, Any] = {}
    row = run_row(state["tasks"][t], fusion, settings, state["features"], state["encoders"], state["seeds"],
                  state["precision"], state["device"], False, captions, state["auto_precision"])
    return index, row, captions


def run_rows(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask], features: Features,
             encoders: dict[str, Any], config: BenchConfig, precision: str, device: torch.device, jobs: int):
    """Train and score every (task, fusion, settings) of ``work``; yield ``(index, row, captions)`` as rows finish.

    ``jobs == 1``: in this process, in order, with per-step progress bars. More:
    forked worker processes of ``torch.get_num_threads() // jobs`` threads each
    (the features and encoders are inherited, not copied), the longest rows
    (most training samples) started first; a bar counts finished rows.
    """
    if device.type == "cuda" and jobs > 1:
        yield from run_rows_on_devices(work, tasks, features, encoders, config, precision, row_devices(device, jobs))
        return
    if jobs == 1:
        for index, (t, fusion, settings) in enumerate(work):
            captions: dict[str, Any] = {}
            row = run_row(tasks[t], fusion, settings, features, encoders, config.seeds, precision, device,
                          config.progress, captions, config.mixed_precision == "auto")
            yield index, row, captions
        return
    _WORKER_STATE.update(work=work, tasks=tasks, features=features, encoders=encoders, seeds=list(config.seeds),
                         precision=precision, device=device, auto_precision=config.mixed_precision == "auto")
    cost = lambda i: -row_cost(tasks[work[i][0]], work[i][1], work[i][2])  # noqa: E731  (longest first)
    threads = max(1, torch.get_num_threads() // jobs)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_row_worker_init, initargs=(threads,)) as pool, \
                tqdm(total=len(work), desc=f"rows ({jobs} at once)", unit="row", disable=not config.progress) as bar:
            futures = [pool.submit(_row_worker, i) for i in sorted(range(len(work)), key=cost)]
            for future in as_completed(futures):
                bar.update(1)
                yield future.result()
    finally:
        _WORKER_STATE.clear()


def run_rows_on_devices(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask], features: Features,
                        encoders: dict[str, Any], config: BenchConfig, precision: str, devices: Sequence[torch.device]):
    """:func:`run_rows` with one row at a time per device of ``devices`` (one per GPU), in threads.

    Threads, not processes: a forked process cannot use CUDA once its parent has, and the
    features are shared, not copied. Each device gets its own copy of the frozen encoders
    (the models hold them as submodules and are moved to their device); the GPUs run the
    kernels while the threads take turns in Python. Longest rows first, as :func:`run_rows`.
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

    def one(index: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        k = free.get()
        if devices[k].type == "cpu":
            torch.set_num_threads(threads)  # per thread: a new thread starts with the default count
        try:
            t, fusion, settings = work[index]
            captions: dict[str, Any] = {}
            row = run_row(tasks[t], fusion, settings, features, per_device[k], config.seeds, precision, devices[k],
                          False, captions, config.mixed_precision == "auto")
            return index, row, captions
        finally:
            free.put(k)

    cost = lambda i: -row_cost(tasks[work[i][0]], work[i][1], work[i][2])  # noqa: E731  (longest first)
    with ThreadPoolExecutor(len(devices)) as pool, \
            tqdm(total=len(work), desc=f"rows ({len(devices)} devices)", unit="row", disable=not config.progress) as bar:
        futures = [pool.submit(one, i) for i in sorted(range(len(work)), key=cost)]
        for future in as_completed(futures):
            bar.update(1)
            yield future.result()
