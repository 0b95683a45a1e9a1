"""``fusionzoo bench compare RUN_A RUN_B``: per task x fusion, how the headline metric moved between two reports.

Reads each run folder's ``results.json`` (what :func:`fusionzoo.bench.run_bench` wrote) and,
for every (task, fusion) row in both, prints ``B - A`` of the task's headline metric. Where
both rows were trained with several seeds, the difference comes with its spread
``sqrt(sd_A^2 + sd_B^2)`` (the seeds' standard deviations combined, as for the difference of
two independent runs) and is marked ``*`` when it is larger than that spread; a difference
between single-seed rows has no spread to judge it by and is never marked. Rows present in
only one run are listed after the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .suites import BenchError
from .verdicts import combined_spread, exceeds, seed_std


@dataclass(frozen=True)
class RowComparison:
    """One (task, fusion) in both runs: the headline metric in each, their seed spreads, the verdict."""

    task: str
    fusion: str
    metric: str
    a: float
    b: float
    a_std: float | None
    b_std: float | None

    @property
    def difference(self) -> float:
        return self.b - self.a

    @property
    def spread(self) -> float | None:
        """Combined seed standard deviation, or None unless both rows had several seeds."""
        return combined_spread(self.a_std, self.b_std)

    @property
    def significant(self) -> bool:
        """The difference exceeds the seeds' spread (never for single-seed rows)."""
        return exceeds(self.difference, self.spread)


def load_results(run: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``(task, fusion) -> row`` of ``run/results.json``; errors name the file and what is wrong."""
    path = Path(run) / "results.json"
    if not path.is_file():
        raise BenchError(f"{path}: no such file; expected a `fusionzoo bench --out` folder holding results.json")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(rows, list):
        raise BenchError(f"{path}: expected a list of result rows, got {type(rows).__name__}")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for index, row in enumerate(rows):
        try:
            metric = row["config"]["headline_metric"]
            float(row["metrics"][metric])
            key = (str(row["task"]), str(row["fusion"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BenchError(f"{path}: row {index} lacks task, fusion, config.headline_metric or that metric "
                             f"({type(exc).__name__}: {exc})") from exc
        out[key] = row
    return out


def compare_runs(run_a: Path, run_b: Path) -> tuple[list[RowComparison], list[tuple[str, str]], list[tuple[str, str]]]:
    """The rows of both runs compared, and the (task, fusion) keys only in A and only in B (in report order)."""
    a, b = load_results(run_a), load_results(run_b)
    both: list[RowComparison] = []
    for key, row_a in a.items():
        if key not in b:
            continue
        row_b = b[key]
        metric = row_a["config"]["headline_metric"]
        if row_b["config"]["headline_metric"] != metric:
            raise BenchError(f"{key[0]} {key[1]}: headline metric {metric!r} in {run_a} but "
                             f"{row_b['config']['headline_metric']!r} in {run_b}")
        both.append(RowComparison(key[0], key[1], metric, float(row_a["metrics"][metric]),
                                  float(row_b["metrics"][metric]), seed_std(row_a, metric), seed_std(row_b, metric)))
    return both, [k for k in a if k not in b], [k for k in b if k not in a]


def format_comparison(rows: Sequence[RowComparison], only_a: Sequence[tuple[str, str]],
                      only_b: Sequence[tuple[str, str]], run_a: Path, run_b: Path) -> list[str]:
    """The comparison as Markdown lines: a table per task, then the unmatched rows."""
    lines = [f"A = {run_a}, B = {run_b}; difference = B - A; * = larger than the seeds' spread "
             "sqrt(sd_A^2 + sd_B^2) (rows with one seed have no spread)", ""]
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        lines += [f"## {task} ({task_rows[0].metric})", "", "| fusion | A | B | B - A | spread |", "|---|---|---|---|---|"]
        for r in task_rows:
            spread = "" if r.spread is None else f"{r.spread:.2f}"
            mark = " *" if r.significant else ""
            lines.append(f"| {r.fusion} | {r.a:.2f} | {r.b:.2f} | {r.difference:+.2f}{mark} | {spread} |")
        lines.append("")
    for name, keys in (("A", only_a), ("B", only_b)):
        if keys:
            lines.append(f"only in {name}: " + ", ".join(f"{task} {fusion}" for task, fusion in keys))
    if not rows:
        lines.append("no (task, fusion) row is in both runs")
    return lines


def run_compare(run_a: Path, run_b: Path, echo: Callable[[str], None] = print) -> list[RowComparison]:
    """Compare two report folders and print the table; returns the compared rows."""
    rows, only_a, only_b = compare_runs(run_a, run_b)
    for line in format_comparison(rows, only_a, only_b, run_a, run_b):
        echo(line)
    return rows
