"""The report's PNG plots (matplotlib, Agg backend), and the label placement that keeps their names apart.

* :func:`plot_scores` -- ``score_<task>.png``: bars from 0, error bars over seeds, the priors as lines;
* :func:`plot_scatter` -- ``score_vs_params.png``, ``score_vs_throughput.png``: one panel per task, log x;
* :func:`plot_retrieval_cost` -- ``score_vs_seconds_<task>.png``: retrieval r_mean against milliseconds
  per query, reranked and all pairs;
* :func:`plot_breakdowns` -- ``per_type_<task>.png``: accuracy per answer / question type or label;
* :func:`plot_robustness` -- ``robustness_<task>.png`` (``--robustness``): the score against each
  corruption's level, one line per fusion;
* :func:`place_labels` / :func:`label_points` -- a name beside each point, off the other labels,
  points, error bars and prior lines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .formatting import (BREAKDOWNS, PERCENT, breakdown_groups, format_number, headline_score, headline_std,
                         is_reference, mean_and_std, ordered, row_label, scored_split)
from .priors import plot_priors
from .robustness import CLEAN, CORRUPTIONS, trained_on

#: Line styles of the priors in the plots.
PRIOR_STYLES = {"majority": {"color": "black", "linestyle": ":", "linewidth": 1.3},
                "question": {"color": "#c0392b", "linestyle": "-.", "linewidth": 1.2}}
DPI = 120


def _axis_label(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT else metric


def _tick_count(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def place_labels(points: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 bounds: tuple[float, float, float, float], pad: float, marker: float,
                 obstacles: Sequence[tuple[float, float, float, float]] = (),
                 bars: Sequence[tuple[float, float]] | None = None,
                 max_steps: int = 16) -> list[tuple[float, float, bool]]:
    """Where to put one label per point so that labels overlap neither each other nor other points.

    Works in any unit (the plots use pixels). Each label is tried beside its point --
    to the right, else to the left -- then moved up and down by steps of half its
    height, nearest first; the first place inside ``bounds`` that touches no label
    placed before, no obstacle, and comes no nearer than ``pad`` to another point's
    marker wins (labels are placed top to bottom). When there is no such place the
    label stays beside its point.

    Args:
        points: (x, y) of each point.
        sizes: (width, height) of each label.
        bounds: (x0, y0, x1, y1) the labels must stay in.
        pad: gap between a point and its label.
        marker: half the width of a point's marker.
        obstacles: more (x0, y0, x1, y1) boxes to keep labels off (lines drawn across the plot).
        bars: per point, the (low, high) ends of its error bar, kept clear like its marker.
        max_steps: how many half heights a label may move up or down.
    Returns:
        per point: the label's left x, its centre y, and whether it is right of its point.
    """
    x0, y0, x1, y1 = bounds
    clear = marker + 2 * pad  # nearer to its own point than to any other: twice ``pad`` from other markers
    markers = [(px - clear, py - clear, px + clear, py + clear) for px, py in points]
    if bars:  # an error bar is a thin line: kept clear by a little, not by ``pad``
        markers += [(px - 3, lo, px + 3, hi) for (px, _), (lo, hi) in zip(points, bars)]
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float, bool]] = [(0.0, 0.0, True)] * len(points)

    def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i in sorted(range(len(points)), key=lambda i: -points[i][1]):
        (px, py), (width, height) = points[i], sizes[i]
        sides = [True, False] if px + pad + width <= x1 else [False, True]
        best = None
        for step in [0] + [s * k for k in range(1, max_steps + 1) for s in (1, -1)]:
            for right in sides:
                left = px + pad if right else px - pad - width
                cy = py + step * height / 2
                box = (left, cy - height / 2, left + width, cy + height / 2)
                inside = box[0] >= x0 and box[2] <= x1 and box[1] >= y0 and box[3] <= y1
                if inside and not any(overlaps(box, other) for other in [*placed, *obstacles]) and not any(
                        overlaps(box, m) for j, m in enumerate(markers) if j % len(points) != i):
                    best = (left, cy, right, box)
                    break
            if best is not None:
                break
        if best is None:  # crowded: beside the point, on the side with room
            right = sides[0]
            left = px + pad if right else px - pad - width
            best = (left, py, right, (left, py - height / 2, left + width, py + height / 2))
        out[i] = best[:3]
        placed.append(best[3])
    return out


def label_points(ax: Any, xs: Sequence[float], ys: Sequence[float], names: Sequence[str],
                 fontsize: float = 8, marker_size: float = 40, lines_at: Sequence[float] = (),
                 yerr: Sequence[Sequence[float]] | None = None) -> list[Any]:
    """Name each point beside it, keeping labels off each other and off the other points (:func:`place_labels`).

    Call once the axes' limits and the figure's layout are final (the labels are placed
    in pixels). A label moved away from its point gets a thin leader line; labels also
    keep off the horizontal lines at the heights ``lines_at`` (the priors) and off the
    error bars ``yerr`` (matplotlib's [lower, upper] form).

    Returns:
        the annotation artists, in the order of ``names``.
    """
    import numpy as np

    if not names:
        return []
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))  # (N, 2) px
    to_pixels = fig.dpi / 72
    sizes = []
    for name in names:
        probe = ax.text(0, 0, name, fontsize=fontsize, transform=None)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((extent.width + 2, extent.height))
    lines = [(box.x0, y - 2, box.x1, y + 2) for _, y in ax.transData.transform([(xs[0], v) for v in lines_at])]
    bars = None
    if yerr is not None:
        low = ax.transData.transform(np.column_stack([xs, np.subtract(ys, yerr[0])]))[:, 1]
        high = ax.transData.transform(np.column_stack([xs, np.add(ys, yerr[1])]))[:, 1]
        bars = list(zip(low.tolist(), high.tolist()))
    places = place_labels([tuple(p) for p in points], sizes, (box.x0 + 2, box.y0 + 2, box.x1 - 2, box.y1 - 2),
                          pad=4 * to_pixels, marker=0.5 * math.sqrt(marker_size) * to_pixels + 1, obstacles=lines,
                          bars=bars)
    artists = []
    for (px, py), (left, cy, right), (width, height), name, x, y in zip(points, places, sizes, names, xs, ys):
        anchor = left if right else left + width
        moved = abs(cy - py) > 0.5 * height
        artists.append(ax.annotate(
            name, (x, y), xytext=((anchor - px) / to_pixels, (cy - py) / to_pixels), textcoords="offset points",
            ha="left" if right else "right", va="center", fontsize=fontsize, zorder=4,
            arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4} if moved else None))
    return artists


def _error_bars(values: Sequence[float], errors: Sequence[float], percent: bool) -> list[list[float]] | None:
    """``yerr`` for matplotlib: ± the seed standard deviation, cut at 0 (and 100 for a percentage); None without."""
    if not any(errors):
        return None
    low = [min(e, max(v, 0.0)) for v, e in zip(values, errors)]
    high = [min(e, max(100.0 - v, 0.0)) if percent else e for v, e in zip(values, errors)]
    return [low, high]


def _colors(rows: Sequence[dict[str, Any]]) -> list[str]:
    return ["#9e9e9e" if is_reference(r) else "#3b75af" for r in rows]


def _legend_below(fig: Any, handles: Sequence[Any], labels: Sequence[str], ncol: int, fontsize: float = 8) -> float:
    """A legend under the axes, outside them, in as many columns as fit the figure's width (at most ``ncol``).

    Returns:
        the fraction of the figure's height it takes (for ``tight_layout(rect=...)``).
    """
    renderer = fig.canvas.get_renderer()
    ncol = max(1, min(ncol, len(labels)))
    while True:
        legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=fontsize, frameon=False,
                            bbox_to_anchor=(0.5, 0.0))
        extent = legend.get_window_extent(renderer)
        if ncol == 1 or extent.width <= 0.98 * fig.bbox.width:
            return (extent.height + 4) / fig.bbox.height
        legend.remove()
        ncol -= 1


def _draw_priors(ax: Any, priors: Sequence[tuple[str, str, float]]) -> list[tuple[Any, str]]:
    return [(ax.axhline(value, zorder=3, **PRIOR_STYLES[style]), label) for style, label, value in priors]


def plot_scores(rows: Sequence[dict[str, Any]], task: str, path: Path,
                priors: Sequence[tuple[str, str, float]] = ()) -> None:
    """Headline score per fusion (bars from 0), the seed standard deviation as error bars, priors as lines."""
    import matplotlib.pyplot as plt

    rows = ordered(rows)
    metric = rows[0]["config"]["headline_metric"]
    scores = [headline_score(r) for r in rows]
    errors = [headline_std(r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 1.5), 4.4), dpi=DPI)
    ax.bar(range(len(rows)), scores, yerr=_error_bars(scores, errors, metric in PERCENT), capsize=4,
           color=_colors(rows), error_kw={"lw": 1.0})
    ax.set_xticks(range(len(rows)), [row_label(r).replace(" (reference)", "\n(reference)") for r in rows],
                  rotation=30, ha="right")
    seeds = len(rows[0]["seeds"])
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{task}: {scored_split(rows)} {metric}" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""))
    for i, (score, error) in enumerate(zip(scores, errors)):
        ax.annotate(format_number(score, metric), (i, score + error), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    lines = _draw_priors(ax, priors)
    top = max([s + e for s, e in zip(scores, errors) if not math.isnan(s)] + [v for *_, v in priors] + [1e-9])
    ax.set_ylim(0, top * 1.12)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    reserve = _legend_below(fig, *zip(*lines), ncol=2) if lines else 0.0
    fig.tight_layout(rect=(0, reserve, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_scatter(rows: Sequence[dict[str, Any]], tasks: Sequence[str], key: str, xlabel: str, path: Path,
                 run: dict[str, Any] | None = None) -> None:
    """Headline score against ``key`` (trainable parameters, throughput), one panel per task, log x.

    Error bars are the seed standard deviation; the priors of :func:`plot_priors` are lines.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.4 * len(tasks), 4.4), squeeze=False, dpi=DPI)
    labelled: list[tuple[Any, list[float], list[float], list[str], list[float], Any]] = []
    styles_used: dict[str, None] = {}
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        metric = task_rows[0]["config"]["headline_metric"]
        xs = [max(float(row[key]), 1e-9) for row in task_rows]
        ys = [headline_score(row) for row in task_rows]
        errors = [headline_std(row) for row in task_rows]
        ax.scatter(xs, ys, c=_colors(task_rows), s=40, zorder=3)
        yerr = _error_bars(ys, errors, metric in PERCENT)
        if yerr is not None:
            ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor="0.4", elinewidth=0.8, capsize=3, zorder=2)
        priors = plot_priors(task, run or {}, metric)
        for style, _, value in priors:
            ax.axhline(value, zorder=1, **PRIOR_STYLES[style])
            styles_used[style] = None
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.12, y=0.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        labelled.append((ax, xs, ys, [r["fusion"] + (" (ref.)" if is_reference(r) else "") for r in task_rows],
                         [value for *_, value in priors], yerr))
    names = {"majority": "majority prior", "question": "question prior"}
    handles = [Line2D([], [], **PRIOR_STYLES[s]) for s in styles_used]
    reserve = _legend_below(fig, handles, [names[s] for s in styles_used], ncol=2) if handles else 0.0
    fig.tight_layout(rect=(0, reserve, 1, 1))
    for ax, xs, ys, labels, lines_at, yerr in labelled:
        ax.set_xlim(ax.get_xlim())  # freeze the limits: the labels are placed in pixels
        ax.set_ylim(ax.get_ylim())
        label_points(ax, xs, ys, labels, lines_at=lines_at, yerr=yerr)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_retrieval_cost(rows: Sequence[dict[str, Any]], task: str, path: Path) -> None:
    """A retrieval task's r_mean against milliseconds per query (ITC shortlist + ITM reranking), log x.

    Each fusion is two points joined by a line: reranking its ITC shortlist (filled) and
    ITM on every pair (hollow); the dual encoder (ITC alone) is the grey reference point.
    Error bars are the seed standard deviation.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = ordered(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=DPI)
    xs, ys, names, errors = [], [], [], []
    k = "k"
    for row, color in zip(rows, _colors(rows)):
        m = row["metrics"]
        x, y = 1e3 * max(m["seconds_per_query"], 1e-9), m["r_mean"]
        if m.get("rerank_k"):
            k = f"{m['rerank_k']:g}"
        ax.errorbar([x], [y], yerr=[m.get("r_mean_std", 0.0)] if "r_mean_std" in m else None, fmt="o", color=color,
                    ms=6.5, capsize=3, elinewidth=0.8, zorder=3)
        xs.append(x), ys.append(y), errors.append(m.get("r_mean_std", 0.0))
        names.append(row["fusion"] + (" (ref.)" if is_reference(row) else ""))
        if "all_r_mean" in m:
            x_all, y_all = 1e3 * max(m["all_seconds_per_query"], 1e-9), m["all_r_mean"]
            ax.plot([x, x_all], [y, y_all], color=color, lw=0.8, alpha=0.6, zorder=2)
            ax.errorbar([x_all], [y_all], yerr=[m["all_r_mean_std"]] if "all_r_mean_std" in m else None, fmt="o",
                        mfc="white", color=color, ms=6.5, capsize=3, elinewidth=0.8, zorder=3)
            xs.append(x_all), ys.append(y_all), errors.append(m.get("all_r_mean_std", 0.0))
            names.append(f"{row['fusion']} (all)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("milliseconds per query (ITC shortlist + ITM rerank, cached features)")
    ax.set_ylabel(_axis_label("r_mean"))
    seeds = len(rows[0]["seeds"]) if rows else 1
    ax.set_title(f"{task}: test r_mean against cost" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="none", color="#3b75af"),
               Line2D([], [], marker="o", ls="none", color="#3b75af", mfc="white"),
               Line2D([], [], marker="o", ls="none", color="#9e9e9e")]
    reserve = _legend_below(fig, handles, [f"ITM reranks the {k} best by ITC", "ITM on every pair",
                                           "dual encoder (ITC alone)"], ncol=3)
    fig.tight_layout(rect=(0, reserve, 1, 1))
    ax.set_xlim(ax.get_xlim())  # freeze the limits: the labels are placed in pixels
    ax.set_ylim(ax.get_ylim())
    label_points(ax, xs, ys, names, yerr=[errors, errors] if any(errors) else None)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_breakdowns(rows: Sequence[dict[str, Any]], task: str, path: Path,
                    majority: dict[str, Any] | None = None) -> bool:
    """Grouped bars of accuracy per type (question type, answer type, label); False when there is none.

    Bars start at 0; error bars are the seed standard deviation; the majority prior's
    accuracy per type is a dotted segment over each group; the legend is under the plot.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = ordered(rows)
    panels = [(b, breakdown_groups(rows, b)) for b in BREAKDOWNS]
    panels = [(b, g) for b, g in panels if g and (len(g) > 1 or b == "per_answer_type")]
    if not panels:
        return False
    width_in = max(7.0, 1.1 * max(len(g) for _, g in panels) * 1.6)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.4 * len(panels) + 0.9), squeeze=False, dpi=DPI)
    width = 0.8 / len(rows)
    cmap = plt.get_cmap("tab10")
    seeds = len(rows[0]["seeds"])
    handles: list[Any] = []
    for ax, (breakdown, groups) in zip(axes[:, 0], panels):
        handles = []
        for k, row in enumerate(rows):
            means, stds = mean_and_std(row["metrics"].get(breakdown, {}))
            values = [means.get(g, 0.0) for g in groups]
            errors = [stds.get(g, 0.0) for g in groups]
            positions = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(groups))]
            handles.append(ax.bar(positions, values, width, yerr=_error_bars(values, errors, True), capsize=2,
                                  error_kw={"lw": 0.8}, color=cmap(k % 10),
                                  hatch="//" if is_reference(row) else None))
        prior = (majority or {}).get("metrics", {}).get(breakdown, {})
        if prior:
            ax.hlines([prior.get(g, float("nan")) for g in groups], [i - 0.42 for i in range(len(groups))],
                      [i + 0.42 for i in range(len(groups))], zorder=3, **{
                          k: v for k, v in PRIOR_STYLES["majority"].items() if k != "linestyle"},
                      linestyles=PRIOR_STYLES["majority"]["linestyle"])
        ax.set_xticks(range(len(groups)), groups, rotation=15)
        ax.set_xlim(-0.55, len(groups) - 0.45)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{task}: accuracy per {breakdown.replace('per_', '').replace('_', ' ')}"
                     + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""))
        ax.set_ylim(0, 105)
    labels = [row_label(r) for r in rows]
    if majority:
        handles.append(Line2D([], [], **PRIOR_STYLES["majority"]))
        labels.append(f"always \"{majority['answer']}\" (majority prior)")
    reserve = _legend_below(fig, handles, labels, ncol=min(5, max(3, math.ceil(len(labels) / 2))))
    fig.tight_layout(rect=(0, reserve, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _robustness_panels() -> list[tuple[str, str, list[tuple[Any, str]]]]:
    """The panels of :func:`plot_robustness`: (title, x label, [(x, score key)]), clean first in each."""
    noise = [(c.level, c.name) for c in CORRUPTIONS if c.kind == "noise"]
    dropout = sorted((c.level, c.name) for c in CORRUPTIONS if c.kind == "dropout")
    other = [c.name for c in CORRUPTIONS if c.kind not in ("noise", "dropout")]
    return [("image noise", "Gaussian noise (sd of each channel)", [(0.0, CLEAN), *noise]),
            ("word dropout", "chance of dropping each word (1 = empty question)", [(0.0, CLEAN), *dropout]),
            ("removed / shuffled", "", [(i, name) for i, name in enumerate([CLEAN, *other])])]


def plot_robustness(rows: Sequence[dict[str, Any]], task: str, path: Path) -> bool:
    """``robustness_<task>.png``: the headline score against each corruption's level, one line per fusion;
    False when no row was scored on corrupted inputs (``--robustness``).

    Three panels: image noise (0, 0.5, 1, 2 sd), word dropout (0, 0.25, 0.5, 1 = the empty question) and
    the rest (image zeros, image mean, word shuffle) beside the clean score; error bars over seeds.
    """
    import matplotlib.pyplot as plt

    rows = [r for r in ordered(rows) if r["metrics"].get("robustness")]
    if not rows:
        return False
    metric = rows[0]["config"]["headline_metric"]
    seeds = len(rows[0]["seeds"])
    panels = _robustness_panels()
    fig, axes = plt.subplots(1, len(panels), figsize=(13.5, 4.4), squeeze=False, dpi=DPI)
    cmap = plt.get_cmap("tab10")
    handles = []
    for ax, (title, xlabel, points) in zip(axes[0], panels):
        handles = []
        for k, row in enumerate(rows):
            means, stds = mean_and_std(row["metrics"]["robustness"])
            kept = [(x, key) for x, key in points if key in means]
            xs, values = [x for x, _ in kept], [means[key] for _, key in kept]
            errors = [stds.get(key, 0.0) for _, key in kept]
            handle = ax.errorbar(xs, values, yerr=_error_bars(values, errors, metric in PERCENT), marker="o",
                                 markersize=4, capsize=2, lw=1.3, color=cmap(k % 10),
                                 linestyle="--" if is_reference(row) else "-")
            handles.append(handle)
        if isinstance(points[-1][0], int) and not xlabel:  # categories
            ax.set_xticks([x for x, _ in points], [key for _, key in points], rotation=15)
        else:
            ax.set_xticks([x for x, _ in points])
            ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.set_ylabel(_axis_label(metric))
        if metric in PERCENT:
            ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task}: {scored_split(rows)} {metric} on corrupted inputs ({trained_on(rows)})"
                 + (f", mean ± sd over {seeds} seeds" if seeds > 1 else ""), fontsize=11)
    reserve = _legend_below(fig, handles, [row_label(r) for r in rows], ncol=min(8, len(rows)))
    fig.tight_layout(rect=(0, reserve, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True
