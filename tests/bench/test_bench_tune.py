"""``--tune`` (settings chosen on validation, test scored once) and ``--vision-weights random``."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from fusionzoo.bench.settings import TASK_SETTINGS
from fusionzoo.bench.suites import BenchError
from fusionzoo.bench.tune import apply_trial, best_trial, grid_for, grid_trials, parse_grid, tune_record
from fusionzoo.cli import main


def test_parse_grid_reads_values_and_names_what_is_wrong() -> None:
    assert parse_grid("epochs=2,6 lr=1e-3,2e-3") == {"epochs": [2.0, 6.0], "lr": [0.001, 0.002]}
    assert parse_grid("batch_size=64,128;warmup_ratio=0,0.1") == {"batch_size": [64, 128], "warmup_ratio": [0.0, 0.1]}
    assert parse_grid("lr=1e-3,1e-3") == {"lr": [0.001]}  # a repeated value is one trial
    for text, message in [("", "empty"), ("epochs", "not key=v1,v2"), ("depth=2", "unknown setting 'depth'"),
                          ("lr=fast", "'fast' is not a number"), ("batch_size=6.5", "not an integer"),
                          ("epochs=0", "must be > 0"), ("lr=1e-3 lr=2e-3", "given twice"),
                          ("warmup=0.1", "now called .warmup_ratio.")]:
        with pytest.raises(BenchError, match=message):
            parse_grid(text)


def test_trials_choice_and_record() -> None:
    grid = {"epochs": [2, 6], "lr": [1e-3, 2e-3]}
    trials = grid_trials(grid)
    assert trials == [{"epochs": 2, "lr": 1e-3}, {"epochs": 2, "lr": 2e-3}, {"epochs": 6, "lr": 1e-3},
                      {"epochs": 6, "lr": 2e-3}]
    assert best_trial([50.0, 70.0, 70.0, 60.0]) == 1  # the first of a tie (the cheaper one)
    assert best_trial([math.nan, 10.0]) == 1 and best_trial([math.nan, math.nan]) == 0
    # within 0.5% of the best counts as the best: the first such trial in grid order
    assert best_trial([99.3, 99.7, 99.6]) == 0 and best_trial([99.1, 99.7, 99.6]) == 1
    assert best_trial([99.3, 99.7], tolerance=0.0) == 1
    record = tune_record(grid, trials, [50.0, 70.0, 71.5, 60.0], seed=3)
    assert record["chosen"] == {"epochs": 6, "lr": 1e-3} and record["val_score"] == 71.5 and record["seed"] == 3
    assert record["best_score"] == 71.5
    close = tune_record(grid, trials, [50.0, 71.3, 71.5, 60.0], seed=0)  # 71.3 is within 0.5% of 71.5
    assert close["chosen"] == {"epochs": 2, "lr": 2e-3} and close["val_score"] == 71.3 and close["best_score"] == 71.5
    assert [t["score"] for t in record["trials"]] == [50.0, 70.0, 71.5, 60.0]
    base = TASK_SETTINGS["easy-vqa"]
    assert apply_trial(base, {"epochs": 6, "lr": 2e-3}) == replace(base, epochs=6, lr=2e-3)
    assert apply_trial(base, {"epochs": 6}, max_epochs=2).epochs == 2
    assert grid_for("flickr30k-retrieval", base) == grid_for("coco-retrieval", base)
    fallback = grid_for("some-new-task", replace(base, epochs=4, lr=1e-3))
    assert fallback == {"epochs": [2.0, 4], "lr": [5e-4, 2e-3]}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated Sort-of-CLEVR set for the module's bench runs (the same default parameters)."""
    return tmp_path_factory.mktemp("scenes")


def _results(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow
def test_tune_scores_validation_then_test_as_separate_runs_do(tmp_path: Path, scenes: Path, tasks_loaded_once,
                                                              capsys) -> None:
    common = ["bench", "--suite", "sort-of-clevr", "--quick", "--no-progress", "--jobs", "1",
              "--data-dir", str(scenes), "--cache-dir", str(tmp_path / "cache"),
              "--vision", "tiny", "--text", "tiny", "--fusions", "early_concat,text_only"]
    # A grid of two epoch counts: each row's trials are validation runs, its row a test run.
    assert main([*common, "--out", str(tmp_path / "tuned"), "--tune-grid", "epochs=1,2"]) == 0
    printed = capsys.readouterr().out
    assert "--tune: 4 trials (2 rows x their task's grid) on the validation split" in printed
    tuned = _results(tmp_path / "tuned")
    for epochs in (1, 2):
        assert main([*common, "--out", str(tmp_path / f"val{epochs}"), "--eval-split", "val",
                     "--epochs", str(epochs)]) == 0
        assert main([*common, "--out", str(tmp_path / f"test{epochs}"), "--epochs", str(epochs)]) == 0
    capsys.readouterr()
    val = {e: {r["fusion"]: r["metrics"]["accuracy"] for r in _results(tmp_path / f"val{e}")} for e in (1, 2)}
    test = {e: {r["fusion"]: r["metrics"]["accuracy"] for r in _results(tmp_path / f"test{e}")} for e in (1, 2)}
    for row in tuned:
        fusion, record = row["fusion"], row["tune"]
        assert [t["epochs"] for t in record["trials"]] == [1.0, 2.0]
        assert [t["score"] for t in record["trials"]] == pytest.approx([val[1][fusion], val[2][fusion]])
        chosen = 2 if val[2][fusion] > val[1][fusion] + 0.005 * abs(max(val[1][fusion], val[2][fusion])) else 1
        assert record["chosen"] == {"epochs": chosen} and row["config"]["epochs"] == chosen
        assert record["val_score"] == pytest.approx(val[chosen][fusion])
        assert row["metrics"]["accuracy"] == pytest.approx(test[chosen][fusion])
        assert row["config"]["eval_split"] == "test"
    markdown = (tmp_path / "tuned" / "results.md").read_text()
    assert "| val accuracy (--tune) |" in markdown and "settings chosen by --tune on the validation split" in markdown
    assert "epochs {1, 2}: 2 trials, seed 0" in markdown


def test_tune_options_fail_clearly(tmp_path: Path, capsys) -> None:
    common = ["bench", "--suite", "easy-vqa", "--quick", "--out", str(tmp_path / "out")]
    assert main([*common, "--tune", "--eval-split", "val"]) == 2
    assert "--tune scores the validation split itself" in capsys.readouterr().err
    assert main([*common, "--tune", "--epochs", "2"]) == 2
    assert "--epochs fixes what the --tune grid chooses" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--tune-grid", "depth=2"])
    assert "argument --tune-grid: unknown setting 'depth'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_timm_model_with_random_weights_runs_the_bench(tmp_path: Path, scenes: Path, capsys) -> None:
    """A timm name offline: ``--vision-weights random`` builds it (under seed 0) and the bench runs end to end."""
    args = ["bench", "--suite", "sort-of-clevr", "--quick", "--no-progress", "--jobs", "1",
            "--data-dir", str(scenes), "--cache-dir", str(tmp_path / "cache"),
            "--vision", "test_vit", "--vision-weights", "random", "--text", "tiny",
            "--fusions", "co_attention,image_only", "--epochs", "1", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    capsys.readouterr()
    rows = _results(tmp_path / "a")
    assert [r["fusion"] for r in rows] == ["co_attention", "image_only"]
    assert all(r["config"]["vision"] == "test_vit" and 0 <= r["metrics"]["accuracy"] <= 100 for r in rows)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["config"]["vision_weights"] == "random"
    # test_vit's stage-2 map at 128 px is 8x8 (patch 16), pooled to the suite's 4x4
    assert run["features"]["image_stage"] == 2 and run["features"]["image_tokens"][0] == 16
    assert "- encoders (frozen): test_vit (random weights) at 128 px" in (tmp_path / "a" / "results.md").read_text()
