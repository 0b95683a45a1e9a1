"""``results.md`` and what the terminal shows: one table per task, the priors, the per-type breakdowns.

:func:`markdown` is the whole of ``results.md`` (the run line, then per task its description,
priors, ``--tune`` and retrieval notes, :func:`task_table` and the breakdown tables);
:func:`results_tables` / :func:`print_results` are the tables printed at the end of a run, and
:func:`summary_line` the line printed as each task finishes. With several seeds every cell is
"mean ± standard deviation" over the seeds.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from .formatting import (BREAKDOWNS, PERCENT, breakdown_groups, format_number, headline_score, is_reference,
                         mean_and_std, ordered, row_label, scored_split)
from .robustness import CLEAN, CORRUPTIONS, DROPS, trained_on
from .verdicts import best_baseline, difference_cells, verdict_lines

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


def _with_std(metrics: dict[str, Any], name: str) -> str:
    if name not in metrics:
        return "-"
    text = format_number(metrics[name], name)
    if f"{name}_std" in metrics:
        text += f" ± {format_number(metrics[f'{name}_std'], name)}"
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
        name = row["fusion"] + ("*" if is_reference(row) else "")
        parts.append(f"{name} {format_number(headline_score(row), task.metric)}")
    return f"{task.name} ({task.metric}; * = reference): " + " | ".join(parts) + f"  [{_duration(seconds)}]"


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
                  f"\"{majority['answer']}\", scores {format_number(majority['metrics'][metric], metric)}"
                  f"{'%' if metric in PERCENT else ''} {metric} (the chance line of the plots)", ""]
    return lines


def _retrieval_lines(task_rows: Sequence[dict[str, Any]]) -> list[str]:
    """What a retrieval table's columns mean (no lines for other tasks)."""
    if not task_rows or task_rows[0]["config"]["model_task"] != "retrieval":
        return []
    ks = sorted({int(r["metrics"]["rerank_k"]) for r in task_rows if r["metrics"].get("rerank_k")})
    k = "/".join(map(str, ks)) or "k"
    weights = sorted({float(r["config"].get("rerank_itc_weight", 0.0)) for r in task_rows if not is_reference(r)})
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


def task_table(task_rows: Sequence[dict[str, Any]], majority: dict[str, Any] | None = None) -> list[str]:
    """The Markdown table of one task's rows (best first, references last, then the majority prior);
    "mean ± sd" with several seeds; each fusion's difference from the best baseline and from the next
    fusion, ``*`` where larger than the seeds' spread (:mod:`~fusionzoo.bench.verdicts`)."""
    task_rows = ordered(task_rows)
    differences = difference_cells(task_rows, best_baseline(task_rows, majority))
    columns = COLUMNS[task_rows[0]["config"]["model_task"]]
    varies = len({_schedule(r) for r in task_rows}) > 1
    metric = task_rows[0]["config"]["headline_metric"]
    tuned = any("tune" in r for r in task_rows)
    header = ["fusion", *[HEADERS.get(c, c) for c in columns], "vs baseline", "vs next",
              *([f"val {HEADERS.get(metric, metric)} (--tune)"] if tuned else []), "trainable params", "train s",
              "eval queries/s" if task_rows[0]["config"]["model_task"] == "retrieval" else "eval samples/s",
              "peak MB"]
    if varies:
        header.append("epochs x batch, lr, dim" + (", itm weight" if "itm_weight" in task_rows[0]["config"] else ""))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, (vs_base, vs_next) in zip(task_rows, differences):
        val = [format_number(row["tune"]["val_score"], metric) if "tune" in row else "-"] if tuned else []
        cells = [row_label(row), *[_with_std(row["metrics"], c) for c in columns], vs_base, vs_next, *val,
                 _count(row["params_trainable"]), f"{row['train_seconds']:.1f}",
                 f"{row['eval_samples_per_second']:,.0f}", f"{row['peak_memory_mb']:.0f}"]
        if varies:
            cells.append(_schedule(row))
        lines.append("| " + " | ".join(cells) + " |")
    if majority and metric in majority.get("metrics", {}):
        cells = [f"always \"{majority['answer']}\" (majority prior)",
                 *[_with_std(majority["metrics"], c) for c in columns], "-", "-"]
        lines.append("| " + " | ".join(cells + ["-"] * (len(header) - len(cells))) + " |")
    return lines


def _breakdown_tables(task_rows: Sequence[dict[str, Any]], majority: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    for breakdown in BREAKDOWNS:
        groups = breakdown_groups(task_rows, breakdown)
        if not groups or (len(groups) < 2 and breakdown != "per_label"):
            continue
        title = breakdown.replace("per_", "").replace("_", " ")
        lines += [f"accuracy per {title} (%):", "", "| fusion | " + " | ".join(groups) + " |",
                  "|" + "---|" * (len(groups) + 1)]
        table_rows = [(row_label(row), row["metrics"].get(breakdown, {})) for row in task_rows]
        if majority and breakdown in majority["metrics"]:
            table_rows.append((f"always \"{majority['answer']}\" (majority prior)", majority["metrics"][breakdown]))
        for label, values in table_rows:
            means, stds = mean_and_std(values)
            cells = [("-" if g not in means else f"{means[g]:.1f}" + (f" ± {stds[g]:.1f}" if g in stds else ""))
                     for g in groups]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def robustness_lines(task_rows: Sequence[dict[str, Any]]) -> list[str]:
    """``--robustness``: the table of each fusion's score on every corruption and its relative drops; [] without."""
    task_rows = [r for r in ordered(task_rows) if r["metrics"].get("robustness")]
    if not task_rows:
        return []
    metric = task_rows[0]["config"]["headline_metric"]
    keys = [CLEAN, *[c.name for c in CORRUPTIONS], *DROPS.values()]
    keys = [k for k in keys if any(k in r["metrics"]["robustness"] for r in task_rows)]
    lines = [f"robustness: {scored_split(task_rows)} {metric} on corrupted inputs, without retraining "
             f"({trained_on(task_rows)}); a drop is the mean over the family's corruptions of "
             "100 (clean - corrupted) / clean:", "",
             "| fusion | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in task_rows:
        means, stds = mean_and_std(row["metrics"]["robustness"])
        cells = [("-" if k not in means else f"{means[k]:.1f}" + (f" ± {stds[k]:.1f}" if k in stds else ""))
                 for k in keys]
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _precision_lines(rows: Sequence[dict[str, Any]], run: dict[str, Any]) -> list[str]:
    """A line naming the fusions that trained in another precision than the run's, and why."""
    from ..training.step import BF16_UNSAFE

    other = sorted({r["fusion"] for r in rows if r["config"].get("precision", run["precision"]) != run["precision"]})
    if not other:
        return []
    why = "; ".join(BF16_UNSAFE[f] for f in other if f in BF16_UNSAFE)
    return [f"- {', '.join(other)} trained in float32, not {run['precision']}: `--mixed-precision auto` keeps "
            f"{'it' if len(other) == 1 else 'them'} out of bf16 ({why}; `--mixed-precision bf16` forces it)"]


def markdown(rows: Sequence[dict[str, Any]], run: dict[str, Any]) -> str:
    """The Markdown report: run line, one table per task, per-type tables, example captions."""
    machine = run["machine"]
    cache = run["cache"]
    cache_text = ("off" if not cache["enabled"] else
                  f"{cache['hits']} hits, {cache['misses']} misses ({cache['extraction_seconds']:.0f}s extracting)")
    features = run["features"]
    trained = run.get("config", {}).get("train_encoders") or 0  # --train-encoders N
    lora = run.get("config", {}).get("encoder_lora") or 0  # --train-encoders lora:N
    encoders = f"last {trained} block{'s' if trained > 1 else ''} trained" if trained else "frozen"
    if trained and lora:
        encoders = f"last {trained} block{'s' if trained > 1 else ''} through LoRA adapters of rank {lora}"
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
        *_precision_lines(rows, run),
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
                     f", scored on {first['config']['test_samples']:,} {scored_split(task_rows)} samples")
                  + ("; each fusion's epochs x batch, learning rate and width in the table" if varies else ""), ""]
        lines += _prior_lines(task, run, first["config"]["headline_metric"])
        lines += _tune_lines(task_rows)
        lines += _retrieval_lines(task_rows)
        majority = run.get("majority_prior", {}).get(task)
        lines += [*task_table(task_rows, majority), ""]
        lines += verdict_lines(task_rows, best_baseline(task_rows, majority))
        lines += _breakdown_tables(task_rows, majority)
        lines += robustness_lines(task_rows)
    return "\n".join(lines).rstrip() + "\n"


def results_tables(rows: Sequence[dict[str, Any]], run: dict[str, Any]) -> str:
    """Each task's table of results.md with its prior lines: what the terminal shows at the end of a run."""
    lines: list[str] = []
    for task in run["tasks"]:
        task_rows = ordered([r for r in rows if r["task"] == task])
        if not task_rows:
            continue
        metric = task_rows[0]["config"]["headline_metric"]
        majority = run.get("majority_prior", {}).get(task)
        seeds = len(task_rows[0]["seeds"])
        lines += [f"## {task}: {scored_split(task_rows)} {metric}, best first, references last"
                  + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""), "",
                  *task_table(task_rows, majority), "",
                  *verdict_lines(task_rows, best_baseline(task_rows, majority)), *_prior_lines(task, run, metric),
                  *_retrieval_lines(task_rows)]
        robustness = robustness_lines(task_rows)
        lines += ([""] if lines[-1] else []) + robustness if robustness else []
    return "\n".join(lines).rstrip() + "\n"


def print_results(rows: Sequence[dict[str, Any]], run: dict[str, Any],
                  echo: Callable[[str], None] = print) -> None:
    """Print :func:`results_tables` on lines of their own (after any progress bar's last line)."""
    sys.stderr.flush()  # progress bars write to stderr: their last line ends before the tables start
    echo("")
    echo(results_tables(rows, run).rstrip("\n"))
