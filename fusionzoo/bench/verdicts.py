"""Which differences in a report are larger than their noise, and what a task's table says in words.

One rule everywhere (tables and ``bench compare``): two scores with seed standard deviations
``sd_a`` and ``sd_b`` differ when ``|a - b| > sqrt(sd_a^2 + sd_b^2)``. A score with one seed
has no spread, so a difference involving it is never judged (never marked); the majority
prior is computed, not trained, and has spread 0.

Every fusion row is read against the **best baseline** of its task: the highest of the
majority prior and the reference rows (text-only, image-only, the dual-encoder ITC row of
retrieval). The table shows each fusion's difference from it and from the next fusion
below; :func:`verdict_lines` says in words how many fusions beat the baseline by more than
the spread, and says so plainly when none does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .formatting import format_number, headline_score, is_reference, ordered, row_label


def seed_std(row: dict[str, Any], metric: str) -> float | None:
    """The seeds' standard deviation of ``metric`` in ``row``; None with fewer than two seeds."""
    if len(row.get("seeds") or []) < 2:
        return None
    value = row["metrics"].get(f"{metric}_std")
    return None if value is None else float(value)


def combined_spread(sd_a: float | None, sd_b: float | None) -> float | None:
    """``sqrt(sd_a^2 + sd_b^2)``, or None when either score has no spread."""
    if sd_a is None or sd_b is None:
        return None
    return math.hypot(sd_a, sd_b)


def exceeds(difference: float, spread: float | None) -> bool:
    """Whether a difference is larger than its spread (never when there is no spread)."""
    return spread is not None and abs(difference) > spread


@dataclass(frozen=True)
class Baseline:
    """The best baseline of a task: its label, headline score and seed spread (0 for the prior)."""

    label: str
    score: float
    std: float | None


def best_baseline(task_rows: Sequence[dict[str, Any]], majority: dict[str, Any] | None) -> Baseline | None:
    """The highest of the majority prior and the reference rows of one task (None when it has neither)."""
    if not task_rows:
        return None
    metric = task_rows[0]["config"]["headline_metric"]
    several = len(task_rows[0].get("seeds") or []) > 1
    candidates = [Baseline(row_label(r), headline_score(r), seed_std(r, metric)) for r in task_rows
                  if is_reference(r) and not math.isnan(headline_score(r))]
    if majority and metric in majority.get("metrics", {}):
        candidates.append(Baseline(f"majority prior \"{majority['answer']}\"", float(majority["metrics"][metric]),
                                   0.0 if several else None))
    return max(candidates, key=lambda b: b.score, default=None)


def marked(difference: float, spread: float | None, metric: str) -> str:
    """``+1.23`` / ``-0.40``, with ``*`` when the difference is larger than its spread."""
    return f"{'+' if difference >= 0 else '-'}{format_number(abs(difference), metric)}" + (
        "*" if exceeds(difference, spread) else "")


def difference_cells(task_rows: Sequence[dict[str, Any]], baseline: Baseline | None) -> list[tuple[str, str]]:
    """Per row of ``ordered(task_rows)``: (difference from the best baseline, from the next fusion below)."""
    rows = ordered(task_rows)
    metric = rows[0]["config"]["headline_metric"]
    fusions = [r for r in rows if not is_reference(r)]
    cells = []
    for row in rows:
        if is_reference(row):
            cells.append(("-", "-"))
            continue
        score, std = headline_score(row), seed_std(row, metric)
        vs_base = ("-" if baseline is None else
                   marked(score - baseline.score, combined_spread(std, baseline.std), metric))
        index = fusions.index(row)
        below = fusions[index + 1] if index + 1 < len(fusions) else None
        vs_next = ("-" if below is None else
                   marked(score - headline_score(below), combined_spread(std, seed_std(below, metric)), metric))
        cells.append((vs_base, vs_next))
    return cells


def verdict_lines(task_rows: Sequence[dict[str, Any]], baseline: Baseline | None) -> list[str]:
    """What one task's table says, in words: the fusions against the best baseline, and how judged."""
    rows = ordered(task_rows)
    fusions = [r for r in rows if not is_reference(r)]
    if not fusions or baseline is None:
        return []
    metric = rows[0]["config"]["headline_metric"]
    seeds = len(rows[0].get("seeds") or [])
    base = f"the best baseline, {baseline.label} ({format_number(baseline.score, metric)} {metric})"
    above = [r for r in fusions if headline_score(r) > baseline.score]
    if seeds < 2:
        if not above:
            text = (f"No fusion scores above {base}: here the fusions do not use both modalities better than "
                    "the simpler baseline does. ")
        else:
            text = f"{len(above)} of {len(fusions)} fusions score above {base}. "
        return [text + "With one seed there is no spread to tell a difference from noise: nothing is marked "
                "(run with --seeds 3 to judge differences).", ""]
    beat = [r for r in fusions if exceeds(headline_score(r) - baseline.score,
                                          combined_spread(seed_std(r, metric), baseline.std))]
    beat = [r for r in beat if headline_score(r) > baseline.score]
    if not beat:
        text = (f"No fusion beats {base} by more than the seeds' spread"
                + (f" ({len(above)} score above it within the noise)" if above else "")
                + ": here the fusions do not use both modalities better than the simpler baseline does.")
    else:
        names = ", ".join(r["fusion"] for r in beat)
        text = (f"{len(beat)} of {len(fusions)} fusions beat {base} by more than the seeds' spread: {names}.")
    return [text + f" * marks a difference larger than the seeds' spread sqrt(sd_a^2 + sd_b^2) over {seeds} "
            "seeds (vs baseline: from the best baseline; vs next: from the next fusion below).", ""]
