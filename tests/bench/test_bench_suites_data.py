"""The bench suites on their real data layouts: VQA v2's official files, Flickr30k's Karpathy file, full COCO.

Every fixture is drawn here, in a temporary folder: small JPEGs (a coloured square on grey) and
annotation files that follow each dataset's published schema field for field. The runs use
the random tiny encoders (``--vision tiny --text tiny``), so no pretrained weights are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from fusionzoo.bench.suites import (
    SUITES,
    TASK_LOADERS,
    VALIDATION_FRACTION,
    BenchError,
    held_out_images,
    load_tasks,
)
from fusionzoo.cli import main
from fusionzoo.data.vqa import load_vqa_v2

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245)}
#: A quick run of two rows on the tiny encoders at 64 px (every token: the tiny ViT has a [CLS] token,
#: so its tokens are no square grid to pool).
RUN = ["--quick", "--no-progress", "--vision", "tiny", "--text", "tiny", "--fusions", "early_concat,text_only",
       "--jobs", "1", "--image-size", "64", "--image-grid", "0"]


def _jpeg(path: Path, k: int) -> None:
    """A 48x48 JPEG: a square of colour ``k`` at a position of ``k`` on grey (every image distinct)."""
    colour = list(COLOURS.values())[k % len(COLOURS)]
    image = Image.new("RGB", (48, 48), (128, 128, 128))
    offset = k % 7 * 2
    image.paste(colour, (4 + offset, 6 + k % 5, 30 + offset, 32 + k % 5))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
def write_vqa_v2(root: Path, images: dict[str, int], per_image: int = 3) -> dict[str, list[int]]:
    """Official VQA v2 files for each subtype (``train2014``, ``val2014``) and COCO-named JPEGs.

    Returns subtype -> its question ids. Questions ask the square's colour, whether it is
    a colour, and how many squares there are; ten answers each, as VQA v2 collects them.
    """
    names = list(COLOURS)
    question_ids: dict[str, list[int]] = {}
    image_id = 9
    for subtype, count in images.items():
        questions, annotations = [], []
        for _ in range(count):
            image_id += 7
            colour = names[image_id % len(names)]
            _jpeg(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", image_id)
            asked = [("what color is the square?", "what color", "other", [colour] * 8 + ["gray", colour]),
                     (f"is the square {colour}?", "is the", "yes/no", ["yes"] * 9 + ["no"]),
                     ("how many squares are there?", "how many", "number", ["1"] * 7 + ["2", "1", "one"])]
            for q, (question, question_type, answer_type, answers) in enumerate(asked[:per_image]):
                qid = image_id * 1000 + q
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": question_type,
                    "answer_type": answer_type, "multiple_choice_answer": answers[0],
                    "answers": [{"answer": a, "answer_confidence": "yes" if i % 3 else "maybe", "answer_id": i + 1}
                                for i, a in enumerate(answers)],
                })
        info = {"description": "tiny VQA v2-format fixture", "version": "2.0", "year": 2017,
                "contributor": "tests", "date_created": "2017-04-26 17:07:13", "url": "http://example.invalid"}
        license_ = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps({
            "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": license_,
            "data_subtype": subtype, "questions": questions}))
        (root / "annotations" / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps({
            "info": info, "license": license_, "data_subtype": subtype, "annotations": annotations}))
        question_ids[subtype] = [q["question_id"] for q in questions]
    return question_ids


def _karpathy_images(sizes: dict[str, int], name: Callable[[int, str], tuple[str | None, str]]) -> list[dict]:
    """Karpathy ``images[]`` entries, three numbered captions each; ``name(k, split)`` -> (filepath, filename)."""
    names = list(COLOURS)
    entries, sentid, k = [], 0, 0
    for split, count in sizes.items():
        for _ in range(count):
            colour = names[k % len(names)]
            raws = [f"a {colour} square on grey number {k}", f"the square in picture {k} is {colour}",
                    f"grey background with a {colour} block {k}"]
            sentences = [{"tokens": raw.split(), "raw": raw, "imgid": k, "sentid": sentid + i}
                         for i, raw in enumerate(raws)]
            filepath, filename = name(k, split)
            entry = {"filename": filename, "imgid": k, "split": split, "sentids": [s["sentid"] for s in sentences],
                     "sentences": sentences}
            if filepath is not None:
                entry = {"filepath": filepath, **entry}
            entries.append(entry)
            sentid += len(raws)
            k += 1
    return entries


def write_flickr30k(root: Path, sizes: dict[str, int]) -> Path:
    """``dataset_flickr30k.json`` (Karpathy schema: ``imgid``, ``filename``, no ``filepath``),
    images in ``flickr30k-images/``."""
    entries = _karpathy_images(sizes, lambda k, split: (None, f"{1000000 + k * 37}.jpg"))
    for entry in entries:
        _jpeg(root / "flickr30k-images" / entry["filename"], entry["imgid"])
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return root


def write_full_coco(root: Path, sizes: dict[str, int]) -> Path:
    """The full COCO layout: ``annotations/dataset_coco.json`` (``filepath`` train2014 / val2014),
    an official captions file it does not need, and ``train2014/``, ``val2014/`` JPEGs; no ``vqa/``."""
    def name(k: int, split: str) -> tuple[str, str]:
        folder = "train2014" if split == "train" and k % 4 else "val2014"  # Karpathy's train holds both
        return folder, f"COCO_{folder}_{500 + k:012d}.jpg"

    entries = _karpathy_images(sizes, name)
    for entry in entries:
        entry["cocoid"] = 500 + entry["imgid"]
        _jpeg(root / entry["filepath"] / entry["filename"], entry["imgid"])
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    official = {"info": {}, "licenses": [], "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "never read by the bench"}]}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(official))
    return root


def _images(split) -> set[str]:
    return set(split.image_paths)


# --------------------------------------------------------------------------------------
# Validation splits
# --------------------------------------------------------------------------------------
def test_held_out_images_are_a_fixed_tenth_by_image() -> None:
    paths = [f"/data/train/{i:03d}.png" for i in range(200) for _ in range(3)]  # three questions an image
    held = held_out_images(paths)
    assert len(held) == round(VALIDATION_FRACTION * 200) and held <= set(paths)
    assert held_out_images(list(reversed(paths))) == held  # the samples' order does not matter
    moved = {p.replace("/data/", "/elsewhere/") for p in held_out_images([p.replace("/data/", "/elsewhere/")
                                                                          for p in paths])}
    assert moved == {p.replace("/data/", "/elsewhere/") for p in held}  # nor where the folder is
    assert len(held_out_images(["a.png", "b.png"])) == 1 and held_out_images(["a.png"]) == set()


def test_every_task_loads_with_a_validation_split() -> None:
    suites = {task for suite in SUITES.values() for task in suite.tasks}
    assert suites == set(TASK_LOADERS)  # every task belongs to a suite and has a loader taking eval_split
    val = load_tasks(SUITES["easy-vqa"], ["easy-vqa"], None, quick=False, eval_split="val")[0]
    test = load_tasks(SUITES["easy-vqa"], ["easy-vqa"], None, quick=False)[0]
    assert _images(val.train) == _images(test.train)  # the same training images for both scored splits
    assert not _images(val.train) & _images(val.test) and len(_images(val.test)) == 400  # 10% of 4,000
    assert len(val.train) + len(val.test) == 38_575 and len(test.test) == 9_673
    assert val.vocabulary == test.vocabulary
    assert val.description.endswith("val accuracy, exact match")


def test_max_train_and_max_test_keep_whole_images(tmp_path: Path) -> None:
    write_vqa_v2(tmp_path, {"train2014": 30, "val2014": 10})
    suite = SUITES["vqav2"]
    full = load_tasks(suite, ["vqav2"], tmp_path, quick=False)[0]
    small = load_tasks(suite, ["vqav2"], tmp_path, quick=False, max_train=5, max_test=4)[0]
    assert (len(_images(small.train)), len(_images(small.test))) == (5, 4)
    assert (len(small.train), len(small.test)) == (15, 12)  # every question of a kept image
    assert _images(small.train) <= _images(full.train) and _images(small.test) <= _images(full.test)
    again = load_tasks(suite, ["vqav2"], tmp_path, quick=False, max_train=5, max_test=4)[0]
    assert _images(again.train) == _images(small.train) and again.test.question_ids == small.test.question_ids
    val = load_tasks(suite, ["vqav2"], tmp_path, quick=False, eval_split="val", max_test=1)[0]
    assert len(_images(val.test)) == 1 and _images(val.test) <= _images(load_tasks(
        suite, ["vqav2"], tmp_path, quick=False, eval_split="val")[0].test)  # --max-test limits the scored split
    assert load_tasks(suite, ["vqav2"], tmp_path, quick=False, max_train=1000)[0].train.image_paths \
        == full.train.image_paths  # more than there are: all of them
    for bad in (0, -3):
        with pytest.raises(BenchError, match="--max-train must be a whole number of images >= 1"):
            load_tasks(suite, ["vqav2"], tmp_path, quick=False, max_train=bad)
        with pytest.raises(BenchError, match="--max-test must be"):
            load_tasks(suite, ["vqav2"], tmp_path, quick=False, max_test=bad)


# --------------------------------------------------------------------------------------
# VQA v2
# --------------------------------------------------------------------------------------
def test_vqav2_task_from_the_official_files(tmp_path: Path) -> None:
    ids = write_vqa_v2(tmp_path, {"train2014": 30, "val2014": 10})
    task = load_tasks(SUITES["vqav2"], ["vqav2"], tmp_path, quick=False)[0]
    val = load_tasks(SUITES["vqav2"], ["vqav2"], tmp_path, quick=False, eval_split="val")[0]
    assert (task.name, task.task, task.metric, task.scoring) == ("vqav2", "vqa", "accuracy", "vqa")
    assert task.test.question_ids == ids["val2014"]  # test is val2014, in file order
    assert all("/val2014/COCO_val2014_" in path for path in task.test.image_paths)
    # the validation slice: 3 of the 30 train2014 images, all their questions, out of train for both loads
    assert len(_images(val.test)) == 3 and len(val.test) == 9 and not _images(val.train) & _images(val.test)
    assert _images(val.train) == _images(task.train) and len(task.train) == 81
    assert set(val.test.question_ids) | set(task.train.question_ids) == set(ids["train2014"])
    again = load_tasks(SUITES["vqav2"], ["vqav2"], tmp_path, quick=False, eval_split="val")[0]
    assert again.test.question_ids == val.test.question_ids  # deterministic
    assert set(task.test.groups["answer_type"]) == {"other", "yes/no", "number"}  # from the annotations
    assert set(task.test.groups["question_type"]) == {"what color", "is the", "how many"}
    assert len(task.test.answers[0]) == 10 and {"yes", "no", "1", "red"} <= set(task.vocabulary)


def test_vqav2_missing_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="v2_OpenEnded_mscoco_train2014_questions.json.*annotations/ folder"):
        load_tasks(SUITES["vqav2"], ["vqav2"], tmp_path, quick=False)
    write_vqa_v2(tmp_path, {"train2014": 4})
    with pytest.raises(BenchError, match="needs the official VQA v2 files v2_OpenEnded_mscoco_val2014_questions"):
        load_tasks(SUITES["vqav2"], ["vqav2"], tmp_path, quick=False)
    assert len(load_tasks(SUITES["vqav2"], ["vqav2"], tmp_path, quick=False, eval_split="val")[0].test) == 3


def test_bench_vqav2_writes_official_results(tmp_path: Path, capsys) -> None:
    ids = write_vqa_v2(tmp_path / "vqa", {"train2014": 24, "val2014": 8})
    out = tmp_path / "out"
    common = ["bench", "--suite", "vqav2", "--data-dir", str(tmp_path / "vqa"), *RUN,
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(out)]) == 0
    assert "vqav2 (accuracy" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["fusion"]) for r in rows] == [("vqav2", "early_concat"), ("vqav2", "text_only")]
    assert all("_answers" not in row for row in rows)
    vocabulary = set(load_vqa_v2(tmp_path / "vqa", splits="train").answers)
    run = json.loads((out / "run.json").read_text())
    for row in rows:
        assert set(row["metrics"]["per_answer_type"]) == {"other", "yes/no", "number"}
        assert row["config"]["batch_size"] == 256 and row["config"]["test_samples"] == 24
        name = f"vqa_results_vqav2_{row['fusion']}.json"
        results = json.loads((out / name).read_text())
        assert [entry["question_id"] for entry in results] == ids["val2014"]  # one entry per test question
        assert all(set(entry) == {"question_id", "answer"} and type(entry["question_id"]) is int
                   and entry["answer"] in vocabulary for entry in results)
        assert name in run["files"]

    # --eval-split val scores the held-out train2014 images; --max-train / --max-test; bad values
    assert main([*common, "--out", str(tmp_path / "val"), "--eval-split", "val", "--max-train", "6",
                 "--max-test", "2"]) == 0
    capsys.readouterr()
    val_rows = json.loads((tmp_path / "val" / "results.json").read_text())
    assert {(r["config"]["eval_split"], r["config"]["train_samples"], r["config"]["test_samples"])
            for r in val_rows} == {("val", 18, 6)}  # 6 and 2 images, three questions each
    for option in ("--max-train", "--max-test"):
        assert main([*common, "--out", str(tmp_path / "bad"), option, "0"]) == 2
        assert f"{option} must be a whole number of images >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------
# Flickr30k and full COCO
# --------------------------------------------------------------------------------------
def test_flickr30k_tasks_read_the_karpathy_file_and_its_image_folder(tmp_path: Path) -> None:
    write_flickr30k(tmp_path, {"train": 10, "val": 3, "test": 4})
    names = list(SUITES["flickr30k"].tasks)
    assert names == ["flickr30k-captioning", "flickr30k-match", "flickr30k-retrieval"]
    for split, count in (("test", 4), ("val", 3)):
        tasks = load_tasks(SUITES["flickr30k"], names, tmp_path, quick=False, eval_split=split)
        assert [t.name for t in tasks] == names
        for task in tasks:
            assert len(_images(task.train)) == 10 and len(_images(task.test)) == count
            assert all("/flickr30k-images/" in p for p in task.train.image_paths + task.test.image_paths)
            assert f"({split})" in task.description or f"{split} accuracy" in task.description
    # images directly in the data folder work too, and a missing split file is named
    other = tmp_path / "flat"
    (tmp_path / "flickr30k-images").rename(other)
    (tmp_path / "dataset_flickr30k.json").rename(other / "dataset_flickr30k.json")
    assert len(load_tasks(SUITES["flickr30k"], ["flickr30k-retrieval"], other, quick=False)[0].test) == 12
    with pytest.raises(BenchError, match="no Karpathy split file for Flickr30k"):
        load_tasks(SUITES["flickr30k"], names, tmp_path, quick=False)


def test_bench_flickr30k_suite(tmp_path: Path, capsys) -> None:
    write_flickr30k(tmp_path / "flickr", {"train": 10, "val": 3, "test": 4})
    out = tmp_path / "out"
    # with --tune (one trial a row): captioning, match and retrieval rows tuned on their validation split
    assert main(["bench", "--suite", "flickr30k", "--data-dir", str(tmp_path / "flickr"), *RUN, "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--tune-grid", "lr=1e-3"]) == 0
    capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())
    for row in rows:
        metric = row["config"]["headline_metric"]
        assert row["tune"]["chosen"] == {"lr": 1e-3} and [t["lr"] for t in row["tune"]["trials"]] == [1e-3]
        assert row["tune"]["val_score"] == row["tune"]["trials"][0]["score"] and metric in row["metrics"]
    assert [(r["task"], r["fusion"]) for r in rows] == [
        ("flickr30k-captioning", "early_concat"), ("flickr30k-captioning", "text_only"),
        ("flickr30k-match", "early_concat"), ("flickr30k-match", "text_only"),
        ("flickr30k-retrieval", "early_concat"), ("flickr30k-retrieval", "itc")]
    assert "CIDEr" in rows[0]["metrics"] and rows[-1]["metrics"]["num_images"] == 4
    assert (out / "scores_flickr30k-retrieval_itc_seed0.npz").is_file() and (out / "captions.json").is_file()
    assert not list(out.glob("vqa_results_*"))


def test_coco_full_layout_drops_coco_yesno_without_vqa(tmp_path: Path, caplog, capsys) -> None:
    root = write_full_coco(tmp_path / "coco", {"train": 10, "val": 3, "test": 4})
    suite = SUITES["coco"]
    with caplog.at_level(logging.WARNING, logger="fusionzoo.bench.suites"):
        tasks = load_tasks(suite, list(suite.tasks), root, quick=False, drop_missing=True)
    assert [t.name for t in tasks] == ["coco-captioning", "coco-match", "coco-retrieval"]
    notes = [r.getMessage() for r in caplog.records if "coco-yesno" in r.getMessage()]
    assert len(notes) == 1 and "yesno_train.jsonl" in notes[0]
    folders = {Path(p).parent.name for t in tasks for p in t.train.image_paths}
    assert folders == {"train2014", "val2014"}  # the Karpathy filepath, under the data folder
    assert all(Path(p).is_file() for t in tasks for p in t.train.image_paths + t.test.image_paths)
    with pytest.raises(BenchError, match=r"task coco-yesno needs .*vqa/yesno_train.jsonl"):
        load_tasks(suite, ["coco-yesno", "coco-match"], root, quick=False)  # asked for by name

    # The CLI: --tasks coco-yesno fails naming the file; the suite's default tasks run without it.
    common = ["bench", "--suite", "coco", "--data-dir", str(root), *RUN, "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--tasks", "coco-yesno", "--out", str(tmp_path / "bad")]) == 2
    assert "vqa/yesno_train.jsonl" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionzoo.bench.suites"):
        assert main([*common, "--out", str(tmp_path / "out"), "--eval-split", "val"]) == 0
    capsys.readouterr()
    assert sum("leaving out task coco-yesno" in r.getMessage() for r in caplog.records) == 1
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["task"] for r in rows} == {"coco-captioning", "coco-match", "coco-retrieval"}
    assert {r["config"]["eval_split"] for r in rows} == {"val"}
