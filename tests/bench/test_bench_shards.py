"""A run split with ``--shard I/N`` and put back with ``bench merge`` is the run made whole; bad parts are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusionzoo.bench.row import combine_seed_rows
from fusionzoo.bench.shards import PART_FILE, assign_parts, parse_shard, shard_units
from fusionzoo.bench.suites import BenchError
from fusionzoo.cli import main

#: What may differ between a run and its merged parts: how long things took, and where.
TIMING_KEYS = ("train_seconds", "eval_samples_per_second", "peak_memory_mb")
#: The tests' tiny encoders, every token: what is checked is the splitting, not the scores.
TINY = ["--vision", "tiny", "--text", "tiny", "--image-grid", "0"]


def test_parse_shard() -> None:
    assert parse_shard("1/1") == (1, 1) and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("0/2", "3/2", "1/0", "2", "a/b", "1/2/3", "-1/2"):
        with pytest.raises(BenchError, match="--shard"):
            parse_shard(bad)


def test_parts_are_disjoint_complete_and_balanced() -> None:
    costs = [9.0, 1.0, 1.0, 5.0, 4.0, 3.0, 3.0]
    owner = assign_parts(costs, 3)
    loads = [sum(c for c, o in zip(costs, owner) if o == part) for part in range(3)]
    assert sorted(loads) == [8.0, 9.0, 9.0]  # longest first, each to the lightest part: 9 | 5+3+1 | 4+3+1
    assert assign_parts(costs, 3) == owner  # the same cut on every machine
    for tune in (False, True):
        seeds = [0, 1, 2]
        every = [shard_units(costs, seeds, tune, [4] * len(costs), (i, 4)) for i in range(1, 5)]
        flat = [(row, seed) for part in every for row, unit_seeds in part for seed in unit_seeds]
        assert sorted(flat) == [(row, seed) for row in range(len(costs)) for seed in seeds]  # each unit once
        if tune:  # a tuned row stays whole: its trials decide every seed's settings
            assert all(seeds_ == (0, 1, 2) for part in every for _, seeds_ in part)
    assert [len(shard_units(costs, [0], False, [0] * 7, (i, 9))) for i in range(1, 10)] == [1] * 7 + [0, 0]  # empty parts


def _row(seed: int, accuracy: float, loss: float, seconds: float) -> dict:
    return {"task": "t", "fusion": "f", "seeds": [seed], "train_seconds": seconds, "eval_samples_per_second": 10.0,
            "peak_memory_mb": 5.0 + seed, "config": {"lr": 1e-3},
            "metrics": {"accuracy": accuracy, "per_type": {"a": accuracy / 2}, "final_train_loss": loss}}


def test_combine_seed_rows_is_the_mean_and_sample_spread() -> None:
    row = combine_seed_rows([_row(0, 40.0, 1.0, 2.0), _row(1, 50.0, 3.0, 4.0), _row(2, 60.0, 2.0, 6.0)])
    assert row["seeds"] == [0, 1, 2] and row["metrics"]["accuracy"] == pytest.approx(50.0)
    assert row["metrics"]["accuracy_std"] == pytest.approx(10.0)  # sample sd (ddof 1) of 40, 50, 60
    assert row["metrics"]["per_type"] == pytest.approx({"a": 25.0, "a_std": 5.0})
    assert row["metrics"]["final_train_loss"] == pytest.approx(2.0) and row["train_seconds"] == pytest.approx(4.0)
    assert row["peak_memory_mb"] == 7.0
    assert row["metrics"]["per_seed"] == [{"seed": 0, "accuracy": 40.0}, {"seed": 1, "accuracy": 50.0},
                                          {"seed": 2, "accuracy": 60.0}]
    with pytest.raises(ValueError, match="one-seed rows"):
        combine_seed_rows([_row(0, 1.0, 1.0, 1.0), {**_row(1, 1.0, 1.0, 1.0), "fusion": "g"}])


def _comparable(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())
    for row in rows:
        for key in TIMING_KEYS:
            row.pop(key)
    return rows


def _table_scores(out: Path) -> list[str]:
    """The results.md table rows up to the parameter column (the score columns; timings follow)."""
    return [" | ".join(line.split(" | ")[:5]) for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| ")]


def test_two_shards_merged_give_the_report_of_one_run(tmp_path: Path, tasks_loaded_once, capsys) -> None:
    cache = tmp_path / "cache"
    base = ["bench", "--suite", "easy-vqa", "--quick", *TINY, "--no-progress", "--cache-dir", str(cache),
            "--mixed-precision", "no", "--fusions", "early_concat,text_only", "--seeds", "2", "--jobs", "1"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    for i in (1, 2):
        assert main([*base, "--shard", f"{i}/2", "--out", str(tmp_path / f"part{i}")]) == 0
    printed = capsys.readouterr().out
    assert "--shard 1/2: 2 of the run's 4 row x seed units" in printed
    assert not (tmp_path / "part1" / "results.json").exists()  # a part is not a report
    assert main(["bench", "merge", str(tmp_path / "part2"), str(tmp_path / "part1"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "2 parts of one run, 2 rows x 2 seeds" in capsys.readouterr().out
    assert _comparable(tmp_path / "merged") == _comparable(tmp_path / "whole")
    assert _table_scores(tmp_path / "merged") == _table_scores(tmp_path / "whole")
    run = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert [part["shard"] for part in run["shards"]] == ["1/2", "2/2"]
    assert sum(part["units"] for part in run["shards"]) == 4

    def merge_error(*folders: Path) -> str:
        assert main(["bench", "merge", *map(str, folders), "--out", str(tmp_path / "bad")]) == 2
        return capsys.readouterr().err

    assert "part(s) 2/2 are missing" in merge_error(tmp_path / "part1")
    assert "part 1/2 is given twice" in merge_error(tmp_path / "part1", tmp_path / "part1", tmp_path / "part2")
    assert "no shard.json" in merge_error(tmp_path / "whole", tmp_path / "part2")
    # A part of another run (here: its options edited to other epochs): refused, naming where they differ.
    shutil.copytree(tmp_path / "part2", tmp_path / "other")
    part = json.loads((tmp_path / "other" / PART_FILE).read_text())
    part["identity"]["options"]["epochs"] = 1.0
    (tmp_path / "other" / PART_FILE).write_text(json.dumps(part))
    assert "identity.options.epochs (null vs 1.0)" in merge_error(tmp_path / "part1", tmp_path / "other")
    # A part that lost a unit (stopped early, edited): incomplete, naming the row and seed.
    shutil.copytree(tmp_path / "part2", tmp_path / "cut")
    part = json.loads((tmp_path / "cut" / PART_FILE).read_text())
    lost = part["rows"].pop()
    (tmp_path / "cut" / PART_FILE).write_text(json.dumps(part))
    err = merge_error(tmp_path / "part1", tmp_path / "cut")
    assert "incomplete" in err and f"seed {lost['seed']}" in err
    assert not (tmp_path / "bad").exists()  # a refused merge writes nothing


def test_tuned_run_in_shards(tmp_path: Path, tasks_loaded_once, capsys) -> None:
    # --tune: a part holds whole rows, tuned in that part on the validation split.
    base = ["bench", "--suite", "easy-vqa", "--quick", *TINY, "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--mixed-precision", "no", "--fusions", "early_concat,text_only", "--tune-grid", "lr=1e-3,3e-3",
            "--jobs", "1"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    for i in (1, 2):
        assert main([*base, "--shard", f"{i}/2", "--out", str(tmp_path / f"part{i}")]) == 0
    assert main(["bench", "merge", str(tmp_path / "part1"), str(tmp_path / "part2"),
                 "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    merged, whole = _comparable(tmp_path / "merged"), _comparable(tmp_path / "whole")
    assert merged == whole and all("tune" in row for row in merged)
