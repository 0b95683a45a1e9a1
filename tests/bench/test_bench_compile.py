"""``fusionzoo bench --compile``: every row's training steps are asked to compile, and the report says so."""

from __future__ import annotations

import json
from pathlib import Path

from fusionzoo.bench import row as bench_row
from fusionzoo.cli import main

RUN = ["bench", "--suite", "easy-vqa", "--quick", "--vision", "tiny", "--text", "tiny", "--image-grid", "0",
       "--fusions", "early_concat,text_only", "--epochs", "0.2", "--no-progress", "--jobs", "1", "--seeds", "2"]


def test_compile_reaches_every_rows_training_and_the_report(tmp_path: Path, monkeypatch) -> None:
    asked: list[bool] = []
    real_train = bench_row.train_model

    def train_model(model, view, **kwargs):
        asked.append(kwargs["compile"])
        stats = real_train(model, view, **{**kwargs, "compile": False})  # compiling itself: tests/training
        stats.compile_seconds = 1.5 + len(asked)  # seeds' compile seconds, averaged in the row
        return stats

    monkeypatch.setattr(bench_row, "train_model", train_model)
    assert main([*RUN, "--compile", "--out", str(tmp_path / "on"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert asked == [True] * 4  # 2 rows x 2 seeds
    rows = json.loads((tmp_path / "on" / "results.json").read_text())
    assert all(row["config"]["compile"] is True for row in rows)
    assert [row["metrics"]["compile_seconds"] for row in rows] == [3.0, 5.0]  # (2.5 + 3.5) / 2, (4.5 + 5.5) / 2
    assert all("compile_seconds" not in entry for row in rows for entry in row["metrics"]["per_seed"])

    asked.clear()
    assert main([*RUN, "--out", str(tmp_path / "off"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert asked == [False] * 4
    rows = json.loads((tmp_path / "off" / "results.json").read_text())
    assert all(row["config"]["compile"] is False and "compile_seconds" not in row["metrics"] for row in rows)
