"""Official VQA v2 accuracy: answer processing, per-question accuracy, the report, soft targets, vocabularies.

Every expected number is computed by hand in the comments. The ``evaluate``
module is loaded in a fresh offline process with the network blocked.
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
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("two", answers) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_matching_humans(matches: int, expected: float) -> None:
    # m matches of 10: m subsets keep m-1 matches, 10-m keep m; each scores min(1, k/3)
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_with_three_answers() -> None:
    # all 3 match: every subset of 2 keeps 2 matches -> 2/3
    assert vqa_accuracy("red", ["red"] * 3) == pytest.approx(2 / 3)


def test_vqa_accuracy_follows_the_official_processing_of_human_answers() -> None:
    # humans disagree: their answers get the punctuation step, "t-shirt" -> "t shirt"
    assert vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # humans agree: their answers are compared as stored, so the processed prediction misses
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # only the punctuation step: human answers are not lower-cased or number-mapped
    assert vqa_accuracy("two", ["two"] * 5 + ["3"] * 5) == 0.0


def test_vqa_accuracy_input_errors() -> None:
    with pytest.raises(ValueError, match="answers is empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="list of strings"):
        vqa_accuracy("yes", "yes")  # type: ignore[arg-type]


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
# (question_id, question, question_type, answer_type, human answers, prediction, accuracy by hand)
CASES: list[tuple[int, str, str, str, list[str], str, float]] = [
    (1, "Is the dog sleeping?", "is the", "yes/no", ["yes"] * 7 + ["no"] * 3, "Yes.", 1.0),  # 7 match
    (2, "How many dogs are there?", "how many", "number", ["2"] * 2 + ["3"] * 8, "two", 0.6),  # 2 match
    (3, "How many cats are there?", "how many", "number", ["1"] * 10, "one", 1.0),  # 10 match
    (4, "What color is the ball?", "what color is the", "other", ["red"] + ["dark red"] * 9, "red", 0.3),
    (5, "What is the man wearing?", "what is the man", "other", ["t-shirt"] * 3 + ["shirt"] * 7, "t shirt", 0.9),
    (6, "What is the man holding?", "what is the man", "other", ["t-shirt"] * 10, "t-shirt", 0.0),  # official quirk
    (7, "Is it raining?", "is it", "yes/no", ["no"] * 10, "yes", 0.0),
]
# overall: (1 + .6 + 1 + .3 + .9 + 0 + 0) / 7 = 3.8 / 7 = 54.2857% -> 54.29
EXPECTED_REPORT = {
    "overall": 54.29,
    "perAnswerType": {"yes/no": 50.0, "number": 80.0, "other": 40.0},  # (1+0)/2, (.6+1)/2, (.3+.9+0)/3
    "perQuestionType": {"is the": 100.0, "how many": 80.0, "what color is the": 30.0, "what is the man": 45.0,
                        "is it": 0.0},
}


def _official_files() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
        "questions": [{"image_id": 100 + qid, "question": question, "question_id": qid}
                      for qid, question, *_ in CASES],
    }
    annotations = {
        "info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
        "annotations": [
            {"question_id": qid, "image_id": 100 + qid, "question_type": qtype, "answer_type": atype,
             "multiple_choice_answer": max(set(answers), key=answers.count),
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
            for qid, _, qtype, atype, answers, _, _ in CASES
        ],
    }
    results = [{"question_id": qid, "answer": prediction} for qid, *_, prediction, _ in CASES]
    return questions, annotations, results


def _write(folder: Path, questions: Any, annotations: Any, results: Any) -> tuple[Path, Path, Path]:
    paths = folder / "q.json", folder / "a.json", folder / "r.json"
    for path, data in zip(paths, (questions, annotations, results)):
        path.write_text(json.dumps(data))
    return paths


def test_per_question_accuracies_match_hand_values() -> None:
    for qid, _, _, _, answers, prediction, expected in CASES:
        assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12), qid


def test_evaluate_vqa_official_report(tmp_path: Path) -> None:
    q, a, r = _write(tmp_path, *_official_files())
    assert evaluate_vqa(q, a, r) == EXPECTED_REPORT
    assert evaluate_vqa(*_official_files()) == EXPECTED_REPORT  # loaded objects work too
    report = score_vqa([c[5] for c in CASES], [c[4] for c in CASES])
    assert report == {"overall": 54.29, "perAnswerType": {}, "perQuestionType": {}}


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
args = json.loads(sys.stdin.read())
print(json.dumps(module.compute(**args)))
"""


def test_evaluate_module_loads_offline_and_matches(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = {"predictions": [c[5] for c in CASES], "references": [c[4] for c in CASES],
            "answer_types": [c[3] for c in CASES], "question_types": [c[2] for c in CASES]}
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], input=json.dumps(args), capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == EXPECTED_REPORT
    assert (tmp_path / "modules").is_dir()  # evaluate copied the script into the given cache
