"""The benchmark report: ``results.json``, ``results.md``, ``run.json``, ``captions.json`` and PNG plots.

Files written to the output folder:

* ``results.json`` -- a list with one object per task x fusion, with exactly the
  keys ``task``, ``fusion``, ``metrics``, ``params_trainable``, ``params_total``,
  ``train_seconds``, ``eval_samples_per_second``, ``peak_memory_mb``, ``seeds``,
  ``config``;
* ``results.md`` -- the tables a person reads first: one per task, best first,
  references last, then the per-type breakdowns;
* ``run.json`` -- the run: machine, wall time, feature-cache hits and misses,
  package versions, git commit, the command's options;
* ``captions.json`` -- the generated test captions (captioning tasks);
* plots (matplotlib, Agg backend): ``score_<task>.png`` (bars, error bars over
  seeds), ``score_vs_params.png``, ``score_vs_throughput.png``,
  ``per_type_<task>.png`` (VQA per answer and question type, classification per label).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..training.checkpoint import run_metadata, write_json_atomic

#: Breakdown metrics plotted per type, in order of preference.
BREAKDOWNS = ("per_question_type", "per_answer_type", "per_label")
#: Extra metric columns shown in results.md per model task.
COLUMNS = {
    "vqa": ("accuracy",),
    "classification": ("accuracy", "macro_f1", "roc_auc"),
    "captioning": ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"),
}


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------
def _is_reference(row: dict[str, Any]) -> bool:
    return bool(row["config"].get("reference"))


def _label(row: dict[str, Any]) -> str:
    return f"{row['fusion']} (reference)" if _is_reference(row) else row["fusion"]


def _score(row: dict[str, Any]) -> float:
    return float(row["metrics"].get(row["config"]["headline_metric"], float("nan")))


def ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fusions best first, then the references."""
    return sorted(rows, key=lambda r: (_is_reference(r), -_score(r) if not math.isnan(_score(r)) else 0.0))


def _number(value: float, metric: str) -> str:
    if metric in ("accuracy", "macro_f1") or metric.startswith("per_"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def _with_std(metrics: dict[str, Any], name: str) -> str:
    if name not in metrics:
        return "-"
    text = _number(metrics[name], name)
    if f"{name}_std" in metrics:
        text += f" ± {_number(metrics[f'{name}_std'], name)}"
    return text


def _count(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


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
# results.md
# --------------------------------------------------------------------------------------
def markdown(rows: Sequence[dict[str, Any]], run: dict[str, Any]) -> str:
    """The Markdown report: run line, one table per task, per-type tables, example captions."""
    machine = run["machine"]
    cache = run["cache"]
    cache_text = ("off" if not cache["enabled"] else
                  f"{cache['hits']} hits, {cache['misses']} misses ({cache['extraction_seconds']:.0f}s extracting)")
    features = run["features"]
    lines = [
        f"# fusionzoo bench: {run['suite']} suite{' (--quick)' if run['quick'] else ''}",
        "",
        f"- machine: {machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads), "
        f"device {machine['device']}{', ' + machine['gpu'] if 'gpu' in machine else ''}; precision "
        f"{run['precision']}",
        f"- wall time: {_duration(run['wall_seconds'])} (feature cache: {cache_text})",
        f"- encoders (frozen): efficientnet-lite0 at {features['image_size']} px "
        f"({features['image_tokens'][0]} tokens of {features['image_tokens'][1]}) + minilm-l6; "
        f"{features['images']:,} images, {features.get('texts', 0):,} distinct texts"
        + (f", {features['captions']:,} distinct captions" if features.get("captions") else "")
        + " encoded once",
        f"- seeds: {', '.join(map(str, run['seeds']))} (± = standard deviation over seeds)",
        "- throughput: test samples per second through fusion + head on cached features (encoders excluded); "
        "peak memory: extra resident memory while training and scoring the row",
        "",
    ]
    for task in run["tasks"]:
        task_rows = ordered([r for r in rows if r["task"] == task])
        if not task_rows:
            continue
        first = task_rows[0]
        columns = COLUMNS[first["config"]["model_task"]]
        schedule = lambda r: (f"{r['config']['epochs']:g} x {r['config']['batch_size']}, "  # noqa: E731
                              f"lr {r['config']['lr']:g}, dim {r['config']['fusion_kwargs'].get('dim', '-')}")
        varies = len({schedule(r) for r in task_rows}) > 1
        lines += [f"## {task}", "", run["task_descriptions"].get(task, ""), "",
                  f"trained on {first['config']['train_samples']:,} samples"
                  + ("" if varies else f" for {first['config']['epochs']:g} epochs (batch "
                     f"{first['config']['batch_size']}, lr {first['config']['lr']:g})")
                  + f", scored on {first['config']['test_samples']:,} test samples"
                  + ("; each fusion's epochs x batch, learning rate and width in the table" if varies else ""), ""]
        prior = run.get("question_prior", {}).get(task)
        if prior and prior["seen_in_train"]:
            lines += [f"question prior: {prior['seen_in_train']:,} of {prior['test_questions']:,} test questions "
                      f"({100 * prior['seen_in_train'] / prior['test_questions']:.0f}%) are asked in the train split "
                      f"too; answering them with the train split's commonest answer to the same question scores "
                      f"{prior['train_answer_accuracy']:.1f}% (the ceiling of memorising questions)", ""]
        header = ["fusion", *columns, "trainable params", "train s", "eval samples/s", "peak MB"]
        if varies:
            header.append("epochs x batch, lr, dim")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in task_rows:
            cells = [_label(row), *[_with_std(row["metrics"], c) for c in columns], _count(row["params_trainable"]),
                     f"{row['train_seconds']:.1f}", f"{row['eval_samples_per_second']:,.0f}",
                     f"{row['peak_memory_mb']:.0f}"]
            if varies:
                cells.append(schedule(row))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for breakdown in BREAKDOWNS:
            groups = _groups(task_rows, breakdown)
            if len(groups) < 2 and breakdown != "per_label":
                continue
            if not groups:
                continue
            title = breakdown.replace("per_", "").replace("_", " ")
            lines += [f"accuracy per {title} (%):", "", "| fusion | " + " | ".join(groups) + " |",
                      "|" + "---|" * (len(groups) + 1)]
            for row in task_rows:
                values = row["metrics"].get(breakdown, {})
                lines.append(f"| {_label(row)} | " + " | ".join(
                    f"{values[g]:.1f}" if g in values else "-" for g in groups) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _groups(rows: Sequence[dict[str, Any]], breakdown: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for name in row["metrics"].get(breakdown, {}):
            names[name] = None
    return sorted(names)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------
def _colors(rows: Sequence[dict[str, Any]]) -> list[str]:
    return ["#9e9e9e" if _is_reference(r) else "#3b75af" for r in rows]


def plot_scores(rows: Sequence[dict[str, Any]], task: str, path: Path) -> None:
    """Headline score per fusion (bars), with the seed standard deviation as error bars."""
    import matplotlib.pyplot as plt

    rows = ordered(rows)
    metric = rows[0]["config"]["headline_metric"]
    scores = [_score(r) for r in rows]
    errors = [r["metrics"].get(f"{metric}_std", 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 1.5), 4.0))
    ax.bar(range(len(rows)), scores, yerr=errors if any(errors) else None, capsize=4, color=_colors(rows))
    ax.set_xticks(range(len(rows)), [_label(r).replace(" (reference)", "\n(reference)") for r in rows],
                  rotation=30, ha="right")
    ax.set_ylabel(metric)
    seeds = len(rows[0]["seeds"])
    ax.set_title(f"{task}: test {metric}" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""))
    for i, score in enumerate(scores):
        ax.annotate(_number(score, metric), (i, score), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    low = min(scores)
    if metric == "accuracy" and low > 50:  # zoom in where the fusions differ
        ax.set_ylim(max(0.0, low - 5), 100.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(rows: Sequence[dict[str, Any]], tasks: Sequence[str], key: str, xlabel: str, path: Path) -> None:
    """Headline score against ``key`` (trainable parameters, throughput), one panel per task, log x."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        metric = task_rows[0]["config"]["headline_metric"]
        for row, color in zip(task_rows, _colors(task_rows)):
            x = max(float(row[key]), 1e-9)
            ax.scatter(x, _score(row), color=color, s=40, zorder=3)
            ax.annotate(row["fusion"], (x, _score(row)), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_breakdowns(rows: Sequence[dict[str, Any]], task: str, path: Path) -> bool:
    """Grouped bars of accuracy per type (question type, answer type, label); False when there is none."""
    import matplotlib.pyplot as plt

    rows = ordered(rows)
    panels = [(b, _groups(rows, b)) for b in BREAKDOWNS]
    panels = [(b, g) for b, g in panels if g and (len(g) > 1 or b == "per_answer_type")]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.1 * max(len(g) for _, g in panels) * 1.6), 3.6 *
                                                       len(panels)), squeeze=False)
    width = 0.8 / len(rows)
    cmap = plt.get_cmap("tab10")
    for ax, (breakdown, groups) in zip(axes[:, 0], panels):
        for k, row in enumerate(rows):
            values = [row["metrics"].get(breakdown, {}).get(g, 0.0) for g in groups]
            positions = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(positions, values, width, label=_label(row), color=cmap(k % 10),
                   hatch="//" if _is_reference(row) else None)
        ax.set_xticks(range(len(groups)), groups, rotation=15)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{task}: accuracy per {breakdown.replace('per_', '').replace('_', ' ')}")
        ax.set_ylim(0, 105)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def write_report(out: Path, rows: Sequence[dict[str, Any]], run: dict[str, Any],
                 captions: dict[str, Any] | None = None) -> list[Path]:
    """Write every report file to ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    write_json_atomic(out / "results.json", list(rows))
    written.append(out / "results.json")
    (out / "results.md").write_text(markdown(rows, run))
    written.append(out / "results.md")
    if captions:
        write_json_atomic(out / "captions.json", captions)
        written.append(out / "captions.json")
    tasks = [t for t in run["tasks"] if any(r["task"] == t for r in rows)]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        plot_scores(task_rows, task, out / f"score_{task}.png")
        written.append(out / f"score_{task}.png")
        if plot_breakdowns(task_rows, task, out / f"per_type_{task}.png"):
            written.append(out / f"per_type_{task}.png")
    if tasks:
        plot_scatter(rows, tasks, "params_trainable", "trainable parameters", out / "score_vs_params.png")
        plot_scatter(rows, tasks, "eval_samples_per_second", "test samples / s (fusion + head)",
                     out / "score_vs_throughput.png")
        written += [out / "score_vs_params.png", out / "score_vs_throughput.png"]
    write_json_atomic(out / "run.json", {**run, **run_metadata(run.get("config", {})),
                                         "files": [p.name for p in written]})
    return written
