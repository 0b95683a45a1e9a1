"""``fusionzoo bench compare``: differences per task x fusion, the seeds' spread, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fusionzoo.bench.compare import compare_runs
from fusionzoo.cli import main


def _row(task: str, fusion: str, metric: str, values: list[float]) -> dict:
    mean = sum(values) / len(values)
    metrics = {metric: mean}
    if len(values) > 1:
        metrics[f"{metric}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"task": task, "fusion": fusion, "metrics": metrics, "seeds": list(range(len(values))),
            "config": {"headline_metric": metric}}


def _run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_compare_reports_differences_and_marks_those_beyond_the_spread(tmp_path: Path, capsys) -> None:
    a = _run(tmp_path / "a", [_row("soc", "albef", "accuracy", [80.0, 82.0]),
                              _row("soc", "co_attention", "accuracy", [70.0, 70.2]),
                              _row("soc", "late_voting", "accuracy", [50.0]),
                              _row("coco-captioning", "albef", "CIDEr", [30.0, 31.0]),
                              _row("soc", "gone", "accuracy", [1.0])])
    b = _run(tmp_path / "b", [_row("soc", "albef", "accuracy", [81.0, 83.0]),  # +1, spread 2: not marked
                              _row("soc", "co_attention", "accuracy", [75.0, 75.2]),  # +5, spread 0.2: marked
                              _row("soc", "late_voting", "accuracy", [60.0, 61.0]),  # A has one seed: no spread
                              _row("coco-captioning", "albef", "CIDEr", [20.0, 21.0]),
                              _row("soc", "new", "accuracy", [2.0])])
    rows, only_a, only_b = compare_runs(a, b)
    by_key = {(r.task, r.fusion): r for r in rows}
    albef = by_key[("soc", "albef")]
    assert albef.difference == 1.0 and albef.spread == math.hypot(math.sqrt(2), math.sqrt(2))
    assert not albef.significant
    co = by_key[("soc", "co_attention")]
    assert abs(co.difference - 5.0) < 1e-9 and co.significant
    assert by_key[("soc", "late_voting")].spread is None and not by_key[("soc", "late_voting")].significant
    assert by_key[("coco-captioning", "albef")].difference == -10.0 and by_key[("coco-captioning", "albef")].significant
    assert only_a == [("soc", "gone")] and only_b == [("soc", "new")]

    assert main(["bench", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "## soc (accuracy)" in out and "## coco-captioning (CIDEr)" in out
    assert "| co_attention | 70.10 | 75.10 | +5.00 * | 0.20 |" in out
    assert "| albef | 81.00 | 82.00 | +1.00 | 2.00 |" in out and "| late_voting | 50.00 | 60.50 | +10.50 |  |" in out
    assert "only in A: soc gone" in out and "only in B: soc new" in out


def test_compare_errors_name_the_file(tmp_path: Path, capsys) -> None:
    good = _run(tmp_path / "good", [_row("soc", "albef", "accuracy", [80.0])])
    assert main(["bench", "compare", str(good), str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing' / 'results.json'}: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('[{"task": "soc",\n oops]')
    assert main(["bench", "compare", str(good), str(broken)]) == 2
    assert "results.json: not valid JSON (line 2" in capsys.readouterr().err
    _run(tmp_path / "rowless", [{"task": "soc", "fusion": "albef", "metrics": {}, "config": {}}])
    assert main(["bench", "compare", str(good), str(tmp_path / "rowless")]) == 2
    assert "row 0 lacks task, fusion, config.headline_metric" in capsys.readouterr().err
