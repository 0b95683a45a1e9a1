"""Sort-of-CLEVR generator: answers recomputed from the saved objects, drawing, determinism, cache, loader."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.registry import DATASETS
from fusionzoo.data import sort_of_clevr
from fusionzoo.tasks import get_task
from fusionzoo.data.sort_of_clevr import (
    MARKER_NAME,
    SortOfClevrConfig,
    SortOfClevrError,
    generate_sort_of_clevr,
    load_sort_of_clevr,
)

SIZE = 64
SMALL = {"image_size": SIZE, "train_scenes": 20, "val_scenes": 20, "test_scenes": 20}
TINY = {"image_size": SIZE, "train_scenes": 4, "val_scenes": 2, "test_scenes": 2}
# Written out here rather than imported: the test checks the generator against these.
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "orange": (255, 156, 0),
       "gray": (128, 128, 128), "yellow": (255, 255, 0)}
GROUP = {"shape": "non-relational", "horizontal": "non-relational", "vertical": "non-relational",
         "closest_shape": "relational", "furthest_shape": "relational", "count_same_shape": "relational"}
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_sort_of_clevr(cache_dir=tmp_path_factory.mktemp("soc"), progress=False, **SMALL)


def read_split(folder: Path, split: str, size: int = SIZE,
               background: str = "white") -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    lines = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    scenes = json.loads((folder / f"scenes_{split}.json").read_text())
    assert scenes["image_size"] == size and scenes["background"] == background
    return lines, {scene["image_id"]: scene["objects"] for scene in scenes["scenes"]}


def expected_answer(objects: list[dict[str, Any]], question_type: str, color: str, size: int = SIZE) -> str:
    """Plain geometry on the saved list, independent of the generator's code."""
    (me,) = [o for o in objects if o["color"] == color]
    others = [o for o in objects if o["color"] != color]
    if question_type == "shape":
        return me["shape"]
    if question_type == "horizontal":
        return "left" if me["x"] < size / 2 else "right"
    if question_type == "vertical":
        return "top" if me["y"] < size / 2 else "bottom"
    if question_type == "count_same_shape":
        return str(len([o for o in objects if o["shape"] == me["shape"]]))  # counts the object itself
    dists = sorted(((o["x"] - me["x"]) ** 2 + (o["y"] - me["y"]) ** 2, o["shape"]) for o in others)
    assert len({d for d, _ in dists}) == len(dists) or len(dists) == 1  # no ties to make an answer ambiguous
    return dists[0][1] if question_type == "closest_shape" else dists[-1][1]


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_answers_agree_with_a_recomputation(small_set: Path) -> None:
    seen: Counter[str] = Counter()
    for split in SPLITS:
        lines, scenes = read_split(small_set, split)
        assert len(lines) == 20 * 12
        for line in lines:
            objects = scenes[line["image_id"]]
            assert line["image"] == f"{split}/{line['image_id']}.png"
            assert f"the {line['color']} object" in line["question"]
            assert line["answer_type"] == GROUP[line["question_type"]]
            assert line["answers"] == [expected_answer(objects, line["question_type"], line["color"])]
            seen[line["question_type"]] += 1
    assert set(seen) == set(GROUP)


def test_objects_are_distinct_inside_and_apart(small_set: Path) -> None:
    all_scenes = []
    for split in SPLITS:
        _, scenes = read_split(small_set, split)
        assert len(scenes) == 20
        for objects in scenes.values():
            assert len(objects) == 6
            assert len({o["color"] for o in objects}) == 6 and {o["color"] for o in objects} <= set(RGB)
            assert {o["shape"] for o in objects} <= {"square", "circle"}
            boxes = []
            for o in objects:
                assert o["size"] == round(0.125 * SIZE)
                x0, y0 = o["x"] - o["size"] / 2, o["y"] - o["size"] / 2
                assert 0 <= x0 and 0 <= y0 and x0 + o["size"] <= SIZE and y0 + o["size"] <= SIZE
                boxes.append((x0, y0, x0 + o["size"], y0 + o["size"]))
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)  # a gap between
            all_scenes.append(json.dumps(objects, sort_keys=True))
    assert len(set(all_scenes)) == len(all_scenes)  # the splits hold different scenes


def check_pictures(folder: Path, size: int = SIZE, background: str = "white") -> None:
    """Each object's centre pixel has its colour, squares fill their box, circles leave the corners, nothing else."""
    empty = (255, 255, 255) if background == "white" else (0, 0, 0)
    for split in SPLITS:
        _, scenes = read_split(folder, split, size, background)
        for image_id, objects in scenes.items():
            image = Image.open(folder / "images" / split / f"{image_id}.png")
            assert image.mode == "RGB" and image.size == (size, size)
            pixels = np.asarray(image)
            covered = np.zeros((size, size), dtype=bool)
            for o in objects:
                assert tuple(pixels[int(o["y"]), int(o["x"])]) == RGB[o["color"]]
                x0, y0, side = int(o["x"] - o["size"] / 2), int(o["y"] - o["size"] / 2), o["size"]
                box = pixels[y0:y0 + side, x0:x0 + side]
                if o["shape"] == "square":
                    assert (box == RGB[o["color"]]).all()
                else:  # a circle leaves its corners empty
                    assert all(tuple(box[r, c]) == empty for r in (0, -1) for c in (0, -1))
                covered[y0:y0 + side, x0:x0 + side] = True
            assert (pixels[~covered] == empty).all()  # nothing drawn outside the objects


def test_pictures_match_the_object_lists(small_set: Path) -> None:
    check_pictures(small_set)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_sort_of_clevr(cache_dir=tmp_path / "a", progress=False, **TINY)
    b = generate_sort_of_clevr(cache_dir=tmp_path / "b", progress=False, **TINY)
    c = generate_sort_of_clevr(cache_dir=tmp_path / "c", progress=False, seed=1, **TINY)
    assert a.name == b.name and folder_hash(a) == folder_hash(b)
    assert c.name != a.name and folder_hash(c) != folder_hash(a)
    assert (a / "images" / "val" / "4.png").read_bytes() != (c / "images" / "val" / "4.png").read_bytes()


def test_cache_is_reused_and_keyed_by_every_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = generate_sort_of_clevr(cache_dir=tmp_path, progress=False, **TINY)
    assert first.parent == tmp_path and (first / MARKER_NAME).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    with monkeypatch.context() as patch:
        patch.setattr(sort_of_clevr, "_write_set", lambda *args: pytest.fail("a complete set was generated again"))
        again = load_sort_of_clevr(tmp_path, progress=False, **TINY)
    assert Path(again.image_root).parent == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps  # nothing rewritten
    keys = {SortOfClevrConfig(**TINY).key()}
    for change in ({"seed": 3}, {"num_objects": 5}, {"image_size": 72}, {"object_scale": 0.1}, {"train_scenes": 5},
                   {"val_scenes": 3}, {"test_scenes": 3}, {"questions_per_scene": 6}, {"background": "black"}):
        keys.add(SortOfClevrConfig(**{**TINY, **change}).key())
    assert len(keys) == 10
    other = generate_sort_of_clevr(cache_dir=tmp_path, progress=False, **{**TINY, "num_objects": 5})
    assert other != first and first.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no staging left


def test_a_set_without_its_marker_is_generated_again(tmp_path: Path) -> None:
    reference = folder_hash(generate_sort_of_clevr(cache_dir=tmp_path / "ref", progress=False, **TINY))
    broken = tmp_path / "cache" / SortOfClevrConfig(**TINY).key()
    (broken / "images").mkdir(parents=True)
    (broken / "train.jsonl").write_text("half a file")
    folder = generate_sort_of_clevr(cache_dir=tmp_path / "cache", progress=False, **TINY)
    assert folder == broken and folder_hash(folder) == reference


def test_questions_are_balanced_and_distinct(tmp_path: Path) -> None:
    for per_scene in (12, 10, 7):
        folder = generate_sort_of_clevr(cache_dir=tmp_path, progress=False, questions_per_scene=per_scene, **TINY)
        for split in SPLITS:
            lines, _ = read_split(folder, split)
            counts = Counter(line["question_type"] for line in lines)
            assert set(counts) == set(GROUP) and max(counts.values()) - min(counts.values()) <= 1, counts
            by_scene: dict[int, list[str]] = {}
            for line in lines:
                by_scene.setdefault(line["image_id"], []).append(line["question"])
            assert all(len(qs) == per_scene == len(set(qs)) for qs in by_scene.values())
            if per_scene == 12:
                assert len(set(counts.values())) == 1
        marker = json.loads((folder / MARKER_NAME).read_text())
        assert marker["counts"]["train"]["questions"] == 4 * per_scene


def test_registered_loader_gives_vqa_data_the_task_reads(tmp_path: Path) -> None:
    loader = DATASETS.get("sort-of-clevr")
    params = inspect.signature(loader).parameters
    assert next(iter(params)) == "root"
    assert {"splits", "skip_bad", "only_present", "verify_images", "answers"} <= set(params)
    data = loader(tmp_path, progress=False, verify_images=True, **TINY)
    task = get_task("vqa")
    task.check_data(data, "sort-of-clevr")
    vocab = task.vocabulary(data)
    assert {"square", "circle", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6"} == set(vocab)
    assert data.name == "sort-of-clevr" and data.metric == "exact_match" and data.split_names == list(SPLITS)
    row = data["train"][0]
    assert row["question_type"] in GROUP and row["answer_type"] == GROUP[row["question_type"]]
    assert row["target_scores"] == [1.0] and vocab[row["target_ids"][0]] == row["answers"][0]
    assert Path(row["image_path"]).is_file()
    assert len(data["train"]) == 48 and len(data["val"]) == 24
    only_test = loader(tmp_path, splits="test", progress=False, **TINY)
    assert only_test.split_names == ["test"] and only_test.answers == data.answers

    def tokenize(texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
        width = max(len(t.split()) for t in texts)
        return {"input_ids": torch.ones(len(texts), width, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), width, dtype=torch.long)}

    batch = data.collator(tokenize)([data["val"][i] for i in range(4)])
    assert batch["labels"].shape == (4, len(vocab)) and batch["labels"].sum().item() == 4


@pytest.mark.parametrize(("params", "name"), [
    ({"num_objects": 7}, "num_objects"),
    ({"num_objects": 1}, "num_objects"),
    ({"image_size": 32}, "image_size"),  # objects of 4 px
    ({"image_size": 64, "object_scale": 0.3}, "image_size"),  # six 19 px objects do not fit in 64 px
    ({"questions_per_scene": 37}, "questions_per_scene"),
    ({"train_scenes": -1}, "train_scenes"),
    ({"seed": -1}, "seed"),
    ({"background": "pink"}, "background"),
    ({"image_size": 64.0}, "image_size"),
])
def test_bad_parameters_name_the_parameter(tmp_path: Path, params: dict[str, Any], name: str) -> None:
    with pytest.raises(SortOfClevrError, match=f"sort-of-clevr: {name}: ") as info:
        load_sort_of_clevr(tmp_path, progress=False, **params)
    assert info.value.parameter == name and isinstance(info.value, ValueError)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_unknown_generation_parameter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SortOfClevrError, match="num_object: unknown parameter"):
        generate_sort_of_clevr(cache_dir=tmp_path, num_object=3)


def test_fewer_objects_and_black_background(tmp_path: Path) -> None:
    folder = generate_sort_of_clevr(cache_dir=tmp_path, progress=False, num_objects=3, background="black",
                                    questions_per_scene=18, **{**TINY, "image_size": 48})
    check_pictures(folder, 48, "black")
    for split in SPLITS:
        lines, scenes = read_split(folder, split, 48, "black")
        assert all(len(objects) == 3 and len({o["color"] for o in objects}) == 3 for objects in scenes.values())
        for line in lines:
            assert line["answers"] == [expected_answer(scenes[line["image_id"]], line["question_type"],
                                                       line["color"], 48)]
        counts = {line["answers"][0] for line in lines if line["question_type"] == "count_same_shape"}
        assert counts <= {"1", "2", "3"}
