"""VQA loaders: official VQA v2 schema with soft targets, easy-VQA sizes, JSONL, collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.registry import DATASETS
from fusionzoo.data.common import model_inputs
from fusionzoo.data.vqa import VQAData, load_easy_vqa, load_vqa, load_vqa_jsonl, load_vqa_v2


def fake_tokenize(texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """Whitespace tokenizer with [CLS]=1 ... [SEP]=2, padded with 0 to the longest text."""
    rows = [[1] + [3 + len(word) for word in text.split()][: max_length - 2] + [2] for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


# -- VQA v2 fixture in the official schema ----------------------------------------------------------
V2_TRAIN = {  # question_id: (image_id, question, 10 human answers)
    10: (1, "What color is the car?", ["red"] * 3 + ["Red."] + ["blue"] * 2 + ["green", "two", "2", "yes"]),
    11: (1, "Is it sunny?", ["yes"] * 10),
    12: (2, "Is this a cat?", ["no"] * 9 + ["yes"]),
}
V2_VAL = {20: (5, "Is there a dog?", ["yes"] * 10)}
V2_TEST_DEV = {70: (7, "What is this?")}


def _v2_answers(answers: list[str]) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]


def write_vqa_v2(root: Path) -> None:
    """Questions + annotations for train2014 / val2014, questions only for test-dev2015, images in <subtype>/."""
    splits = {"train2014": V2_TRAIN, "val2014": V2_VAL, "test-dev2015": V2_TEST_DEV}
    for subtype, questions in splits.items():
        folder = subtype.replace("test-dev", "test")
        for image_id in {q[0] for q in questions.values()}:
            path = root / folder / f"COCO_{folder}_{image_id:012d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 16), (image_id * 30, 100, 50)).save(path)
        (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps({
            "info": {"description": "fixture"}, "task_type": "Open-Ended", "data_type": "mscoco",
            "license": {"name": "x", "url": ""}, "data_subtype": subtype,
            "questions": [{"image_id": q[0], "question": q[1], "question_id": qid} for qid, q in questions.items()],
        }))
        if subtype.startswith("test"):
            continue
        (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps({
            "info": {"description": "fixture"}, "license": {"name": "x", "url": ""}, "data_subtype": subtype,
            "annotations": [{"question_type": "what color is the" if qid == 10 else "is",
                             "multiple_choice_answer": q[2][0], "answers": _v2_answers(q[2]), "image_id": q[0],
                             "answer_type": "other" if qid == 10 else "yes/no", "question_id": qid}
                            for qid, q in questions.items()],
        }))


def test_vqa_v2_schema_splits_and_metadata(tmp_path: Path) -> None:
    write_vqa_v2(tmp_path)
    data = load_vqa_v2(tmp_path)
    assert isinstance(data, VQAData)
    assert data.task == "vqa" and data.metric == "vqa"
    assert data.split_names == ["train", "val", "test-dev"]
    row = data["train"][0]
    assert row["question_id"] == 10 and row["image_id"] == 1
    assert row["image_path"] == str(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    assert len(row["answers"]) == 10
    assert row["answer_type"] == "other" and row["question_type"] == "what color is the"
    assert row["multiple_choice_answer"] == "red"
    test = data["test-dev"][0]
    assert test["image_path"] == str(tmp_path / "test2015" / "COCO_test2015_000000000007.jpg")
    assert test["answers"] == [] and test["target_ids"] == [] and test["answer_type"] is None
    assert DATASETS.get("vqa-v2") is load_vqa_v2


def test_vqa_v2_vocab_and_soft_targets(tmp_path: Path) -> None:
    write_vqa_v2(tmp_path)
    data = load_vqa_v2(tmp_path, answers_top_k=5, splits=["train", "val"])
    # normalised training answers by count: yes 12, no 9, red 4 ("Red." too), then 2 ("two" too) and blue
    # tied at 2 (alphabetical), green 1 -- cut by top_k=5
    assert data.answers == ["yes", "no", "red", "2", "blue"]
    assert data.answer_to_index["red"] == 2
    # leave-one-out VQA scores: 1 matching answer -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0
    expected = {10: {0: 0.3, 2: 1.0, 3: 0.6, 4: 0.6}, 11: {0: 1.0}, 12: {1: 1.0, 0: 0.3}}
    for row in data["train"]:
        got = dict(zip(row["target_ids"], row["target_scores"]))
        assert got == pytest.approx(expected[row["question_id"]])
    assert data["val"][0]["target_ids"] == [0]
    only_val = load_vqa_v2(tmp_path, answers_top_k=5, splits="val")  # the vocabulary still comes from train
    assert only_val.split_names == ["val"] and only_val.answers == data.answers
    reused = load_vqa_v2(tmp_path, splits="val", answers=["no", "yes"])
    assert reused.answers == ["no", "yes"] and reused["val"][0]["target_ids"] == [1]


def test_vqa_collate_shapes(tmp_path: Path) -> None:
    write_vqa_v2(tmp_path)
    data = load_vqa_v2(tmp_path, answers_top_k=5).with_image_transform(to_tensor)
    train = data["train"]
    assert train[0]["pixel_values"].shape == (3, 8, 8)
    batch = data.collator(fake_tokenize, max_length=6)([train[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 6)
    assert batch["labels"].shape == (3, 5) and batch["labels"].dtype == torch.float32
    assert batch["labels"][0].tolist() == pytest.approx([0.3, 0.0, 1.0, 0.6, 0.6])
    assert batch["question_id"].tolist() == [10, 11, 12]
    assert set(model_inputs(batch)) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    unlabeled = data.collator(fake_tokenize)([data["test-dev"][0]])
    assert unlabeled["labels"].shape == (1, 5) and unlabeled["labels"].sum() == 0


# -- easy-VQA -------------------------------------------------------------------------------------
def test_easy_vqa_sizes_and_vocab() -> None:
    easy_vqa = pytest.importorskip("easy_vqa")
    data = load_easy_vqa()
    assert {s: len(data[s]) for s in data.split_names} == {"train": 38_575, "test": 9_673}
    assert data.metric == "exact_match"
    assert sorted(data.answers) == sorted(easy_vqa.get_answers())
    first = data["train"][0]
    texts, answers, image_ids = easy_vqa.get_train_questions()
    assert (first["question"], first["answers"], first["image_id"]) == (texts[0], [answers[0]], image_ids[0])
    assert Path(first["image_path"]).name == f"{image_ids[0]}.png" and Path(first["image_path"]).is_file()
    assert first["target_ids"] == [data.answer_to_index[answers[0]]] and first["target_scores"] == [1.0]
    assert DATASETS.get("easy-vqa") is load_easy_vqa
    item = data.with_image_transform(to_tensor)["test"][5]
    assert item["pixel_values"].shape == (3, 8, 8)


def test_easy_vqa_layout_from_root(tmp_path: Path) -> None:
    for split, triples in {"train": [["what shape?", "circle", 0], ["is it red?", "yes", 1],
                                     ["is it blue?", "yes", 0]],
                           "test": [["what color?", "red", 0]]}.items():
        (tmp_path / split / "images").mkdir(parents=True)
        for image_id in {t[2] for t in triples}:
            Image.new("RGB", (8, 8)).save(tmp_path / split / "images" / f"{image_id}.png")
        (tmp_path / split / "questions.json").write_text(json.dumps(triples))
    data = load_vqa("easy-vqa", tmp_path, splits="test")
    assert data.answers == ["yes", "circle"]  # from train, by count
    assert data["test"][0]["target_ids"] == []  # "red" is not a training answer


# -- JSONL --------------------------------------------------------------------------------------
def test_vqa_jsonl_fixture(tmp_path: Path) -> None:
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    for image_id in (1, 2):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "val2014" / f"{image_id}.jpg")
    def line(qid: int, image_id: int, answer: str) -> dict:
        return {"question_id": qid, "image_id": image_id, "image": f"val2014/{image_id}.jpg", "question": "q?",
                "answers": [answer]}

    lines = {"train": [line(1, 1, "yes"), line(2, 2, "No"), line(3, 2, "no")],
             "val": [{"image": "val2014/1.jpg", "question": "d?", "answers": ["yes"]}]}
    (tmp_path / "vqa").mkdir()
    for split, records in lines.items():
        (tmp_path / "vqa" / f"yesno_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_vqa_jsonl(tmp_path)
    assert data.split_names == ["train", "val"]
    assert data.metric == "exact_match" and data.answers == ["no", "yes"]
    assert data["train"]["target_ids"] == [[1], [0], [0]]
    assert data["val"][0]["question_id"] == 1  # no question_id: the line number
    assert data["val"][0]["image_id"] == -1
    assert "answer_type" not in data["train"].column_names
    assert DATASETS.get("vqa-jsonl") is load_vqa_jsonl


def test_vqa_jsonl_coco_mini_sizes(coco_mini: Path) -> None:
    data = load_vqa_jsonl(coco_mini)  # finds vqa/yesno_*.jsonl and images/ by itself; no decoding
    assert {s: len(data[s]) for s in data.split_names} == {"train": 9_515, "val": 1_132, "test": 1_172}
    assert data.answers == ["no", "yes"] and data.metric == "exact_match"
    first = data.with_image_transform(to_tensor)["val"][0]
    assert first["pixel_values"].shape == (3, 8, 8)
    assert first["image_path"].startswith(str(coco_mini / "images" / "val2014"))


def test_vqa_jsonl_mixed_answer_counts(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    records = [{"image": "a.jpg", "question": "how many?", "answers": ["2", "two", "3"]},
               {"image": "a.jpg", "question": "what?", "answers": ["cat"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_vqa_jsonl(tmp_path)
    assert data.metric == "vqa" and data.answers == ["2", "3", "cat"]
    soft, hard = data["train"]
    # three answers: "2" matches twice -> leave-one-out mean (1/3 + 1/3 + 2/3) / 3; "3" once -> (1/3 + 1/3 + 0) / 3
    assert dict(zip(soft["target_ids"], soft["target_scores"])) == pytest.approx({0: 4 / 9, 1: 2 / 9})
    assert hard["target_ids"] == [2] and hard["target_scores"] == [1.0]  # one answer: a hard target


def test_rows_to_dataset_equals_datasets_own_encoding(tmp_path: Path) -> None:
    """The Arrow fast path for plain columns gives what ``Dataset.from_dict`` encodes value by value
    (None in an optional column, empty lists, float32 and int32 lists); other features take ``datasets``' path."""
    import datasets

    from fusionzoo.data.common import rows_to_dataset
    from fusionzoo.data.vqa import BASE_FEATURES, OPTIONAL_FEATURES

    features = datasets.Features({**BASE_FEATURES, "answer_type": OPTIONAL_FEATURES["answer_type"]})
    rows = [{"question_id": 7, "image_id": -1, "image_path": "/a/1.png", "question": "is it red?",
             "answers": ["yes", "no"], "target_ids": [0, 3], "target_scores": [0.3, 1.0], "answer_type": "yes/no"},
            {"question_id": 8, "image_id": 2, "image_path": "/a/2.png", "question": "what shape?",
             "answers": [], "target_ids": [], "target_scores": [], "answer_type": None}]
    fast = rows_to_dataset(rows, features)
    slow = datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)
    assert fast.features == slow.features == features
    assert fast.data.table.equals(slow.data.table)
    assert fast[0]["target_scores"] == pytest.approx([0.3, 1.0]) and fast[1]["answer_type"] is None
    assert len(rows_to_dataset([], features)) == 0

    Image.new("RGB", (2, 2), (9, 8, 7)).save(tmp_path / "x.png")
    with_image = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    encoded = rows_to_dataset([{"image": str(tmp_path / "x.png"), "name": "x"}], with_image)
    assert encoded[0]["image"].getpixel((1, 1)) == (9, 8, 7)
