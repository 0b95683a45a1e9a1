"""One meaning of VQA accuracy: ``fusionzoo eval`` (VQATask) scores answers as the bench does."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from fusionzoo.data.checks import DataError
from fusionzoo.tasks import VQATask
from fusionzoo.tasks.vqa_eval import vqa_accuracy


class _Data:
    def __init__(self, rows: dict, answers: list[str], metric: str) -> None:
        self.splits, self.answers, self.metric, self.name = {"val": Dataset.from_dict(rows)}, answers, metric, "t"

    def __getitem__(self, split: str) -> Dataset:
        return self.splits[split]


def test_vqa_accuracy_is_the_official_one_not_the_soft_target() -> None:
    vocab = ["yes", "no", "2"]
    humans = [["Yes"] * 10,  # humans agree: the official code compares "yes" with "Yes" as written -> 0
              ["2"] * 4 + ["two"] * 3 + ["3"] * 3,  # they disagree: normalised, "2" matches 7 of 10 -> 1
              ["no"] * 2 + ["yes"] * 8,  # "no" matches 2 -> 0.6
              []]  # unlabeled: not scored
    data = _Data({"question_id": [10, 11, 12, 13], "answers": humans,
                  "answer_type": ["yes/no", "number", "yes/no", "yes/no"]}, vocab, "vqa")
    gathered = {"answer": torch.tensor([1, 2, 0, 0]), "question_id": torch.tensor([12, 11, 10, 13])}  # any order
    metrics = VQATask().split_metrics(gathered, data, "val")
    expected = [vqa_accuracy("yes", humans[0]), vqa_accuracy("2", humans[1]), vqa_accuracy("no", humans[2])]
    assert expected == pytest.approx([0.0, 1.0, 0.6])
    assert metrics == {"num_samples": 4.0, "accuracy": round(100 * sum(expected) / 3, 2)}  # as the official report


def test_exact_match_data_and_repeated_ids() -> None:
    data = _Data({"question_id": [0, 1], "answers": [["Red"], ["blue"]]}, ["red", "blue"], "exact_match")
    gathered = {"answer": torch.tensor([0, 0]), "question_id": torch.tensor([0, 1])}
    assert VQATask().split_metrics(gathered, data, "val")["accuracy"] == pytest.approx(50.0)
    repeated = _Data({"question_id": [0, 0], "answers": [["red"], ["blue"]]}, ["red", "blue"], "exact_match")
    with pytest.raises(DataError, match="repeats a question_id"):
        VQATask().split_metrics(gathered, repeated, "val")
