"""``fusionzoo bench --tune``: choose each row's settings on the validation split, then score test once.

For every task of the run, one grid of training settings (:func:`grid_for`: the
task's :data:`TUNE_GRIDS` entry, or ``--tune-grid``) is tried for every row -- every
fusion and reference gets the same trials. Each trial trains on the train split and
scores the validation split (the first seed only); the row's chosen trial -- the first, in
grid order (cheaper values first), whose headline metric is within :data:`TOLERANCE` of the
best trial's -- is then trained again with every seed and scored on the test split, once.
The tolerance keeps a trial that costs three times as much from winning by a difference
the validation split cannot resolve (on easy-VQA's 3,801 validation questions, 0.5 points
is 19 questions). Settings outside the
grid stay each row's defaults (:func:`fusionzoo.bench.settings.settings_for`).

Each result row carries its tuning under ``"tune"``::

    {"split": "val", "seed": 0, "grid": {"epochs": [2, 6], "lr": [0.001, 0.002]},
     "trials": [{"epochs": 2, "lr": 0.001, "score": 97.1}, ...],
     "chosen": {"epochs": 6, "lr": 0.001}, "val_score": 99.2, "best_score": 99.3, "tolerance": 0.005}

and the report shows the validation score beside the test score.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields, replace
from typing import Any, Sequence

from .suites import BenchError

#: Settings a grid may set (numeric fields of :class:`~fusionzoo.bench.settings.TrainSettings`).
GRID_KEYS = {"epochs": float, "lr": float, "batch_size": int, "weight_decay": float, "warmup_ratio": float}

#: Per task: the grid ``--tune`` tries for every row, cheapest values first (a tie goes to the
#: cheaper trial). easy-VQA also tries two batch sizes: eight trials, four elsewhere.
TUNE_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "easy-vqa": {"epochs": (2, 6), "batch_size": (256, 64), "lr": (1e-3, 2e-3)},
    "sort-of-clevr": {"epochs": (4, 8), "lr": (5e-4, 1e-3)},
    "coco-yesno": {"epochs": (3, 6), "lr": (3e-4, 1e-3)},
    "coco-captioning": {"epochs": (4, 8), "lr": (5e-4, 1e-3)},
    "coco-match": {"epochs": (3, 6), "lr": (3e-4, 1e-3)},
    "coco-retrieval": {"epochs": (3, 5), "lr": (5e-4, 1e-3)},
}


#: Tasks that take another task's grid (the same kind of data and model task).
GRID_ALIASES = {"vqav2": "coco-yesno", "flickr30k-captioning": "coco-captioning",
                "flickr30k-match": "coco-match", "flickr30k-retrieval": "coco-retrieval"}


def grid_for(task: str, base: Any) -> dict[str, list[Any]]:
    """The grid of ``task`` (:data:`TUNE_GRIDS`, through :data:`GRID_ALIASES`), else a grid around ``base``.

    The fallback, for a task without an entry: half and all of ``base``'s epochs x half and
    twice its learning rate.
    """
    name = GRID_ALIASES.get(task, task)
    if name in TUNE_GRIDS:
        return {key: list(values) for key, values in TUNE_GRIDS[name].items()}
    return {"epochs": [base.epochs / 2, base.epochs], "lr": [base.lr / 2, base.lr * 2]}


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``"epochs=2,6 lr=1e-3,2e-3"`` -> ``{"epochs": [2.0, 6.0], "lr": [0.001, 0.002]}``.

    Raises:
        BenchError: a part that is not ``key=v1,v2``, a key that is not a setting
            (:data:`GRID_KEYS`), a value that is not a positive number (an integer for
            ``batch_size``), or a key given twice.
    """
    grid: dict[str, list[Any]] = {}
    parts = text.replace(";", " ").split()
    if not parts:
        raise BenchError("--tune-grid is empty; expected e.g. 'epochs=2,6 lr=1e-3,2e-3'")
    for part in parts:
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise BenchError(f"--tune-grid: {part!r} is not key=v1,v2 (e.g. 'epochs=2,6 lr=1e-3,2e-3')")
        if key == "warmup":
            raise BenchError("--tune-grid: 'warmup' is now called 'warmup_ratio' (the name `fusionzoo train` uses)")
        if key not in GRID_KEYS:
            raise BenchError(f"--tune-grid: unknown setting {key!r}; expected one of {', '.join(GRID_KEYS)}")
        if key in grid:
            raise BenchError(f"--tune-grid: {key!r} given twice")
        kind = GRID_KEYS[key]
        parsed = []
        for value in values.split(","):
            try:
                number = kind(value) if kind is int else float(value)
            except ValueError:
                raise BenchError(f"--tune-grid: {key}={values}: {value!r} is not "
                                 f"{'an integer' if kind is int else 'a number'}") from None
            if not number > 0 and not (key in ("weight_decay", "warmup_ratio") and number == 0):
                raise BenchError(f"--tune-grid: {key}={values}: {value!r} must be > 0")
            parsed.append(number)
        grid[key] = list(dict.fromkeys(parsed))
    return grid


def grid_trials(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def apply_trial(settings: Any, trial: dict[str, Any], max_epochs: float | None = None) -> Any:
    """``settings`` with the trial's values (epochs capped at ``max_epochs``, as ``--quick`` caps them)."""
    names = {f.name for f in fields(settings)}
    unknown = set(trial) - names
    if unknown:
        raise BenchError(f"tuning grid sets {', '.join(sorted(unknown))}, which these settings do not have")
    changed = dict(trial)
    if max_epochs is not None and "epochs" in changed:
        changed["epochs"] = min(changed["epochs"], max_epochs)
    return replace(settings, **changed)


#: A trial is as good as the best when its score is within this fraction of the best score
#: (0.5%: half a point of accuracy near 100%); the first such trial in grid order is chosen.
TOLERANCE = 0.005


def best_trial(scores: Sequence[float], tolerance: float = TOLERANCE) -> int:
    """Index of the first score within ``tolerance * |best|`` of the best; a NaN score is never chosen.

    ``tolerance=0`` is the first of the highest scores. Every score NaN: index 0.
    """
    if not scores:
        raise ValueError("no trial scores")
    key = [(-math.inf if score is None or math.isnan(score) else score) for score in scores]
    best = max(key)
    if best == -math.inf:
        return 0
    return next(i for i, score in enumerate(key) if score >= best - tolerance * abs(best))


def tune_record(grid: dict[str, list[Any]], trials: Sequence[dict[str, Any]], scores: Sequence[float],
                seed: int) -> dict[str, Any]:
    """What a result row keeps of its tuning (module docstring)."""
    chosen = best_trial(scores)
    return {"split": "val", "seed": seed, "grid": grid,
            "trials": [{**trial, "score": float(score)} for trial, score in zip(trials, scores)],
            "chosen": dict(trials[chosen]), "val_score": float(scores[chosen]),
            "best_score": float(max(scores[best_trial(scores, 0.0)], scores[chosen])), "tolerance": TOLERANCE}
