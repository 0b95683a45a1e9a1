"""``fusionzoo score``: JSON round trips through a real process, one-line errors with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fusionzoo.cli import main
from fusionzoo.tasks.caption_eval import CAPTION_METRICS, tokenize_captions
from fusionzoo.tasks.vqa_eval import evaluate_vqa

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


VQARow = tuple[int, str, str, list[str], str]  # question_id, question_type, answer_type, answers, prediction

#: 3 questions, the same accuracies in both versions: 1.0 (yes 8/10), 0.6 (2 of 10 said "2"), 0.0.
VQA_ROWS: list[VQARow] = [(1, "is the", "yes/no", ["yes"] * 8 + ["no"] * 2, "yes"),
                          (2, "how many", "number", ["2"] * 2 + ["3"] * 8, "two"),
                          (3, "what color is the", "other", ["blue"] * 10, "red")]

#: Raw human answers (capitals, number words, articles, whitespace), accuracy by hand (current, legacy).
RAW_VQA_ROWS: list[VQARow] = [
    # current: "Yes" -> "yes", 6 match -> 1.0; legacy: the humans keep "Yes", "yes" matches none -> 0.0
    (1, "is the", "yes/no", ["Yes"] * 6 + ["no"] * 4, "yes"),
    # current: "two" -> "2", 4 match -> 1.0; legacy: the humans keep "two", 2 match -> 0.6
    (2, "how many", "number", ["two"] * 2 + ["2"] * 2 + ["3"] * 6, "2"),
    # current: "a dog" -> "dog", 3 match -> 0.9; legacy: the humans keep "a dog", 1 match -> 0.3
    (3, "what is the", "other", ["a dog"] * 2 + ["dog"] + ["the cat"] * 7, "dog"),
    # current: cleaned, all ten are "blue" -> 1.0; legacy: as stored they differ, "blue " is
    # kept (punctuation only), 1 match -> 0.3
    (4, "what color is the", "other", ["blue "] * 9 + ["blue"], "blue"),
    # humans agree: current "No." != "no" -> 0.0; legacy "No." -> "no", 10 match -> 1.0
    (5, "is it", "yes/no", ["no"] * 10, "No."),
]


def _vqa_files(folder: Path, rows: list[VQARow] = VQA_ROWS) -> list[str]:
    """Official-schema questions, annotations and results files of ``rows``."""
    questions = {"questions": [{"image_id": 7, "question": f"q{qid}?", "question_id": qid} for qid, *_ in rows]}
    annotations = {"annotations": [
        {"question_id": qid, "image_id": 7, "question_type": qtype, "answer_type": atype,
         "multiple_choice_answer": answers[-1],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
        for qid, qtype, atype, answers, _ in rows]}
    results = [{"question_id": qid, "answer": prediction} for qid, *_, prediction in rows]
    paths = [folder / "questions.json", folder / "annotations.json", folder / "results.json"]
    for path, data in zip(paths, (questions, annotations, results)):
        path.write_text(json.dumps(data))
    return [str(p) for p in paths]


REFERENCES = {
    5: ["A red bus parked at a bus stop.", "a double decker bus on the street", "The red bus waits by the curb.",
        "A bus stopped next to the sidewalk.", "a large red bus in a city"],
    6: ["A bird sitting on a tree branch.", "a small bird perched on a branch", "The bird rests in the tree.",
        "A brown bird on a twig.", "a sparrow sitting in a tree"],
    7: ["Two people playing tennis.", "a man and a woman on a tennis court", "People hitting tennis balls.",
        "Two players on a court with rackets.", "a doubles tennis match"],
}
CANDIDATES = {5: "a red bus on the street", 6: "a bird sitting on a branch", 7: "two people playing tennis"}


def _caption_files(folder: Path) -> list[str]:
    annotations = {"images": [{"id": i} for i in REFERENCES],
                   "annotations": [{"image_id": i, "caption": c} for i, refs in REFERENCES.items() for c in refs]}
    results = [{"image_id": i, "caption": c} for i, c in CANDIDATES.items()]
    ann, res = folder / "captions.json", folder / "captions_results.json"
    ann.write_text(json.dumps(annotations))
    res.write_text(json.dumps(results))
    return [str(ann), str(res)]


# --------------------------------------------------------------------------------------
# Round trips through `python -m fusionzoo score ...` (both processes run at once)
# --------------------------------------------------------------------------------------
# METEOR's Java process takes ~7 s of CPU to start; test_caption_eval checks its numbers,
# so here a plug-in (the CLI's own --import) stands in a fixed METEOR and the round trip
# checks the plumbing and the other scores.
FAKE_METEOR = """
import fusionzoo.tasks.caption_eval as caption_eval

caption_eval._meteor_score = lambda gts, res: 0.25
"""


@needs_java
def test_score_round_trips(tmp_path: Path) -> None:
    q, a, r = _vqa_files(tmp_path)
    ann, res = _caption_files(tmp_path)
    (tmp_path / "fake_meteor.py").write_text(FAKE_METEOR)
    commands = {
        "vqa": ["score", "vqa", "--questions", q, "--annotations", a, "--results", r,
                "--output", str(tmp_path / "out" / "vqa.json")],
        "captions": ["--import", str(tmp_path / "fake_meteor.py"),
                     "score", "captions", "--annotations", ann, "--results", res],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "fusionzoo", *argv], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in commands.items()}
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][1][-3000:]

    vqa = json.loads(outputs["vqa"][0])
    # (1.0 + 0.6 + 0.0) / 3 = 53.33%, in both versions
    assert vqa == evaluate_vqa(q, a, r) == evaluate_vqa(q, a, r, legacy_pre_2021=True) == {
        "overall": 53.33,
        "perAnswerType": {"yes/no": 100.0, "number": 60.0, "other": 0.0},
        "perQuestionType": {"is the": 100.0, "how many": 60.0, "what color is the": 0.0},
    }
    assert json.loads((tmp_path / "out" / "vqa.json").read_text()) == vqa

    captions = json.loads(outputs["captions"][0])
    assert list(captions) == [*CAPTION_METRICS, "SPICE", "notes"]
    assert captions["SPICE"] is None and "SPICE not computed" in captions["notes"]["SPICE"]
    assert captions["METEOR"] == 0.25
    # the Java-free scorers, recomputed here on the same PTB tokens
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = tokenize_captions(REFERENCES)
    hyp = tokenize_captions({i: [c] for i, c in CANDIDATES.items()})
    bleu, _ = Bleu(4).compute_score(gts, hyp, verbose=0)
    for n, value in enumerate(bleu, 1):
        assert captions[f"Bleu_{n}"] == pytest.approx(value, abs=1e-9)
    assert captions["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, hyp)[0], abs=1e-9)
    assert captions["CIDEr"] == pytest.approx(Cider().compute_score(gts, hyp)[0], abs=1e-9)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------
# The current official evaluation by default, the pre-2021 one on request
# --------------------------------------------------------------------------------------
def test_score_vqa_default_is_current_official_and_flag_is_pre_2021(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    q, a, r = _vqa_files(tmp_path, RAW_VQA_ROWS)
    argv = ["score", "vqa", "--questions", q, "--annotations", a, "--results", r, "--indent", "0"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    current = json.loads(out)
    # (1 + 1 + .9 + 1 + 0) / 5 = 3.9 / 5 = 78.0%
    assert current == evaluate_vqa(q, a, r) == {
        "overall": 78.0,
        "perAnswerType": {"yes/no": 50.0, "number": 100.0, "other": 95.0},  # (1+0)/2, 1/1, (.9+1)/2
        "perQuestionType": {"is the": 100.0, "how many": 100.0, "what is the": 90.0, "what color is the": 100.0,
                            "is it": 0.0},
    }

    code, out, err = _run([*argv, "--legacy-pre-2021"], capsys)
    assert code == 0, err
    legacy = json.loads(out)
    # (0 + .6 + .3 + .3 + 1) / 5 = 2.2 / 5 = 44.0%
    assert legacy == evaluate_vqa(q, a, r, legacy_pre_2021=True) == {
        "overall": 44.0,
        "perAnswerType": {"yes/no": 50.0, "number": 60.0, "other": 30.0},  # (0+1)/2, .6/1, (.3+.3)/2
        "perQuestionType": {"is the": 0.0, "how many": 60.0, "what is the": 30.0, "what color is the": 30.0,
                            "is it": 100.0},
    }


# --------------------------------------------------------------------------------------
# Errors: exit status 2, one line naming the file and the entry
# --------------------------------------------------------------------------------------


def _edit_json(path: str, edit: Any) -> None:
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def test_vqa_bad_result_exits_2_naming_file_and_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, a, r = _vqa_files(tmp_path)
    _edit_json(r, lambda rows: rows[1].pop("answer"))
    code, out, err = _run(["score", "vqa", "--questions", q, "--annotations", a, "--results", r], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("fusionzoo score: error: ")
    assert "results.json, results[1] (question_id=2): missing key 'answer'" in err


def test_vqa_missing_results_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, a, r = _vqa_files(tmp_path)
    _edit_json(r, lambda rows: rows.pop())
    code, _, err = _run(["score", "vqa", "--questions", q, "--annotations", a, "--results", r], capsys)
    assert code == 2 and "results.json: no result for 1 of 3 annotated questions (question_id 3)" in err


def test_vqa_missing_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, a, _ = _vqa_files(tmp_path)
    code, _, err = _run(["score", "vqa", "--questions", q, "--annotations", a, "--results", "nope.json"], capsys)
    assert code == 2 and "nope.json: results file not found" in err


def test_captions_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann, res = _caption_files(tmp_path)
    _edit_json(res, lambda rows: rows.append({"image_id": 5, "caption": "again"}))
    code, out, err = _run(["score", "captions", "--annotations", ann, "--results", res], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "captions_results.json, results[3] (image_id=5): a second caption for image_id 5" in err


def test_captions_without_java_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ann, res = _caption_files(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = _run(["score", "captions", "--annotations", ann, "--results", res], capsys)
    assert code == 2 and "no `java` was found on PATH" in err and "default-jre-headless" in err
    assert len(err.strip().splitlines()) == 1


def test_score_without_kind_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["score"], capsys)
    assert code == 2 and "{vqa,captions,retrieval}" in err
    with pytest.raises(SystemExit) as info:
        main(["score", "vqa", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "v2_OpenEnded_mscoco_<split>_questions.json" in text and "leave-one-out" in text
    assert "--legacy-pre-2021" in text and "March 2021" in text
    with pytest.raises(SystemExit):
        main(["score", "captions", "--help"])
    text = capsys.readouterr().out
    assert "SPICE" in text and "java" in text.lower()
    with pytest.raises(SystemExit) as info:
        main(["score", "vqa", "--questions", "q.json"])  # argparse: missing required options
    assert info.value.code == 2
