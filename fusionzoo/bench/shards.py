"""One benchmark run split over machines: ``fusionzoo bench --shard I/N`` and ``fusionzoo bench merge``.

A run's work is its rows (task x fusion), each trained once per seed, each first tuned over
its grid with ``--tune``. ``--shard I/N`` runs the I-th of N disjoint parts of it and writes
a *part* to ``--out``: :data:`PART_FILE` (the run's identity, the one-seed rows it trained,
their captions, answers and tuning records) and :data:`SCORES_FILE` (retrieval score arrays).
``fusionzoo bench merge DIR...`` reads the N parts, checks that they are one run's and whole,
and writes the report one run would have written.

How the work is cut (:func:`shard_units`): without ``--tune`` a part is a set of
``(row, seed)`` units; with it, of whole rows (a row's trials, then its seeds), since the
settings a row trains with depend on every one of its trials. Units go to the parts by
longest processing time first: each, costliest first (the bench's own cost estimate), to the
part with the least cost so far. The cut depends only on the run's options, so every machine
computes the same one without talking to the others.

What makes parts one run's (:func:`run_identity`): the suite, its tasks and fusions, the seeds,
every option that changes a score, the precision the options resolved to, each row's settings,
the fusionzoo version and git commit, and the feature cache keys (the encoders' weights, the
preprocessing and the inputs). Options that change only where or how fast a part runs
(``--out``, ``--jobs``, ``--device``, ``--cache-dir``, ``--data-dir``, progress bars) may differ.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io import write_json_atomic
from ..version import __version__
from .row import SCORES_KEY
from .suites import BenchError

#: A part's file of everything but the score arrays.
PART_FILE = "shard.json"
#: A part's retrieval score arrays, keys ``"<index>/<seed>/<array>"``.
SCORES_FILE = "shard-scores.npz"
#: The layout of :data:`PART_FILE`; a merge refuses another.
PART_FORMAT = 1
#: Options of a run that do not change its scores: they may differ between parts.
LOCAL_OPTIONS = ("out", "shard", "jobs", "device", "cache_dir", "no_cache", "data_dir", "progress")

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``, 1 <= I <= N; anything else is a :class:`BenchError` naming the value."""
    match = _SHARD.match(text)
    if not match:
        raise BenchError(f"--shard {text!r}: expected I/N, the I-th of N parts (e.g. 1/4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise BenchError(f"--shard {text}: expected 1 <= I <= N, got I={index}, N={count}")
    return index, count


def assign_parts(costs: Sequence[float], parts: int) -> list[int]:
    """The part (0-based) of each item: longest processing time first, ties to the lowest part and item."""
    loads = [0.0] * parts
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        owner[item] = part
        loads[part] += costs[item]
    return owner


def shard_units(costs: Sequence[float], seeds: Sequence[int], tune: bool, trials: Sequence[int],
                shard: tuple[int, int]) -> list[tuple[int, tuple[int, ...]]]:
    """The units of part ``shard`` = ``(I, N)``: ``(row index, seeds)``, in row, then seed order.

    ``costs[i]``: row i's cost for one seed; ``trials[i]``: its number of tuning trials (each
    a one-seed training). Without ``tune`` a unit is one row and one seed; with it, one row and
    every seed.
    """
    index, count = shard
    if tune:
        units = [(row, tuple(seeds)) for row in range(len(costs))]
        weights = [costs[row] * (len(seeds) + trials[row]) for row in range(len(costs))]
    else:
        units = [(row, (seed,)) for row in range(len(costs)) for seed in seeds]
        weights = [costs[row] for row, _ in units]
    owner = assign_parts(weights, count)
    return [unit for unit, part in zip(units, owner) if part == index - 1]


def run_identity(config: dict[str, Any], precision: str, work: Sequence[tuple[str, str, dict[str, Any]]],
                 feature_entries: Sequence[dict[str, Any]], git_commit: str | None) -> dict[str, Any]:
    """What the parts of one run share (see the module docstring); compared whole by :func:`check_parts`.

    ``config``: the run's options (``BenchConfig`` as a dict); ``work``: ``(task, row, settings)``
    per row before tuning; ``feature_entries``: the cache's ``entries`` (name and key of each).
    """
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items() if k not in LOCAL_OPTIONS}
    return json.loads(json.dumps({
        "options": options,
        "precision": precision,
        "work": [[task, row, settings] for task, row, settings in work],
        "features": sorted({f"{e['name']}-{e['key']}" for e in feature_entries}),
        "fusionzoo": __version__,
        "git_commit": git_commit,
    }))


def write_part(out: Path, shard: tuple[int, int], identity: dict[str, Any], units: Sequence[Any],
               rows: Sequence[tuple[int, dict[str, Any], dict[str, Any]]], tuning: dict[int, dict[str, Any]],
               run_info: dict[str, Any]) -> Path:
    """Write a part to ``out``: the score arrays first, :data:`PART_FILE` last (atomically); returns its path.

    ``rows``: ``(row index, one-seed row, its captions)``; the rows' score arrays (``SCORES_KEY``)
    go to :data:`SCORES_FILE`, everything else into the JSON.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for index, row, captions in rows:
        row = dict(row)
        for seed, per_name in row.pop(SCORES_KEY, {}).items():
            for name, array in per_name.items():
                arrays[f"{index}/{seed}/{name}"] = np.asarray(array)
        entries.append({"index": index, "seed": row["seeds"][0], "row": row, "captions": captions})
    temporary = out / f".{SCORES_FILE}.tmp.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, out / SCORES_FILE)
    path = out / PART_FILE
    write_json_atomic(path, {"format": PART_FORMAT, "shard": list(shard), "identity": identity,
                             "units": [[i, list(seeds)] for i, seeds in units], "rows": entries,
                             "tuning": {str(i): record for i, record in tuning.items()}, "run": run_info})
    return path


def read_part(folder: Path) -> dict[str, Any]:
    """A part written by :func:`write_part`, its rows' score arrays back under ``SCORES_KEY``."""
    path = Path(folder) / PART_FILE
    if not path.is_file():
        hint = " (it holds a report: merge the --shard parts' folders)" if (Path(folder) / "results.json").is_file() else ""
        raise BenchError(f"{folder}: no {PART_FILE}; expected the --out folder of a fusionzoo bench --shard I/N "
                         f"run{hint}")
    try:
        part = json.loads(path.read_text())
    except ValueError as exc:
        raise BenchError(f"{path}: not JSON ({exc})") from None
    if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
        found = part.get("format") if isinstance(part, dict) else type(part).__name__
        raise BenchError(f"{path}: key 'format' is {found!r}, expected {PART_FORMAT} (a part of this fusionzoo "
                         "version; rerun the part)")
    for key in ("shard", "identity", "units", "rows", "tuning", "run"):
        if key not in part:
            raise BenchError(f"{path}: key {key!r} is missing; expected a part written by fusionzoo bench --shard")
    scores_path = Path(folder) / SCORES_FILE
    arrays: dict[str, np.ndarray] = {}
    if scores_path.is_file():
        with np.load(scores_path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    per_row: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        index, seed, array_name = name.split("/", 2)
        per_row.setdefault((int(index), seed), {})[array_name] = array
    for entry in part["rows"]:
        seed = str(entry["seed"])
        if (entry["index"], seed) in per_row:
            entry["row"][SCORES_KEY] = {seed: per_row[(entry["index"], seed)]}
    part["path"] = str(path)
    return part


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """The first key path at which two JSON values differ (``""`` when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key}".lstrip(".")
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for k, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{k}]")
            if found:
                return found
        return ""
    return "" if a == b else (where.lstrip(".") or "(whole value)")


def check_parts(parts: Sequence[dict[str, Any]]) -> tuple[int, list[int]]:
    """Check that ``parts`` are every part of one run, each once, and every unit in exactly one of them.

    Returns ``(rows, seeds)`` of the run. Raises :class:`BenchError` naming the part files and what differs
    or is missing.
    """
    if not parts:
        raise BenchError("bench merge: no parts given")
    first = parts[0]
    count = first["shard"][1]
    for part in parts[1:]:
        where = _first_difference(first["identity"], part["identity"])
        if where:
            raise BenchError(f"{part['path']} is not a part of the run of {first['path']}: they differ at "
                             f"identity.{where} ({_at(first['identity'], where)} vs {_at(part['identity'], where)})")
        if part["shard"][1] != count:
            raise BenchError(f"{part['path']} is part {part['shard'][0]}/{part['shard'][1]}, but {first['path']} "
                             f"is one of {count} parts")
    seen: dict[int, str] = {}
    for part in parts:
        index = part["shard"][0]
        if index in seen:
            raise BenchError(f"part {index}/{count} is given twice: {seen[index]} and {part['path']}")
        seen[index] = part["path"]
    missing = [i for i in range(1, count + 1) if i not in seen]
    if missing:
        raise BenchError(f"the run has {count} parts and part(s) {', '.join(f'{i}/{count}' for i in missing)} "
                         f"are missing (given: {', '.join(sorted(seen.values()))})")
    rows = len(first["identity"]["work"])
    seeds = list(first["identity"]["options"]["seeds"])
    done: dict[tuple[int, int], str] = {}
    for part in parts:
        for entry in part["rows"]:
            unit = (entry["index"], entry["seed"])
            if unit in done:
                raise BenchError(f"row {entry['index']} seed {entry['seed']} is in both {done[unit]} and {part['path']}")
            done[unit] = part["path"]
    absent = [(i, s) for i in range(rows) for s in seeds if (i, s) not in done]
    if absent:
        work = first["identity"]["work"]
        listed = ", ".join(f"{work[i][0]} {work[i][1]} seed {s}" for i, s in absent[:5])
        raise BenchError(f"the parts are incomplete: {len(absent)} row x seed unit(s) have no result, e.g. {listed} "
                         "(a part that stopped early: rerun it)")
    return rows, seeds


def _at(value: Any, where: str) -> Any:
    for piece in re.findall(r"[^.\[\]]+|\[\d+\]", where):
        if piece.startswith("["):
            value = value[int(piece[1:-1])] if isinstance(value, list) else None
        else:
            value = value.get(piece) if isinstance(value, dict) else None
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def part_rows(parts: Sequence[dict[str, Any]]) -> dict[int, dict[int, tuple[dict[str, Any], dict[str, Any]]]]:
    """Every part's one-seed rows: ``row index -> seed -> (row, captions)``."""
    out: dict[int, dict[int, tuple[dict[str, Any], dict[str, Any]]]] = {}
    for part in parts:
        for entry in part["rows"]:
            out.setdefault(entry["index"], {})[entry["seed"]] = (entry["row"], entry["captions"])
    return out

