"""Official VQA v2 accuracy: answer processing, per-question accuracy, the report, soft targets, vocabularies.

Every expected number is computed by hand in the comments, for both versions of
the official evaluation: the current one (the default) and the one before its
March 2021 fix (``legacy_pre_2021=True``). The ``evaluate`` module is loaded in a
fresh offline process with the network blocked.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fusionzoo.tasks.vqa_eval import (
    CONTRACTIONS,
    ScoreInputError,
    answer_scores,
    build_answer_vocab,
    evaluate_vqa,
    exact_match_accuracy,
    normalize_answer,
    score_vqa,
    soft_scores,
    vqa_accuracy,
)


# --------------------------------------------------------------------------------------
# Answer processing
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the official map stops at ten
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("yes.", "yes"),
        ("yes!", "yes"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("it's", "it's"),  # apostrophes are not punctuation
        ("3.5", "3.5"),  # a period before a digit stays
        ("10.", "10"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation is deleted, not spaced
        ("black/white", "black white"),  # touching no space: replaced by a space
        ("black / white", "black white"),  # touching a space: deleted
        ("t-shirt", "t shirt"),
        ("yes, sir", "yes sir"),
        (" left\tside\n", "left side"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_contractions_table_maps_bare_forms_to_apostrophe_forms() -> None:
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["youre"] == "you're"
    # keys without an apostrophe never gain letters, only apostrophes
    for bare, full in CONTRACTIONS.items():
        if "'" not in bare and bare.islower():
            assert full.replace("'", "") == bare, (bare, full)


def test_normalize_answer_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        normalize_answer(2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Accuracy of one question
# --------------------------------------------------------------------------------------
def test_vqa_accuracy_two_of_ten_is_point_six() -> None:
    answers = ["2", "2"] + ["3"] * 8
    # leave out a "2" (2 subsets): 1 match -> 1/3; leave out a "3" (8 subsets): 2 matches -> 2/3
    expected = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    assert expected == pytest.approx(0.6)
    for legacy in (False, True):
        assert vqa_accuracy("2", answers, legacy_pre_2021=legacy) == pytest.approx(expected, abs=1e-12)
        # the humans disagree, so both versions normalise the prediction "two" -> "2"
        assert vqa_accuracy("two", answers, legacy_pre_2021=legacy) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_matching_humans(matches: int, expected: float, legacy: bool) -> None:
    # m matches of 10: m subsets keep m-1 matches, 10-m keep m; each scores min(1, k/3)
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers, legacy_pre_2021=legacy) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_with_three_answers() -> None:
    # all 3 match: every subset of 2 keeps 2 matches -> 2/3
    assert vqa_accuracy("red", ["red"] * 3) == pytest.approx(2 / 3)
    assert vqa_accuracy("red", ["red"] * 3, legacy_pre_2021=True) == pytest.approx(2 / 3)


# (human answers, prediction, current accuracy, legacy accuracy), each worked by hand.
# Current: both sides whitespace-cleaned; only when the cleaned humans disagree, both get the
# punctuation and word steps (lower case, number words, articles, contractions).
# Legacy: the prediction always gets every step; the humans, as stored, get the punctuation
# step only, and only when they disagree as stored.
PROCESSING_CASES = {
    # -- the ten humans agree -------------------------------------------------------------
    # both compare "yes" with ten "yes": 10 matches
    "agree exact": (["yes"] * 10, "yes", 1.0, 1.0),
    # current: "Yes" is compared unprocessed, != "yes"; legacy: "Yes" -> "yes", 10 matches
    "agree, capital in prediction": (["yes"] * 10, "Yes", 0.0, 1.0),
    # current: "Yes" == "Yes"; legacy: the prediction becomes "yes", the humans stay "Yes"
    "agree, capitals in humans": (["Yes"] * 10, "Yes", 1.0, 0.0),
    # current: "two" unprocessed != "2"; legacy: "two" -> "2", 10 matches
    "agree, number word in prediction": (["2"] * 10, "two", 0.0, 1.0),
    # current: "two" == "two"; legacy: "two" -> "2" but the humans stay "two"
    "agree, number words in humans": (["two"] * 10, "two", 1.0, 0.0),
    # current: "a dog" == "a dog"; legacy: "a dog" -> "dog" but the humans stay "a dog"
    "agree, article": (["a dog"] * 10, "a dog", 1.0, 0.0),
    # current: "yes." unprocessed != "yes"; legacy: "yes." -> "yes", 10 matches
    "agree, period in prediction": (["yes"] * 10, "yes.", 0.0, 1.0),
    # current: "t-shirt" == "t-shirt"; legacy: "t-shirt" -> "t shirt" but the humans stay "t-shirt"
    "agree, hyphen": (["t-shirt"] * 10, "t-shirt", 1.0, 0.0),
    # the apostrophe is not punctuation and "it's" is not in the contractions table: both equal
    "agree, apostrophe": (["it's"] * 10, "it's", 1.0, 1.0),
    # current: humans "yes\n" -> "yes", prediction " yes\t" -> "yes", 10 matches;
    # legacy: the humans are not cleaned, "yes" != "yes\n"
    "agree, whitespace": (["yes\n"] * 10, " yes\t", 1.0, 0.0),
    # current: cleaned, all ten are "yes" (they agree), so "Yes" is compared unprocessed: 0;
    # legacy: as stored they differ ("yes " != "yes"), the prediction "Yes" -> "yes" matches 9
    # (punctuation keeps "yes " as it is): every subset keeps >= 8 matches -> 1.0
    "agree only after whitespace cleaning": (["yes"] * 9 + ["yes "], "Yes", 0.0, 1.0),
    # -- the humans disagree --------------------------------------------------------------
    # current: humans -> "yes" x5, "no" x5; "yes" matches 5 -> 1.0; legacy: humans stay "Yes"
    "disagree, capitals": (["Yes"] * 5 + ["no"] * 5, "yes", 1.0, 0.0),
    # current: "two" -> "2", so "2" matches 4 -> 1.0; legacy: humans keep "two", "2" matches 1 -> 0.3
    "disagree, number words in humans": (["two"] * 3 + ["2"] + ["3"] * 6, "2", 1.0, 0.3),
    # current: "two" x5 -> "2" x5 and the prediction "two" -> "2": 5 matches; legacy: humans keep "two"
    "disagree, number words on both sides": (["two"] * 5 + ["3"] * 5, "two", 1.0, 0.0),
    # both: the prediction "two" -> "2" matches the 2 "2"s -> 0.6
    "disagree, number word in prediction": (["2"] * 2 + ["3"] * 8, "two", 0.6, 0.6),
    # current: "a dog" -> "dog", "the dog" -> "dog": 3 matches -> 0.9;
    # legacy: humans keep "a dog", the prediction "dog" matches the one "dog" -> 0.3
    "disagree, articles": (["a dog"] * 2 + ["dog"] + ["cat"] * 7, "the dog", 0.9, 0.3),
    # both: "yes." -> "yes" (period deleted) and "Yes" -> "yes" (word step on the prediction): 4 -> 1.0
    "disagree, period": (["yes."] * 2 + ["yes"] * 2 + ["no"] * 6, "Yes", 1.0, 1.0),
    # both: "t-shirt" -> "t shirt" on both sides: 3 matches -> 0.9
    "disagree, hyphen": (["t-shirt"] * 3 + ["shirt"] * 7, "t-shirt", 0.9, 0.9),
    # current: "dont" -> "don't" everywhere: 4 matches -> 1.0;
    # legacy: the humans keep "dont", the prediction "don't" matches the 2 "don't" -> 0.6
    "disagree, contraction": (["don't"] * 2 + ["dont"] * 2 + ["yes"] * 6, "dont", 1.0, 0.6),
    # current: "left side\n" -> "left side", "\tleft side" -> "left side": 3 matches -> 0.9;
    # legacy: the humans keep their "\n" (punctuation leaves whitespace alone): no match
    "disagree, whitespace": (["left side\n"] * 3 + ["right"] * 7, "\tleft side", 0.9, 0.0),
}


@pytest.mark.parametrize("case", list(PROCESSING_CASES))
def test_vqa_accuracy_current_and_legacy_processing(case: str) -> None:
    answers, prediction, current, legacy = PROCESSING_CASES[case]
    assert vqa_accuracy(prediction, answers) == pytest.approx(current, abs=1e-12)
    assert vqa_accuracy(prediction, answers, legacy_pre_2021=False) == pytest.approx(current, abs=1e-12)
    assert vqa_accuracy(prediction, answers, legacy_pre_2021=True) == pytest.approx(legacy, abs=1e-12)


def test_vqa_accuracy_input_errors() -> None:
    with pytest.raises(ValueError, match="answers is empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="list of strings"):
        vqa_accuracy("yes", "yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of strings, got an element of type int: 2"):
        vqa_accuracy("yes", ["yes", 2])  # type: ignore[list-item]
    for legacy in (False, True):  # also when the humans agree (the prediction is then not normalised)
        with pytest.raises(TypeError, match="prediction must be a str"):
            vqa_accuracy(None, ["yes"] * 10, legacy_pre_2021=legacy)  # type: ignore[arg-type]


def test_exact_match_accuracy() -> None:
    # "Yes." == "yes"; "two" in {"2", "3"}; "no" != "yes"
    assert exact_match_accuracy(["Yes.", "two", "no"], ["yes", ["2", "3"], "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        exact_match_accuracy(["a", "b"], ["a"])


# --------------------------------------------------------------------------------------
# Soft targets and the answer vocabulary
# --------------------------------------------------------------------------------------
def test_soft_scores_hand_values() -> None:
    vocab = {"red": 0, "dark red": 1, "blue": 2}
    # "red" 2 of 10 -> 0.6; "dark red" 8 of 10 -> 1.0; "blue" never given -> absent
    scores = soft_scores(["red"] * 2 + ["dark red"] * 8, vocab)
    assert scores.keys() == {0, 1}
    assert scores[0] == pytest.approx(0.6) and scores[1] == pytest.approx(1.0)


def test_soft_scores_normalise_answers_and_drop_unknown() -> None:
    vocab = {"2": 0, "3": 1}
    # "Two", "two", "2" are one answer (3 of 10 -> 0.9); "3" 1 of 10 -> 0.3; "a dog" not in vocab
    answers = ["Two", "two", "2", "3"] + ["a dog"] * 6
    scores = soft_scores(answers, vocab)
    assert scores == pytest.approx({0: 0.9, 1: 0.3})
    assert answer_scores(answers) == pytest.approx({"2": 0.9, "3": 0.3, "dog": 1.0})
    with pytest.raises(TypeError, match="answer -> index"):
        soft_scores(answers, ["2", "3"])  # type: ignore[arg-type]


def test_build_answer_vocab_is_frequency_then_alphabetical() -> None:
    lists = [["yes", "yes", "no"], ["Two", "2", "two"], ["no", "the cat", "cat"], ["."]]
    # counts: "2" 3, "cat" 2, "no" 2, "yes" 2 ("." normalises to "" and is dropped)
    assert build_answer_vocab(lists) == ["2", "cat", "no", "yes"]
    assert build_answer_vocab(lists, top_k=2) == ["2", "cat"]
    assert build_answer_vocab(lists, min_count=3) == ["2"]
    shuffled = [list(answers) for answers in lists]
    random.Random(0).shuffle(shuffled)
    assert build_answer_vocab(shuffled) == build_answer_vocab(lists)
    assert build_answer_vocab(lists, top_k=None) == ["2", "cat", "no", "yes"]
    with pytest.raises(ValueError, match="top_k"):
        build_answer_vocab(lists, top_k=0)


# --------------------------------------------------------------------------------------
# The official report on an official-schema fixture
# --------------------------------------------------------------------------------------
# (question_id, question, question_type, answer_type, human answers, prediction,
#  accuracy by hand: current, legacy)
Case = tuple[int, str, str, str, list[str], str, float, float]

# Human answers normalised, as in the official annotation files: the versions differ only
# where the humans agree and the prediction or their answer changes under processing.
CASES: list[Case] = [
    # humans disagree: "Yes." -> "yes" in both, 7 match
    (1, "Is the dog sleeping?", "is the", "yes/no", ["yes"] * 7 + ["no"] * 3, "Yes.", 1.0, 1.0),
    # humans disagree: "two" -> "2" in both, 2 match
    (2, "How many dogs are there?", "how many", "number", ["2"] * 2 + ["3"] * 8, "two", 0.6, 0.6),
    # humans agree: current compares "one" unprocessed (0 match); legacy "one" -> "1" (10 match)
    (3, "How many cats are there?", "how many", "number", ["1"] * 10, "one", 0.0, 1.0),
    # 1 of 10 said "red" in both
    (4, "What color is the ball?", "what color is the", "other", ["red"] + ["dark red"] * 9, "red", 0.3, 0.3),
    # humans disagree: "t-shirt" -> "t shirt" in both, 3 match
    (5, "What is the man wearing?", "what is the man", "other", ["t-shirt"] * 3 + ["shirt"] * 7, "t shirt",
     0.9, 0.9),
    # humans agree: current "t-shirt" == "t-shirt"; legacy "t-shirt" -> "t shirt" != "t-shirt"
    (6, "What is the man holding?", "what is the man", "other", ["t-shirt"] * 10, "t-shirt", 1.0, 0.0),
    (7, "Is it raining?", "is it", "yes/no", ["no"] * 10, "yes", 0.0, 0.0),
]
# current: (1 + .6 + 0 + .3 + .9 + 1 + 0) / 7 = 3.8 / 7 = 54.2857% -> 54.29
EXPECTED_REPORT = {
    "overall": 54.29,
    "perAnswerType": {"yes/no": 50.0, "number": 30.0, "other": 73.33},  # (1+0)/2, (.6+0)/2, (.3+.9+1)/3
    "perQuestionType": {"is the": 100.0, "how many": 30.0, "what color is the": 30.0, "what is the man": 95.0,
                        "is it": 0.0},
}
# legacy: (1 + .6 + 1 + .3 + .9 + 0 + 0) / 7 = 3.8 / 7 = 54.2857% -> 54.29, split otherwise
EXPECTED_LEGACY_REPORT = {
    "overall": 54.29,
    "perAnswerType": {"yes/no": 50.0, "number": 80.0, "other": 40.0},  # (1+0)/2, (.6+1)/2, (.3+.9+0)/3
    "perQuestionType": {"is the": 100.0, "how many": 80.0, "what color is the": 30.0, "what is the man": 45.0,
                        "is it": 0.0},
}

# Raw human answers (capitals, number words, articles): the two versions diverge.
RAW_CASES: list[Case] = [
    # current: "Yes" -> "yes", 6 match; legacy: the humans keep "Yes", 2 match
    (11, "Is the sky blue?", "is the", "yes/no", ["Yes"] * 4 + ["yes"] * 2 + ["no"] * 4, "yes", 1.0, 0.6),
    # current: "Three" -> "3", 5 match; legacy: the humans keep "Three", 2 match
    (12, "How many birds are there?", "how many", "number", ["Three"] * 3 + ["3"] * 2 + ["4"] * 5, "3", 1.0, 0.6),
    # humans agree: current "four" != "4"; legacy "four" -> "4", 10 match
    (13, "How many boats are there?", "how many", "number", ["4"] * 10, "four", 0.0, 1.0),
    # current: "A frisbee" -> "frisbee" on both sides, 9 match;
    # legacy: the prediction -> "frisbee", the humans keep "A frisbee", 2 match
    (14, "What is the dog catching?", "what is the", "other", ["A frisbee"] * 7 + ["frisbee"] * 2 + ["ball"],
     "a frisbee", 1.0, 0.6),
    # humans agree: current "White" == "White"; legacy "White" -> "white" != "White"
    (15, "What color is the plate?", "what color is the", "other", ["White"] * 10, "White", 1.0, 0.0),
    # current: "Dog" -> "dog", 3 match; legacy: the humans keep "Dog", no match
    (16, "What animal is this?", "what animal is", "other", ["Dog"] * 3 + ["cat"] * 7, "dog", 0.9, 0.0),
]
# current: (1 + 1 + 0 + 1 + 1 + .9) / 6 = 4.9 / 6 = 81.667% -> 81.67
EXPECTED_RAW_REPORT = {
    "overall": 81.67,
    "perAnswerType": {"yes/no": 100.0, "number": 50.0, "other": 96.67},  # 1/1, (1+0)/2, (1+1+.9)/3
    "perQuestionType": {"is the": 100.0, "how many": 50.0, "what is the": 100.0, "what color is the": 100.0,
                        "what animal is": 90.0},
}
# legacy: (.6 + .6 + 1 + .6 + 0 + 0) / 6 = 2.8 / 6 = 46.667% -> 46.67
EXPECTED_RAW_LEGACY_REPORT = {
    "overall": 46.67,
    "perAnswerType": {"yes/no": 60.0, "number": 80.0, "other": 20.0},  # .6/1, (.6+1)/2, (.6+0+0)/3
    "perQuestionType": {"is the": 60.0, "how many": 80.0, "what is the": 60.0, "what color is the": 0.0,
                        "what animal is": 0.0},
}


def _official_files(cases: list[Case] = CASES) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
        "questions": [{"image_id": 100 + qid, "question": question, "question_id": qid}
                      for qid, question, *_ in cases],
    }
    annotations = {
        "info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
        "annotations": [
            {"question_id": qid, "image_id": 100 + qid, "question_type": qtype, "answer_type": atype,
             "multiple_choice_answer": max(set(answers), key=answers.count),
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
            for qid, _, qtype, atype, answers, *_ in cases
        ],
    }
    results = [{"question_id": qid, "answer": prediction} for qid, _, _, _, _, prediction, *_ in cases]
    return questions, annotations, results


def _write(folder: Path, questions: Any, annotations: Any, results: Any) -> tuple[Path, Path, Path]:
    paths = folder / "q.json", folder / "a.json", folder / "r.json"
    for path, data in zip(paths, (questions, annotations, results)):
        path.write_text(json.dumps(data))
    return paths


def test_per_question_accuracies_match_hand_values() -> None:
    for qid, _, _, _, answers, prediction, current, legacy in CASES + RAW_CASES:
        assert vqa_accuracy(prediction, answers) == pytest.approx(current, abs=1e-12), qid
        assert vqa_accuracy(prediction, answers, legacy_pre_2021=True) == pytest.approx(legacy, abs=1e-12), qid


def test_evaluate_vqa_official_report(tmp_path: Path) -> None:
    q, a, r = _write(tmp_path, *_official_files())
    assert evaluate_vqa(q, a, r) == EXPECTED_REPORT
    assert evaluate_vqa(*_official_files()) == EXPECTED_REPORT  # loaded objects work too
    assert evaluate_vqa(q, a, r, legacy_pre_2021=True) == EXPECTED_LEGACY_REPORT
    report = score_vqa([c[5] for c in CASES], [c[4] for c in CASES])
    assert report == {"overall": 54.29, "perAnswerType": {}, "perQuestionType": {}}
    report = score_vqa([c[5] for c in CASES], [c[4] for c in CASES], legacy_pre_2021=True)
    assert report == {"overall": 54.29, "perAnswerType": {}, "perQuestionType": {}}


def test_evaluate_vqa_raw_human_answers_current_vs_legacy(tmp_path: Path) -> None:
    # the same files: 81.67 with the current official code, 46.67 with the pre-2021 one
    q, a, r = _write(tmp_path, *_official_files(RAW_CASES))
    assert evaluate_vqa(q, a, r) == EXPECTED_RAW_REPORT
    assert evaluate_vqa(q, a, r, legacy_pre_2021=False) == EXPECTED_RAW_REPORT
    assert evaluate_vqa(q, a, r, legacy_pre_2021=True) == EXPECTED_RAW_LEGACY_REPORT
    # the annotation file is read, not edited: scoring again gives the same numbers
    assert evaluate_vqa(q, a, r) == EXPECTED_RAW_REPORT


def _error(tmp_path: Path, edit: Any) -> str:
    questions, annotations, results = _official_files()
    edit(questions, annotations, results)
    with pytest.raises(ScoreInputError) as info:
        evaluate_vqa(*_write(tmp_path, questions, annotations, results))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key_names_file_and_entry(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: a["annotations"][1].pop("answer_type"))
    assert "a.json" in message and "annotations[1] (question_id=2)" in message and "'answer_type'" in message


def test_missing_answer_text_names_the_answer(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: a["annotations"][2]["answers"][4].pop("answer"))
    assert "annotations[2] (question_id=3).answers[4]" in message and "'answer'" in message


def test_wrong_type_names_file_and_entry(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: r[3].update(question_id="4"))
    assert "r.json" in message and "results[3] (question_id='4')" in message and "to be int" in message
    message = _error(tmp_path, lambda q, a, r: r[0].update(answer=None))
    assert "results[0] (question_id=1)" in message and "'answer'" in message and "str" in message


def test_result_for_unknown_question(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: r.append({"question_id": 999, "answer": "yes"}))
    assert "r.json" in message and "results[7] (question_id=999)" in message and "not in the annotations" in message


def test_missing_results_say_how_many(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: r.__delitem__(slice(0, 2)))
    assert "r.json" in message and "no result for 2 of 7" in message and "question_id 1, 2" in message


def test_duplicate_result(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: r.append(dict(r[0])))
    assert "results[7] (question_id=1)" in message and "second result" in message


def test_questions_from_another_split(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda q, a, r: q["questions"].pop())
    assert "a.json" in message and "q.json" in message and "annotations[6] (question_id=7)" in message


def test_unreadable_files(tmp_path: Path) -> None:
    q, a, r = _write(tmp_path, *_official_files())
    r.write_text("[{")
    with pytest.raises(ScoreInputError, match=r"r\.json: not valid JSON \(line 1"):
        evaluate_vqa(q, a, r)
    with pytest.raises(ScoreInputError, match="results file not found"):
        evaluate_vqa(q, a, tmp_path / "nope.json")
    a.write_text(json.dumps({"questions": []}))
    with pytest.raises(ScoreInputError, match="no top-level 'annotations' list"):
        evaluate_vqa(q, a, r)


# --------------------------------------------------------------------------------------
# The evaluate module, loaded offline
# --------------------------------------------------------------------------------------
OFFLINE_SCRIPT = """
import json, socket, sys

def _refuse(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = _refuse
socket.create_connection = _refuse
from fusionzoo.tasks.metrics import load

module = load("vqa_accuracy")
calls = json.loads(sys.stdin.read())
print(json.dumps([module.compute(**args) for args in calls]))
"""


def test_evaluate_module_loads_offline_and_matches(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    calls = []
    for cases in (CASES, RAW_CASES):
        args = {"predictions": [c[5] for c in cases], "references": [c[4] for c in cases],
                "answer_types": [c[3] for c in cases], "question_types": [c[2] for c in cases]}
        calls += [args, {**args, "legacy_pre_2021": True}]
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], input=json.dumps(calls), capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        EXPECTED_REPORT, EXPECTED_LEGACY_REPORT, EXPECTED_RAW_REPORT, EXPECTED_RAW_LEGACY_REPORT]
    assert (tmp_path / "modules").is_dir()  # evaluate copied the script into the given cache
