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
  ``robustness_<task>.png`` (``--robustness``: the score against each corruption's level, one line per fusion),
  ``score_vs_seconds_<task>.png`` (retrieval: r_mean against milliseconds per query, reranked
  and all pairs, :func:`plot_retrieval_cost`);
* ``scores_<task>_<row>_seed<seed>.npz`` -- retrieval: each row's score matrices (``i2t``,
  ``t2i`` as the row ranks, ``image_ids``, ``caption_ids``, ``owner``, and ``itc_*`` / ``all_*``
  for a fusion row), which ``fusionzoo score retrieval`` reads;
* ``vqa_results_<task>_<fusion>.json`` -- a VQA task with official question ids (VQA v2):
  the first seed's answer to every scored question, ``[{"question_id": int, "answer": str}]``,
  the official VQA results format.

The files' contents come from :mod:`~fusionzoo.bench.tables` (``results.md``),
:mod:`~fusionzoo.bench.plots` (the PNGs) and :mod:`~fusionzoo.bench.priors` (the priors drawn
and printed: the *majority prior* of a VQA or classification task and, for VQA, the *question
prior*); this module writes them.

A report replaces the previous one in the same folder: the files are written into a
temporary folder inside ``--out`` and moved into place once all are written, and the
files that the previous report's ``run.json`` lists (and only those, and only names of
:data:`REPORT_FILES`) are removed first, so no plot of an earlier suite stays beside the
new report; nothing else in the folder is touched.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..training.checkpoint import run_metadata, write_json_atomic
from .plots import plot_breakdowns, plot_retrieval_cost, plot_robustness, plot_scatter, plot_scores
from .priors import plot_priors
from .tables import markdown

#: The names a report writes into ``--out`` (shell patterns); a new report removes the previous one's.
REPORT_FILES = ("results.json", "results.md", "run.json", "captions.json", "score_*.png", "per_type_*.png",
                "robustness_*.png", "scores_*.npz", "vqa_results_*.json")


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
        if plot_robustness(task_rows, task, folder / f"robustness_{task}.png"):
            names.append(f"robustness_{task}.png")
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
