"""Bad input: every problem is a DataError naming the file, the entry and what was expected.

Also: ``skip_bad`` skips and counts (warning + report), ``only_present`` keeps the
images on disk, ``verify_images`` decodes at load time.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.registry import DATASETS
from fusionzoo.data.captions import load_coco_captions, load_karpathy_captions
from fusionzoo.data.classification import load_classification_jsonl
from fusionzoo.data.checks import DataError, UnknownSplitError
from fusionzoo.data.common import open_image, safe_join
from fusionzoo.data.vqa import load_vqa_jsonl, load_vqa_v2


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 120, 200)).save(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def vqa_line(i: int, **over) -> dict:
    return {"question_id": i, "image": f"img/{i}.jpg", "question": f"is it {i}?", "answers": ["yes" if i % 2 else "no"],
            **over}


@pytest.fixture
def vqa_dir(tmp_path: Path) -> Path:
    for i in range(4):
        write_image(tmp_path / "images" / "img" / f"{i}.jpg")
    return tmp_path


def load_vqa_lines(root: Path, lines: list, **kwargs):
    path = write_jsonl(root / "train.jsonl", lines)
    return load_vqa_jsonl(files={"train": path}, image_root=root / "images", **kwargs)


def assert_names(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    for part in parts:
        assert part in message, f"{part!r} not in: {message}"


# -- schema -----------------------------------------------------------------------------------
def test_missing_key_names_file_and_line(vqa_dir: Path) -> None:
    bad = vqa_line(1)
    del bad["question"]
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, [vqa_line(0), bad])
    assert_names(error, "train.jsonl", "line 2", "missing key 'question'", "expected 'question' holding a string")
    assert error.value.entry == "line 2" and error.value.file.endswith("train.jsonl")


def test_wrong_type_names_file_and_line(vqa_dir: Path) -> None:
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, [vqa_line(0), vqa_line(1), vqa_line(2, answers="yes")])
    assert_names(error, "train.jsonl", "line 3", "'answers'", "expected 'answers' holding a list")
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, [vqa_line(0, answers=["yes", 3])])
    assert_names(error, "line 1", "answers[1] is int", "list of strings")


def test_not_json_line(vqa_dir: Path) -> None:
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, [vqa_line(0), "{not json", vqa_line(2)])
    assert_names(error, "train.jsonl", "line 2", "not valid JSON", "one JSON object per line")


def test_classification_label_type(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    rows = [{"id": 1, "img": "a.png", "text": "x", "label": 0}, {"id": 2, "img": "a.png", "text": "y", "label": 0.5},
            {"id": 3, "img": "a.png", "text": "z", "label": 1}]
    with pytest.raises(DataError) as error:
        load_classification_jsonl(files={"train": write_jsonl(tmp_path / "train.jsonl", rows)}, image_root=tmp_path)
    assert_names(error, "train.jsonl", "line 2", "'label' is float", "an integer or a string")
    rows[1]["label"] = True  # a JSON boolean is not a label id
    with pytest.raises(DataError, match="line 2.*'label' is bool"):
        load_classification_jsonl(files={"train": write_jsonl(tmp_path / "train.jsonl", rows)}, image_root=tmp_path)
    rows[1] = {"id": 2, "img": "a.png", "text": "y"}  # one line without a label in a labeled file
    with pytest.raises(DataError, match="line 2: missing key 'label'"):
        load_classification_jsonl(files={"train": write_jsonl(tmp_path / "train.jsonl", rows)}, image_root=tmp_path)


def test_classification_unknown_eval_label(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    rows = [{"id": i, "img": "a.png", "text": "t", "label": lab} for i, lab in enumerate(["cat", "dog"])]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", [rows[0], {"id": 9, "img": "a.png", "text": "t", "label": "cow"}])
    with pytest.raises(DataError) as error:
        load_classification_jsonl(tmp_path)
    assert_names(error, "val.jsonl", "line 2", "unknown label 'cow'", "one of cat, dog")


def test_coco_schema_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "val2014" / "a.jpg")
    ann = tmp_path / "annotations" / "captions_val2014.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    with pytest.raises(DataError) as error:
        load_coco_captions(tmp_path)
    assert_names(error, "captions_val2014.json", "top level", "missing key 'annotations'")
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                               "annotations": [{"id": 5, "image_id": 1, "caption": "ok"},
                                               {"id": 6, "image_id": 1, "caption": 42}]}))
    with pytest.raises(DataError) as error:
        load_coco_captions(tmp_path)
    assert_names(error, "captions_val2014.json", "annotations[1] (id=6)", "'caption' is int", "a string")
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                               "annotations": [{"id": 5, "image_id": 7, "caption": "ok"}]}))
    with pytest.raises(DataError, match=r"annotations\[0\] \(id=5\): image_id 7 is not in 'images'"):
        load_coco_captions(tmp_path)
    ann.write_text("[1, 2]")
    with pytest.raises(DataError, match="top level: a JSON list, not an object"):
        load_coco_captions(tmp_path)


def test_karpathy_schema_error(tmp_path: Path) -> None:
    write_image(tmp_path / "val2014" / "a.jpg")
    good = {"filepath": "val2014", "filename": "a.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "a"}]}
    bad = {"filepath": "val2014", "split": "val", "cocoid": 2, "sentences": [{"raw": "b"}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [good, bad]}))
    with pytest.raises(DataError) as error:
        load_karpathy_captions(tmp_path)
    assert_names(error, "dataset_coco.json", "images[1] (cocoid=2)", "missing key 'filename'")


def write_v2(root: Path, questions: list, annotations: list | None) -> None:
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "train2014",
         "questions": questions}))
    if annotations is not None:
        (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(
            {"info": {}, "license": {}, "data_subtype": "train2014", "annotations": annotations}))


def v2_annotation(qid: int, image_id: int) -> dict:
    return {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": "other",
            "multiple_choice_answer": "red",
            "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}


def test_vqa_v2_schema_and_absent_image(tmp_path: Path) -> None:
    write_image(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    questions = [{"image_id": 1, "question": "what color?", "question_id": 10},
                 {"image_id": 1, "question_id": 11}]
    write_v2(tmp_path, questions, [v2_annotation(10, 1), v2_annotation(11, 1)])
    with pytest.raises(DataError) as error:
        load_vqa_v2(tmp_path)
    assert_names(error, "v2_OpenEnded_mscoco_train2014_questions.json", "questions[1] (question_id=11)",
                 "missing key 'question'")
    questions[1] = {"image_id": 2, "question": "what?", "question_id": 11}  # image 2 is not on disk
    write_v2(tmp_path, questions, [v2_annotation(10, 1), v2_annotation(11, 2)])
    with pytest.raises(DataError) as error:
        load_vqa_v2(tmp_path)
    assert_names(error, "1 of 2 entries", "questions[1] (question_id=11)", "COCO_train2014_000000000002.jpg",
                 "only_present=True")
    assert len(load_vqa_v2(tmp_path, only_present=True)["train"]) == 1
    write_v2(tmp_path, questions, [v2_annotation(10, 1)])  # question 11 has no annotation
    with pytest.raises(DataError, match=r"questions\[1\] \(question_id=11\): question has no annotation"):
        load_vqa_v2(tmp_path)


# -- empty files ----------------------------------------------------------------------------------
def test_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as error:
        load_vqa_jsonl(files={"train": empty}, image_root=tmp_path)
    assert_names(error, "train.jsonl", "is empty")
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no entries"):
        load_classification_jsonl(files={"train": empty}, image_root=tmp_path)
    ann = tmp_path / "captions_val2014.json"
    ann.write_text("")
    with pytest.raises(DataError, match="captions_val2014.json: COCO captions file is empty"):
        load_coco_captions(files=ann, image_root=tmp_path)
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="'images' is an empty list"):
        load_coco_captions(files=ann, image_root=tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_vqa_jsonl(files={"train": tmp_path / "nope.jsonl"}, image_root=tmp_path)


# -- paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("image, problem", [
    ("../outside.jpg", "escapes the image root"),
    ("img/../../outside.jpg", "escapes the image root"),
    ("/etc/hosts", "absolute image path"),
    ("C:\\images\\x.jpg", "absolute image path"),
    ("", "empty image path"),
])
def test_paths_outside_the_root(vqa_dir: Path, image: str, problem: str) -> None:
    write_image(vqa_dir / "outside.jpg")
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, [vqa_line(0), vqa_line(1, image=image)])
    assert_names(error, "train.jsonl", "line 2", problem)


def test_safe_join_allows_inner_dotdot(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/../b.jpg", file="f", entry="e") == str(tmp_path / "b.jpg")


def test_karpathy_escaping_filepath(tmp_path: Path) -> None:
    write_image(tmp_path / "data" / "val2014" / "a.jpg")
    image = {"filepath": "../..", "filename": "a.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "a"}]}
    (tmp_path / "data" / "dataset_coco.json").write_text(json.dumps({"images": [image]}))
    with pytest.raises(DataError, match=r"images\[0\] \(cocoid=1\): image path '../../a.jpg' escapes"):
        load_karpathy_captions(tmp_path / "data")


# -- images on disk -----------------------------------------------------------------------------
def test_missing_images_error_and_only_present(vqa_dir: Path) -> None:
    lines = [vqa_line(i) for i in range(4)] + [vqa_line(7), vqa_line(8)]  # images 7 and 8 are not on disk
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, lines)
    assert_names(error, "train.jsonl", "2 of 6 entries", "line 5", "img/7.jpg", "line 6", "only_present=True")
    data = load_vqa_lines(vqa_dir, lines, only_present=True)
    assert len(data["train"]) == 4
    assert data.reports["train"].missing_images == 2 and data.reports["train"].bad_entries == 0
    assert data.skipped == {"train": 2}


def test_skip_bad_counts_and_warns(vqa_dir: Path) -> None:
    no_question = vqa_line(2)
    del no_question["question"]
    lines = [vqa_line(0), vqa_line(1), no_question, "not json", vqa_line(3, image="../x.jpg"), vqa_line(9)]
    with pytest.warns(UserWarning, match=r"skipped 3 bad entries \(skip_bad=True\)") as record:
        data = load_vqa_lines(vqa_dir, lines, skip_bad=True)
    assert "line 3" in str(record[0].message)
    assert len(data["train"]) == 2
    assert data.reports["train"].bad_entries == 3 and data.reports["train"].missing_images == 1
    assert data.skipped == {"train": 4}
    with pytest.warns(UserWarning), pytest.raises(DataError, match="has no usable entries"):
        load_vqa_lines(vqa_dir, [no_question, "not json"], skip_bad=True)


def test_corrupt_image_named_when_decoded(vqa_dir: Path) -> None:
    (vqa_dir / "images" / "img" / "1.jpg").write_bytes(b"this is not a jpeg")
    good = vqa_dir / "images" / "img" / "2.jpg"
    (vqa_dir / "images" / "img" / "3.jpg").write_bytes(good.read_bytes()[:60])  # truncated
    data = load_vqa_lines(vqa_dir, [vqa_line(i) for i in range(4)])  # cheap load: no decoding
    items = data.with_image_transform(to_tensor)["train"]
    assert items[0]["pixel_values"].shape == (3, 8, 8)
    for row, name in ((1, "1.jpg"), (3, "3.jpg")):
        with pytest.raises(DataError) as error:
            items[row]
        assert_names(error, name, f"question_id={row}", "cannot decode image")


def test_verify_images_at_load(vqa_dir: Path) -> None:
    (vqa_dir / "images" / "img" / "1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines = [vqa_line(i) for i in range(4)]
    with pytest.raises(DataError) as error:
        load_vqa_lines(vqa_dir, lines, verify_images=True)
    assert_names(error, "1.jpg", "line 2", "cannot decode image", "a valid JPEG/PNG image")
    with pytest.warns(UserWarning, match="skipped 1 bad entries"):
        data = load_vqa_lines(vqa_dir, lines, verify_images=True, skip_bad=True)
    assert len(data["train"]) == 3 and data.reports["train"].bad_entries == 1


def test_unreadable_image(vqa_dir: Path) -> None:
    target = vqa_dir / "images" / "img" / "1.jpg"
    target.unlink()
    target.mkdir()  # a folder where the image should be: listed, but not readable as an image
    items = load_vqa_lines(vqa_dir, [vqa_line(0), vqa_line(1)]).with_image_transform(to_tensor)["train"]
    with pytest.raises(DataError) as error:
        items[1]
    assert_names(error, "1.jpg", "question_id=1", "expected a valid JPEG/PNG image")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_image(tmp_path: Path) -> None:
    path = write_image(tmp_path / "x.jpg")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match="x.jpg, row 7: image file is not readable"):
            open_image(path, entry="row 7")
    finally:
        path.chmod(0o644)


def test_unknown_split_lists_available(vqa_dir: Path) -> None:
    with pytest.raises(UnknownSplitError, match="no split 'tset'; available: train"):
        load_vqa_lines(vqa_dir, [vqa_line(0)], splits=["tset"])


@pytest.mark.parametrize("name", ["easy-vqa", "vqa-v2", "vqa-jsonl", "coco-captions", "karpathy-captions",
                                  "classification-jsonl", "caption-match", "image-text-jsonl", "webdataset",
                                  "hf-datasets"])
def test_registered_loaders_share_one_interface(name: str) -> None:
    """Trainer and benchmark call DATASETS.get(name)(root, splits=..., skip_bad=..., ...)."""
    params = inspect.signature(DATASETS.get(name)).parameters
    assert next(iter(params)) == "root"
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for flag in ("splits", "skip_bad", "only_present", "verify_images"):
        assert flag in params or takes_any, f"{name} does not take {flag}="
    if name != "easy-vqa":  # every other source needs its folder: a clear error without one
        with pytest.raises(DataError, match="needs root="):
            DATASETS.get(name)()
