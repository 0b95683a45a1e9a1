"""How the report reads a results row and writes its numbers; shared by the tables and the plots.

A row's name (:func:`row_label`, references marked), its headline score and the spread over
seeds (:func:`headline_score`, :func:`headline_std`), the order rows are shown in
(:func:`ordered`: best first, references last), the digits and unit of a metric
(:func:`format_number`), and the groups of a per-type breakdown (:func:`mean_and_std`,
:func:`breakdown_groups`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

#: Breakdown metrics plotted per type, in order of preference.
BREAKDOWNS = ("per_question_type", "per_answer_type", "per_label")
#: Metrics in percent (the others are fractions or scores).
PERCENT = ("accuracy", "macro_f1", "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean",
           "all_r_mean", "itc_r_mean")


def is_reference(row: dict[str, Any]) -> bool:
    return bool(row["config"].get("reference"))


def row_label(row: dict[str, Any]) -> str:
    return f"{row['fusion']} (reference)" if is_reference(row) else row["fusion"]


def headline_score(row: dict[str, Any]) -> float:
    return float(row["metrics"].get(row["config"]["headline_metric"], float("nan")))


def headline_std(row: dict[str, Any]) -> float:
    return float(row["metrics"].get(f"{row['config']['headline_metric']}_std", 0.0))


def ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fusions best first, then the references."""
    return sorted(rows, key=lambda r: (is_reference(r),
                                       -headline_score(r) if not math.isnan(headline_score(r)) else 0.0))


def scored_split(rows: Sequence[dict[str, Any]]) -> str:
    """The split the rows were scored on: ``test``, or ``val`` for a run with ``--eval-split val``."""
    return str(rows[0]["config"].get("eval_split", "test")) if rows else "test"


def format_number(value: float, metric: str) -> str:
    if metric in PERCENT or metric.startswith("per_"):
        return f"{value:.2f}"
    if metric.endswith("seconds_per_query"):
        return f"{1e3 * value:.2f}"  # in milliseconds (the header says so)
    return f"{value:.3f}"


def mean_and_std(values: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Split a breakdown averaged over seeds (``{"a": m, "a_std": s}``) into means and standard deviations.

    A ``<name>_std`` entry is a spread only when ``<name>`` is there too, so a type that
    happens to end in ``_std`` stays a type.
    """
    stds = {name[:-4]: v for name, v in values.items() if name.endswith("_std") and name[:-4] in values}
    means = {name: v for name, v in values.items() if not (name.endswith("_std") and name[:-4] in values)}
    return means, stds


def breakdown_groups(rows: Sequence[dict[str, Any]], breakdown: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for name in mean_and_std(row["metrics"].get(breakdown, {}))[0]:
            names[name] = None
    return sorted(names)
