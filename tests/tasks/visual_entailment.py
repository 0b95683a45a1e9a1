"""SNLI-VE-style visual entailment as a fusionzoo task, defined outside the package.

Use it with ``fusionzoo --import visual_entailment.py train task=snli-ve data=DIR ...``.
DIR holds ``train.jsonl`` / ``test.jsonl`` (any split names) with one pair a line, in the
layout of SNLI-VE (Xie et al. 2019): ``{"pair_id": ..., "image": "relative/path.jpg",
"hypothesis": "...", "gold_label": "entailment" | "neutral" | "contradiction"}``.
The task reuses the classification head; it brings its own reader and adds per-class accuracy.
"""

from __future__ import annotations

from pathlib import Path

import fusionzoo
from fusionzoo.tasks import ClassificationTask
from fusionzoo.data.classification import FEATURES, ClassificationData
from fusionzoo.data.checks import DataError, ProblemLog, iter_jsonl, jsonl_entry, require
from fusionzoo.data.common import keep_present, rows_to_dataset, safe_join, split_from_stem

LABELS = ["entailment", "neutral", "contradiction"]


def read_entailment(root: Path, skip_bad: bool = False) -> ClassificationData:
    """Every ``*.jsonl`` of ``root`` as a split; errors name the file, the line and what was expected."""
    splits, reports = {}, {}
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise DataError("no *.jsonl files", file=root, expected="train.jsonl, test.jsonl, ...")
    for path in files:
        split, log, rows = split_from_stem(path.stem), ProblemLog(split_from_stem(path.stem), skip_bad), []
        for lineno, record in iter_jsonl(path, log):
            try:
                label = require(record, "gold_label", str, file=path, entry=jsonl_entry(lineno))
                if label not in LABELS:
                    raise DataError(f"gold_label {label!r}", file=path, entry=jsonl_entry(lineno),
                                    expected=f"one of {', '.join(LABELS)}")
                rows.append({
                    "id": str(require(record, "pair_id", (str, int), file=path, entry=jsonl_entry(lineno))),
                    "image_path": safe_join(root, require(record, "image", str, file=path, entry=jsonl_entry(lineno)),
                                            file=path, entry=jsonl_entry(lineno)),
                    "text": require(record, "hypothesis", str, file=path, entry=jsonl_entry(lineno)),
                    "label": LABELS.index(label),
                    "line": lineno,
                })
            except DataError as error:
                log.bad(error)
        rows = keep_present(rows, log, source=path, only_present=False, describe=lambda r: jsonl_entry(r["line"]))
        reports[split] = log.finish(len(rows), path)
        splits[split] = rows_to_dataset(rows, FEATURES)
    return ClassificationData(name="snli-ve-jsonl", splits=splits, image_root=root, metric="accuracy",
                              reports=reports, label_names=list(LABELS))


@fusionzoo.register_task("snli-ve")
class VisualEntailment(ClassificationTask):
    """Does the image entail the hypothesis, contradict it, or neither?"""

    description = "3-way image-text entailment (SNLI-VE style): entailment, neutral, contradiction"

    def load_data(self, config):
        return read_entailment(Path(config.data_dir or config.data), skip_bad=config.skip_bad)

    def metrics(self, gathered):
        metrics = super().metrics(gathered)
        predicted, labels = gathered["logits"].argmax(-1), gathered["labels"]
        for k, name in enumerate(LABELS):
            rows = labels == k
            if rows.any():
                metrics[f"accuracy_{name}"] = 100.0 * (predicted[rows] == k).float().mean().item()
        return metrics
