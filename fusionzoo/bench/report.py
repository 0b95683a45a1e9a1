"""The benchmark report: ``results.json``, ``results.md``, ``run.json``, ``captions.json`` and PNG plots.

Files written to the output folder:

* ``results.json`` -- a list with one object per task x fusion, with exactly the
  keys ``task``, ``fusion``, ``metrics``, ``params_trainable``, ``params_total``,
  ``train_seconds``, ``eval_samples_per_second``, ``peak_memory_mb``, ``seeds``,
  ``config``;
* ``results.md`` -- the tables a person reads first: one per task, best first,
  references last, then the per-type breakdowns; with several seeds every cell is
  "mean ± standard deviation" over the seeds;
* ``run.json`` -- the run: machine, wall time, feature-cache hits and misses,
  package versions, git commit, the command's options, the files written;
* ``captions.json`` -- the generated test captions (captioning tasks);
* plots (matplotlib, Agg backend): ``score_<task>.png`` (bars from 0, error bars
  over seeds, the priors as lines), ``score_vs_params.png``,
  ``score_vs_throughput.png`` (labels kept apart, :func:`label_points`),
  ``per_type_<task>.png`` (VQA per answer and question type, classification per label),
  ``score_vs_seconds_<task>.png`` (retrieval: r_mean against milliseconds per query, reranked
  and all pairs, :func:`plot_retrieval_cost`);
* ``scores_<task>_<row>_seed<seed>.npz`` -- retrieval: each row's score matrices (``i2t``,
  ``t2i`` as the row ranks, ``image_ids``, ``caption_ids``, ``owner``, and ``itc_*`` / ``all_*``
  for a fusion row), which ``fusionzoo score retrieval`` reads;
* ``vqa_results_<task>_<fusion>.json`` -- a VQA task with official question ids (VQA v2):
  the first seed's answer to every scored question, ``[{"question_id": int, "answer": str}]``,
  the official VQA results format.

The priors drawn and printed: the *majority prior* of a VQA or classification task
(:func:`majority_prior`: every test sample given the test split's commonest answer or
label) and, for VQA, the *question prior* of :func:`~fusionzoo.tasks.scoring.question_prior`.

A report replaces the previous one in the same folder: the files are written into a
temporary folder inside ``--out`` and moved into place once all are written, and the
files that the previous report's ``run.json`` lists (and only those, and only names of
:data:`REPORT_FILES`) are removed first, so no plot of an earlier suite stays beside the
new report; nothing else in the folder is touched.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from ..training.checkpoint import run_metadata, write_json_atomic

#: Breakdown metrics plotted per type, in order of preference.
BREAKDOWNS = ("per_question_type", "per_answer_type", "per_label")
#: Extra metric columns shown in results.md per model task.
COLUMNS = {
    "vqa": ("accuracy",),
    "classification": ("accuracy", "macro_f1", "roc_auc"),
    "captioning": ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"),
    "retrieval": ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "rerank_seconds_per_query",
                  "all_r_mean", "all_rerank_seconds_per_query", "itc_r_mean"),
}
#: Column headers that are not the metric's own name.
HEADERS = {"rerank_seconds_per_query": "rerank ms/query", "all_r_mean": "all-pairs r_mean",
           "all_rerank_seconds_per_query": "all-pairs ms/query", "itc_r_mean": "own ITC r_mean"}
#: Metrics in percent (the others are fractions or scores).
PERCENT = ("accuracy", "macro_f1", "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean",
           "all_r_mean", "itc_r_mean")
#: The names a report writes into ``--out`` (shell patterns); a new report removes the previous one's.
REPORT_FILES = ("results.json", "results.md", "run.json", "captions.json", "score_*.png", "per_type_*.png",
                "scores_*.npz", "vqa_results_*.json")
#: Line styles of the priors in the plots.
PRIOR_STYLES = {"majority": {"color": "black", "linestyle": ":", "linewidth": 1.3},
                "question": {"color": "#c0392b", "linestyle": "-.", "linewidth": 1.2}}
DPI = 120


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------
def _is_reference(row: dict[str, Any]) -> bool:
    return bool(row["config"].get("reference"))


def _label(row: dict[str, Any]) -> str:
    return f"{row['fusion']} (reference)" if _is_reference(row) else row["fusion"]


def _score(row: dict[str, Any]) -> float:
    return float(row["metrics"].get(row["config"]["headline_metric"], float("nan")))


def _score_std(row: dict[str, Any]) -> float:
    return float(row["metrics"].get(f"{row['config']['headline_metric']}_std", 0.0))


def ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fusions best first, then the references."""
    return sorted(rows, key=lambda r: (_is_reference(r), -_score(r) if not math.isnan(_score(r)) else 0.0))


def _split(rows: Sequence[dict[str, Any]]) -> str:
    """The split the rows were scored on: ``test``, or ``val`` for a run with ``--eval-split val``."""
    return str(rows[0]["config"].get("eval_split", "test")) if rows else "test"


def _number(value: float, metric: str) -> str:
    if metric in PERCENT or metric.startswith("per_"):
        return f"{value:.2f}"
    if metric.endswith("seconds_per_query"):
        return f"{1e3 * value:.2f}"  # in milliseconds (the header says so)
    return f"{value:.3f}"


def _with_std(metrics: dict[str, Any], name: str) -> str:
    if name not in metrics:
        return "-"
    text = _number(metrics[name], name)
    if f"{name}_std" in metrics:
        text += f" ± {_number(metrics[f'{name}_std'], name)}"
    return text


def _axis_label(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT else metric


def mean_and_std(values: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Split a breakdown averaged over seeds (``{"a": m, "a_std": s}``) into means and standard deviations.

    A ``<name>_std`` entry is a spread only when ``<name>`` is there too, so a type that
    happens to end in ``_std`` stays a type.
    """
    stds = {name[:-4]: v for name, v in values.items() if name.endswith("_std") and name[:-4] in values}
    means = {name: v for name, v in values.items() if not (name.endswith("_std") and name[:-4] in values)}
    return means, stds


def _count(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _tick_count(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def summary_line(task: Any, rows: Sequence[dict[str, Any]], seconds: float) -> str:
    """One line per task: every row's headline score, best first, references last."""
    parts = []
    for row in ordered(rows):
        name = row["fusion"] + ("*" if _is_reference(row) else "")
        parts.append(f"{name} {_number(_score(row), task.metric)}")
    return f"{task.name} ({task.metric}; * = reference): " + " | ".join(parts) + f"  [{_duration(seconds)}]"


# --------------------------------------------------------------------------------------
# Priors
# --------------------------------------------------------------------------------------
def majority_prior(task: Any) -> dict[str, Any] | None:
    """What giving every test sample the test split's commonest answer (VQA) or label scores.

    The answer is the one with the largest summed soft score (VQA) or the commonest
    label id (classification); it is scored by the task's own benchmark metrics, so
    the per-type breakdowns come with it.

    Returns:
        ``answer``, ``kind`` (``"answer"`` / ``"label"``) and ``metrics`` (as a row's,
        numbers only); None for a task without labels (captioning).
    """
    import torch

    from ..tasks import VQATask, get_task

    task_object = get_task(task.task)
    labels = task.test.labels
    if task_object.generates_text or labels is None or not task.vocabulary or len(task.test) == 0:
        return None
    counts = (labels.float().sum(dim=0) if labels.dim() == 2
              else torch.bincount(labels.long(), minlength=len(task.vocabulary)).float())
    best = int(counts.argmax())
    logits = torch.zeros(len(task.test), len(task.vocabulary))
    logits[:, best] = 1.0
    metrics = task_object.bench_metrics(task, task.test, logits)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict))}
    return {"answer": str(task.vocabulary[best]), "kind": "answer" if isinstance(task_object, VQATask) else "label",
            "metrics": numbers}


def _question_prior_shown(prior: dict[str, Any] | None) -> bool:
    """Drawn in a plot when it covers at least half of the test questions (else only results.md reports it)."""
    return bool(prior and prior.get("seen_in_train") and "train_answer_accuracy" in prior
                and prior["seen_in_train"] >= 0.5 * prior["test_questions"])


def plot_priors(task: str, run: dict[str, Any], metric: str) -> list[tuple[str, str, float]]:
    """The priors of ``task`` on the scale of ``metric``: ``(style, label, value)`` for each line to draw."""
    lines = []
    majority = run.get("majority_prior", {}).get(task)
    if majority and metric in majority["metrics"]:
        lines.append(("majority", f"majority {majority['kind']} \"{majority['answer']}\" "
                                  f"{_number(majority['metrics'][metric], metric)}", majority["metrics"][metric]))
    question = run.get("question_prior", {}).get(task)
    if metric == "accuracy" and _question_prior_shown(question):
        share = question["seen_in_train"] / question["test_questions"]
        lines.append(("question", f"question prior {question['train_answer_accuracy']:.2f}"
                                  + (f" ({100 * share:.0f}% of questions)" if share < 1 else ""),
                      question["train_answer_accuracy"]))
    return lines


def _prior_lines(task: str, run: dict[str, Any], metric: str) -> list[str]:
    """The sentences on the priors under a task's heading in results.md (and in the terminal)."""
    lines = []
    prior = run.get("question_prior", {}).get(task)
    if prior and prior["seen_in_train"]:
        lines += [f"question prior: {prior['seen_in_train']:,} of {prior['test_questions']:,} test questions "
                  f"({100 * prior['seen_in_train'] / prior['test_questions']:.0f}%) are asked in the train split "
                  f"too; answering them with the train split's commonest answer to the same question scores "
                  f"{prior['train_answer_accuracy']:.1f}% (the ceiling of memorising questions)", ""]
    majority = run.get("majority_prior", {}).get(task)
    if majority and metric in majority["metrics"]:
        kind = majority["kind"]
        lines += [f"majority prior: giving every test sample the test split's commonest {kind}, "
                  f"\"{majority['answer']}\", scores {_number(majority['metrics'][metric], metric)}"
                  f"{'%' if metric in PERCENT else ''} {metric} (the chance line of the plots)", ""]
    return lines


# --------------------------------------------------------------------------------------
# results.md and the terminal
# --------------------------------------------------------------------------------------
def _retrieval_lines(task_rows: Sequence[dict[str, Any]]) -> list[str]:
    """What a retrieval table's columns mean (no lines for other tasks)."""
    if not task_rows or task_rows[0]["config"]["model_task"] != "retrieval":
        return []
    ks = sorted({int(r["metrics"]["rerank_k"]) for r in task_rows if r["metrics"].get("rerank_k")})
    k = "/".join(map(str, ks)) or "k"
    weights = sorted({float(r["config"].get("rerank_itc_weight", 0.0)) for r in task_rows if not _is_reference(r)})
    plus = ("" if not any(weights) else
            f" plus {'/'.join(f'{w:g}' for w in weights)} x its ITC logit")
    return [f"recall@K in percent, txt_ image -> text, img_ text -> image, r_mean their mean; a fusion row ranks "
            f"each query's {k} best candidates by its own ITC embeddings, then reranks them by its ITM log-odds{plus} "
            f"(all-pairs: every pair scored so; own ITC: its embeddings alone); the itc reference is a dual encoder "
            f"trained with ITC alone. ms/query: milliseconds of ITM reranking per query (image or caption), on "
            f"cached features; eval queries/s counts the ITC shortlist too", ""]


def _schedule(row: dict[str, Any]) -> str:
    config = row["config"]
    text = (f"{config['epochs']:g} x {config['batch_size']}, lr {config['lr']:g}, "
            f"dim {config['fusion_kwargs'].get('dim', '-')}")
    if "itm_weight" in config:  # retrieval
        text += f", itm {config['itm_weight']:g}"
    return text


def _tune_lines(task_rows: Sequence[dict[str, Any]]) -> list[str]:
    """What ``--tune`` tried, when it ran: the grid, trials per row, the seed."""
    record = next((r["tune"] for r in task_rows if "tune" in r), None)
    if record is None:
        return []
    grid = " x ".join(f"{key} {{{', '.join(f'{v:g}' for v in values)}}}" for key, values in record["grid"].items())
    return [f"settings chosen by --tune on the validation split: the same grid for every row ({grid}: "
            f"{len(record['trials'])} trials, seed {record['seed']}); each row's first trial in grid order "
            f"within {100 * record.get('tolerance', 0):g}% of its best {task_rows[0]['config']['headline_metric']} "
            "trained again and scored on the test split once; \"val\" is that trial's validation score, the "
            "table's settings column what it chose", ""]


def task_table(task_rows: Sequence[dict[str, Any]]) -> list[str]:
    """The Markdown table of one task's rows (best first, references last); "mean ± sd" with several seeds."""
    task_rows = ordered(task_rows)
    columns = COLUMNS[task_rows[0]["config"]["model_task"]]
    varies = len({_schedule(r) for r in task_rows}) > 1
    metric = task_rows[0]["config"]["headline_metric"]
    tuned = any("tune" in r for r in task_rows)
    header = ["fusion", *[HEADERS.get(c, c) for c in columns],
              *([f"val {HEADERS.get(metric, metric)} (--tune)"] if tuned else []), "trainable params", "train s",
              "eval queries/s" if task_rows[0]["config"]["model_task"] == "retrieval" else "eval samples/s",
              "peak MB"]
    if varies:
        header.append("epochs x batch, lr, dim" + (", itm weight" if "itm_weight" in task_rows[0]["config"] else ""))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in task_rows:
        val = [_number(row["tune"]["val_score"], metric) if "tune" in row else "-"] if tuned else []
        cells = [_label(row), *[_with_std(row["metrics"], c) for c in columns], *val, _count(row["params_trainable"]),
                 f"{row['train_seconds']:.1f}", f"{row['eval_samples_per_second']:,.0f}",
                 f"{row['peak_memory_mb']:.0f}"]
        if varies:
            cells.append(_schedule(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _breakdown_tables(task_rows: Sequence[dict[str, Any]], majority: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    for breakdown in BREAKDOWNS:
        groups = _groups(task_rows, breakdown)
        if not groups or (len(groups) < 2 and breakdown != "per_label"):
            continue
        title = breakdown.replace("per_", "").replace("_", " ")
        lines += [f"accuracy per {title} (%):", "", "| fusion | " + " | ".join(groups) + " |",
                  "|" + "---|" * (len(groups) + 1)]
        table_rows = [(_label(row), row["metrics"].get(breakdown, {})) for row in task_rows]
        if majority and breakdown in majority["metrics"]:
            table_rows.append((f"always \"{majority['answer']}\" (majority prior)", majority["metrics"][breakdown]))
        for label, values in table_rows:
            means, stds = mean_and_std(values)
            cells = [("-" if g not in means else f"{means[g]:.1f}" + (f" ± {stds[g]:.1f}" if g in stds else ""))
                     for g in groups]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(rows: Sequence[dict[str, Any]], run: dict[str, Any]) -> str:
    """The Markdown report: run line, one table per task, per-type tables, example captions."""
    machine = run["machine"]
    cache = run["cache"]
    cache_text = ("off" if not cache["enabled"] else
                  f"{cache['hits']} hits, {cache['misses']} misses ({cache['extraction_seconds']:.0f}s extracting)")
    features = run["features"]
    trained = run.get("config", {}).get("train_encoders") or 0  # --train-encoders N
    encoders = f"last {trained} block{'s' if trained > 1 else ''} trained" if trained else "frozen"
    lines = [
        f"# fusionzoo bench: {run['suite']} suite{' (--quick)' if run['quick'] else ''}",
        "",
        f"- machine: {machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads), "
        f"device {machine['device']}{', ' + machine['gpu'] if 'gpu' in machine else ''}; precision "
        f"{run['precision']}",
        f"- wall time: {_duration(run['wall_seconds'])} (feature cache: {cache_text})",
        f"- encoders ({encoders}): "
        f"{run.get('config', {}).get('vision', 'efficientnet-lite0')}"
        + (" (random weights)" if run.get("config", {}).get("vision_weights") == "random" else "")
        + f" at {features['image_size']} px "
        f"({features['image_tokens'][0]} tokens of {features['image_tokens'][1]}"
        + (f": stage {features['image_stage']} map" if features.get("image_stage") is not None else "")
        + (f", {features['position_channels']} of them position channels" if features.get("position_channels")
           else "") + f") + {run.get('config', {}).get('text', 'minilm-l6')}; "
        f"{features['images']:,} images, {features.get('texts', 0):,} distinct texts"
        + (f", {features['captions']:,} distinct captions" if features.get("captions") else "")
        + (" encoded once up to the trained blocks" if trained else " encoded once"),
        f"- seeds: {', '.join(map(str, run['seeds']))}"
        + (" (every cell: mean ± standard deviation over the seeds)" if len(run["seeds"]) > 1 else ""),
        ("- throughput: test samples per second through the encoders' trained tails, fusion + head on cached "
         "tail inputs (the frozen part of the encoders excluded); " if trained else
         "- throughput: test samples per second through fusion + head on cached features (encoders excluded); ")
        + "peak memory: extra resident memory while training and scoring the row",
        "",
    ]
    for task in run["tasks"]:
        task_rows = ordered([r for r in rows if r["task"] == task])
        if not task_rows:
            continue
        first = task_rows[0]
        varies = len({_schedule(r) for r in task_rows}) > 1
        lines += [f"## {task}", "", run["task_descriptions"].get(task, ""), "",
                  f"trained on {first['config']['train_samples']:,} samples"
                  + ("" if varies else f" for {first['config']['epochs']:g} epochs (batch "
                     f"{first['config']['batch_size']}, lr {first['config']['lr']:g})")
                  + (f", scored on {first['config']['test_images']:,} test images x "
                     f"{first['config']['test_samples']:,} captions" if "test_images" in first["config"] else
                     f", scored on {first['config']['test_samples']:,} {_split(task_rows)} samples")
                  + ("; each fusion's epochs x batch, learning rate and width in the table" if varies else ""), ""]
        lines += _prior_lines(task, run, first["config"]["headline_metric"])
        lines += _tune_lines(task_rows)
        lines += _retrieval_lines(task_rows)
        lines += [*task_table(task_rows), ""]
        lines += _breakdown_tables(task_rows, run.get("majority_prior", {}).get(task))
    return "\n".join(lines).rstrip() + "\n"


def results_tables(rows: Sequence[dict[str, Any]], run: dict[str, Any]) -> str:
    """Each task's table of results.md with its prior lines: what the terminal shows at the end of a run."""
    lines: list[str] = []
    for task in run["tasks"]:
        task_rows = ordered([r for r in rows if r["task"] == task])
        if not task_rows:
            continue
        metric = task_rows[0]["config"]["headline_metric"]
        seeds = len(task_rows[0]["seeds"])
        lines += [f"## {task}: {_split(task_rows)} {metric}, best first, references last"
                  + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""), "",
                  *task_table(task_rows), "", *_prior_lines(task, run, metric), *_retrieval_lines(task_rows)]
    return "\n".join(lines).rstrip() + "\n"


def print_results(rows: Sequence[dict[str, Any]], run: dict[str, Any],
                  echo: Callable[[str], None] = print) -> None:
    """Print :func:`results_tables` on lines of their own (after any progress bar's last line)."""
    sys.stderr.flush()  # progress bars write to stderr: their last line ends before the tables start
    echo("")
    echo(results_tables(rows, run).rstrip("\n"))


def _groups(rows: Sequence[dict[str, Any]], breakdown: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for name in mean_and_std(row["metrics"].get(breakdown, {}))[0]:
            names[name] = None
    return sorted(names)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------
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
    return ["#9e9e9e" if _is_reference(r) else "#3b75af" for r in rows]


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
    scores = [_score(r) for r in rows]
    errors = [_score_std(r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 1.5), 4.4), dpi=DPI)
    ax.bar(range(len(rows)), scores, yerr=_error_bars(scores, errors, metric in PERCENT), capsize=4,
           color=_colors(rows), error_kw={"lw": 1.0})
    ax.set_xticks(range(len(rows)), [_label(r).replace(" (reference)", "\n(reference)") for r in rows],
                  rotation=30, ha="right")
    seeds = len(rows[0]["seeds"])
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{task}: {_split(rows)} {metric}" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""))
    for i, (score, error) in enumerate(zip(scores, errors)):
        ax.annotate(_number(score, metric), (i, score + error), ha="center", va="bottom", fontsize=8,
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
        ys = [_score(row) for row in task_rows]
        errors = [_score_std(row) for row in task_rows]
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
        labelled.append((ax, xs, ys, [r["fusion"] + (" (ref.)" if _is_reference(r) else "") for r in task_rows],
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
        names.append(row["fusion"] + (" (ref.)" if _is_reference(row) else ""))
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
    panels = [(b, _groups(rows, b)) for b in BREAKDOWNS]
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
                                  hatch="//" if _is_reference(row) else None))
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
    labels = [_label(r) for r in rows]
    if majority:
        handles.append(Line2D([], [], **PRIOR_STYLES["majority"]))
        labels.append(f"always \"{majority['answer']}\" (majority prior)")
    reserve = _legend_below(fig, handles, labels, ncol=min(5, max(3, math.ceil(len(labels) / 2))))
    fig.tight_layout(rect=(0, reserve, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def is_report_file(name: str) -> bool:
    """Whether ``name`` is a plain file name that a report writes (:data:`REPORT_FILES`)."""
    return (name == os.path.basename(name) and name not in ("", ".", "..")
            and any(fnmatch.fnmatchcase(name, pattern) for pattern in REPORT_FILES))


def previous_report_files(out: Path) -> list[str]:
    """The files that the report already in ``out`` wrote, as its ``run.json`` lists them ([] when none)."""
    try:
        run = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return []
    files = run.get("files") if isinstance(run, dict) else None
    if not isinstance(files, list):
        return []
    return [name for name in files if isinstance(name, str) and is_report_file(name)]


def write_report(out: Path, rows: Sequence[dict[str, Any]], run: dict[str, Any],
                 captions: dict[str, Any] | None = None,
                 scores: dict[tuple[str, str], dict[str, dict[str, Any]]] | None = None,
                 answers: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> list[Path]:
    """Write every report file to ``out``, replacing the previous report there; returns their paths.

    ``scores``: retrieval score arrays, ``(task, row) -> seed -> arrays`` (``i2t``, ``t2i``,
    ``image_ids``, ``caption_ids`` and extras), each written to ``scores_<task>_<row>_seed<seed>.npz``.
    ``answers``: VQA results, ``(task, fusion) -> [{"question_id", "answer"}]``, each written to
    ``vqa_results_<task>_<fusion>.json``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        names = _write_files(staging, rows, run, captions, scores, answers)
        for name in previous_report_files(out):
            if name not in names:
                (out / name).unlink(missing_ok=True)
        for name in names:  # run.json last: a folder with a new run.json holds a whole new report
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names]


def _write_files(folder: Path, rows: Sequence[dict[str, Any]], run: dict[str, Any],
                 captions: dict[str, Any] | None,
                 scores: dict[tuple[str, str], dict[str, dict[str, Any]]] | None = None,
                 answers: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> list[str]:
    """Write the report into ``folder``; returns the file names, ``run.json`` last."""
    write_json_atomic(folder / "results.json", list(rows))
    (folder / "results.md").write_text(markdown(rows, run))
    names = ["results.json", "results.md"]
    if captions:
        write_json_atomic(folder / "captions.json", captions)
        names.append("captions.json")
    for (task, row), per_seed in (scores or {}).items():
        from ..tasks.retrieval_eval import save_scores

        for seed, arrays in per_seed.items():
            name = f"scores_{task}_{row}_seed{seed}.npz"
            extra = {k: v for k, v in arrays.items() if k not in ("i2t", "t2i", "image_ids", "caption_ids")}
            save_scores(folder / name, arrays["i2t"], arrays["t2i"], arrays["image_ids"], arrays["caption_ids"],
                        extra=extra)
            names.append(name)
    for (task, fusion), results in (answers or {}).items():
        name = f"vqa_results_{task}_{fusion}.json"
        (folder / name).write_text(json.dumps(results, separators=(",", ":")))  # 214k entries for val2014
        names.append(name)
    tasks = [t for t in run["tasks"] if any(r["task"] == t for r in rows)]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["config"]["headline_metric"]
        plot_scores(task_rows, task, folder / f"score_{task}.png", plot_priors(task, run, metric))
        names.append(f"score_{task}.png")
        if plot_breakdowns(task_rows, task, folder / f"per_type_{task}.png", run.get("majority_prior", {}).get(task)):
            names.append(f"per_type_{task}.png")
        if task_rows[0]["config"]["model_task"] == "retrieval":
            plot_retrieval_cost(task_rows, task, folder / f"score_vs_seconds_{task}.png")
            names.append(f"score_vs_seconds_{task}.png")
    if tasks:
        plot_scatter(rows, tasks, "params_trainable", "trainable parameters", folder / "score_vs_params.png", run)
        through = "encoder tails, fusion + head" if run.get("config", {}).get("train_encoders") else "fusion + head"
        plot_scatter(rows, tasks, "eval_samples_per_second", f"test samples / s ({through})",
                     folder / "score_vs_throughput.png", run)
        names += ["score_vs_params.png", "score_vs_throughput.png"]
    names.append("run.json")
    write_json_atomic(folder / "run.json", {**run, **run_metadata(run.get("config", {})), "files": names})
    return names
