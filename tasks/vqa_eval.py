"""VQA accuracy as the official VQA evaluation computes it, plus answer-vocabulary helpers.

Follows Antol et al., 2015, "VQA: Visual Question Answering" (section 2, the
accuracy metric) and the behaviour of the official evaluation code
(GT-Vision-Lab/VQA, ``vqaEval.py``), re-implemented here. By default it is the
code as it stands since its March 2021 fix ("Fixed processing answers bug",
commit ``a013f00``); the code before that fix is available with
``legacy_pre_2021=True``.

* **Answer processing.** Three steps, each a function here. Whitespace
  (:func:`clean_whitespace`): newlines and tabs become spaces and the answer is
  stripped. Punctuation (:func:`process_punctuation`): each character of
  ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
  space somewhere in the answer, or when the answer contains a digit-comma-digit
  group (``1,000``), and is replaced by a space otherwise; then periods not
  followed by a digit are deleted (so ``3.5`` keeps its period); apostrophes are
  not punctuation. Words (:func:`process_digit_article`): the answer is
  lower-cased and split on whitespace; the number words ``none``/``zero`` ..
  ``ten`` become digits, the articles ``a``, ``an``, ``the`` are dropped, and
  contractions written without their apostrophe (``dont``) get it back
  (``don't``) from the official table. :func:`normalize_answer` is all three.
  No step lower-cases except the word step.
* **What is processed (default, the official code since 2021).** The ten human
  answers and the prediction are whitespace-cleaned. Then, only when the
  cleaned human answers are not all identical, both the human answers and the
  prediction go through the punctuation and word steps. When the humans agree,
  the cleaned prediction must equal their answer exactly: ``"Yes"`` and
  ``"yes."`` against ten ``"yes"`` score 0, as does ``"2"`` against ten
  ``"two"``, while ``"t-shirt"`` against ten ``"t-shirt"`` scores 1.
* **What is processed (``legacy_pre_2021=True``, the official code before the
  fix).** The prediction always goes through all three steps. The human answers
  are never whitespace-cleaned; only when they are not all identical (as
  stored) do they go through the punctuation step, and only that step: no
  lower-casing, number mapping or article removal. So ``"two"`` against ten
  ``"2"`` scores 1, ``"t-shirt"`` against ten ``"t-shirt"`` scores 0, and
  human answers that are not already normalised (``"Yes"``, ``"two"``,
  ``"a dog"``) never match. The two versions agree when the human answers and
  the prediction are both already in :func:`normalize_answer`'s form; on raw
  human answers they can differ by tens of points.
* **Accuracy.** For each of the ``n`` leave-one-out subsets of the ``n`` (10)
  human answers, ``min(1, #matches / 3)``; the question's accuracy is the mean
  over the subsets. So 1 matching human answer scores 0.3, 2 score 0.6, 3 score
  0.9 and 4 or more score 1.0. A question with a single human answer always
  scores 0 (its only subset is empty): use :func:`exact_match_accuracy` for
  one-answer datasets.
* **Report.** ``overall``, ``perAnswerType`` and ``perQuestionType`` are means of
  the unrounded per-question accuracies in percent, rounded to two decimals with
  Python's ``round`` as the official code does. The official code needs a result
  for every annotated question and no other; so does :func:`evaluate_vqa`.

Training targets (:func:`answer_scores`, :func:`soft_scores`,
:func:`build_answer_vocab`) always use :func:`normalize_answer` on every human
answer, whatever the scoring version. Bad input raises :class:`ScoreInputError`,
whose message names the file, the entry and what was expected. This module
needs only the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionzoo.data.vqa_answers import (  # the official answer processing; re-exported here
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    answer_scores,
    build_answer_vocab,
    clean_whitespace,
    leave_one_out,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    soft_scores,
)
from fusionzoo.errors import FusionZooError

# --------------------------------------------------------------------------------------
# Errors and input files (shared with caption_eval)
# --------------------------------------------------------------------------------------
#: How many offending ids an error message quotes.
SHOW_FIRST = 5


class ScoreInputError(FusionZooError, ValueError):
    """Bad input to a scorer: names the file, the entry and what was expected.

    Args:
        problem: what is wrong ("missing key 'answer'").
        file: the file concerned, or a label such as ``"<results>"`` for in-memory input.
        entry: which entry of the file (``"annotations[3] (question_id=1638)"``).
        expected: what correct input holds ("a string").

    The message is one line: ``"<file>, <entry>: <problem>; expected <expected>"``.
    The parts are kept as attributes for programs.
    """

    def __init__(self, problem: str, *, file: str | None = None, entry: str | None = None,
                 expected: str | None = None) -> None:
        self.problem = problem
        self.file = file
        self.entry = entry
        self.expected = expected
        where = ", ".join(part for part in (file, entry) if part)
        message = f"{where}: {problem}" if where else problem
        if expected:
            message += f"; expected {expected}"
        super().__init__(message)


def load_json_input(source: str | os.PathLike | Any, label: str) -> tuple[Any, str]:
    """Read ``source`` if it is a path, else take it as already-loaded JSON.

    Args:
        source: a path to a JSON file, or the loaded object (dict or list).
        label: the name used in errors for in-memory input (``"results"``).

    Returns:
        ``(data, name)``: the loaded object and the name errors should use
        (the path, or ``"<label>"``).
    """
    if not isinstance(source, (str, os.PathLike)):
        return source, f"<{label}>"
    path = Path(source)
    if not path.is_file():
        raise ScoreInputError(f"{label} file not found", file=str(path), expected="an existing JSON file")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle), str(path)
    except json.JSONDecodeError as exc:
        raise ScoreInputError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                              file=str(path), expected=f"a JSON {label} file") from None
    except UnicodeDecodeError as exc:
        raise ScoreInputError(f"not UTF-8 text ({exc.reason})", file=str(path),
                              expected=f"a JSON {label} file") from None


def entry_label(list_name: str, index: int, key: str, record: Any) -> str:
    """``"annotations[3] (question_id=1638)"``, or ``"annotations[3]"`` without the id."""
    ident = record.get(key) if isinstance(record, Mapping) else None
    return f"{list_name}[{index}] ({key}={ident!r})" if ident is not None else f"{list_name}[{index}]"


def require_key(record: Any, key: str, types: type | tuple[type, ...], *, file: str, entry: str,
                what: str) -> Any:
    """``record[key]`` after checking that it exists and has one of ``types`` (bool is never an int)."""
    if not isinstance(record, Mapping):
        raise ScoreInputError(f"entry is a {type(record).__name__}", file=file, entry=entry,
                              expected=f"a JSON object ({what})")
    if key not in record:
        raise ScoreInputError(f"missing key {key!r}", file=file, entry=entry, expected=what)
    value = record[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ScoreInputError(f"{key!r} is {type(value).__name__} {value!r:.60}", file=file, entry=entry,
                              expected=f"{key!r} to be {names}")
    return value


def require_list(data: Any, key: str | None, *, file: str, what: str) -> list[Any]:
    """The top-level list of a file: ``data[key]``, or ``data`` itself when ``key`` is None."""
    if key is None:
        if not isinstance(data, list):
            raise ScoreInputError(f"the top level is a {type(data).__name__}", file=file,
                                  expected=f"a JSON list ({what})")
        return data
    if not isinstance(data, Mapping) or key not in data:
        found = f"keys {sorted(data)[:8]}" if isinstance(data, Mapping) else f"a {type(data).__name__}"
        raise ScoreInputError(f"no top-level {key!r} list (found {found})", file=file, expected=what)
    if not isinstance(data[key], list):
        raise ScoreInputError(f"{key!r} is a {type(data[key]).__name__}", file=file, expected=f"a list ({what})")
    return data[key]


def quote_ids(ids: Iterable[Any]) -> str:
    """The first few ids, for an error message."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:SHOW_FIRST])
    return shown + (f", ... ({len(ids) - SHOW_FIRST} more)" if len(ids) > SHOW_FIRST else "")


# --------------------------------------------------------------------------------------
# Accuracy of one question
# --------------------------------------------------------------------------------------
def _official_pair(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """Prediction and human answers as the current official code compares them.

    Both whitespace-cleaned; then, when the cleaned human answers are not all
    identical, both through the punctuation and word steps.
    """
    references = [clean_whitespace(answer) for answer in answers]
    if len(set(references)) > 1:
        return normalize_answer(prediction), [normalize_answer(answer) for answer in references]
    return clean_whitespace(prediction), references


def _legacy_pair(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """Prediction and human answers as the official code compared them before its 2021 fix.

    The prediction through all three steps; the human answers as stored, or,
    when they are not all identical, through the punctuation step only.
    """
    references = list(answers)
    if len(set(references)) > 1:
        references = [process_punctuation(answer) for answer in references]
    return normalize_answer(prediction), references


def vqa_accuracy(prediction: str, answers: Sequence[str], *, legacy_pre_2021: bool = False) -> float:
    """Accuracy (0..1) of one predicted answer against the human answers of its question.

    Args:
        prediction: the model's answer, raw (it is processed as the official code does).
        answers: the human answers (10 in VQA v2), raw, as stored in the annotation file.
        legacy_pre_2021: score as the official code did before its March 2021 fix
            instead of as it does now (see the module docstring).

    Returns:
        The mean over the leave-one-out subsets of ``min(1, #matches / 3)``; with
        10 answers: 0.3 per matching answer, at most 1.0.

    By default both sides are whitespace-cleaned, and both get the punctuation
    and word steps only when the human answers are not all identical. With
    ``legacy_pre_2021`` the prediction always gets every step and the human
    answers get the punctuation step only, and only when they disagree.

    >>> answers = ["two"] * 5 + ["3"] * 5
    >>> vqa_accuracy("two", answers), vqa_accuracy("two", answers, legacy_pre_2021=True)
    (1.0, 0.0)
    """
    if not isinstance(prediction, str):
        raise TypeError(f"a prediction must be a str, got {type(prediction).__name__} {prediction!r:.60}")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list of strings, got {type(answers).__name__}")
    if not answers:
        raise ValueError("answers is empty; expected the human answers of the question (10 in VQA v2)")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"answers must be a list of strings, got an element of type "
                            f"{type(answer).__name__}: {answer!r:.60}")
    candidate, references = (_legacy_pair if legacy_pre_2021 else _official_pair)(prediction, answers)
    return leave_one_out(candidate, references)


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Fraction (0..1) of predictions equal to their answer after :func:`normalize_answer`.

    For datasets with one answer per question (easy-VQA, the yes/no JSONL). Each
    element of ``answers`` is the answer, or a list of acceptable answers (any
    one matching counts).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers; expected one answer per prediction")
    if not predictions:
        raise ValueError("no predictions to score")
    correct = 0
    for prediction, accepted in zip(predictions, answers):
        accepted = [accepted] if isinstance(accepted, str) else accepted
        correct += normalize_answer(prediction) in {normalize_answer(answer) for answer in accepted}
    return correct / len(predictions)


# --------------------------------------------------------------------------------------
# Accuracy of a set of questions
# --------------------------------------------------------------------------------------
def _percent(values: Sequence[float], digits: int) -> float:
    """The official aggregate: ``round(100 * sum / count, digits)``, in that order of operations."""
    return round(100 * float(sum(values)) / len(values), digits)


def score_vqa(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]],
              answer_types: Sequence[str] | None = None, question_types: Sequence[str] | None = None,
              digits: int = 2, *, legacy_pre_2021: bool = False) -> dict[str, Any]:
    """The official report over many questions, from plain lists.

    Args:
        predictions: one raw predicted answer per question.
        answer_lists: the raw human answers of each question.
        answer_types: optional answer type per question (``yes/no``, ``number``, ``other``).
        question_types: optional question type per question (``what color is the``, ...).
        digits: decimals of the rounded percentages (the official 2).
        legacy_pre_2021: score as the official code did before its March 2021 fix
            instead of as it does now (see :func:`vqa_accuracy`).

    Returns:
        ``{"overall": %, "perAnswerType": {type: %}, "perQuestionType": {type: %}}``;
        the per-type dicts are empty when the types are not given, and list the
        types in order of first appearance.
    """
    count = len(predictions)
    for name, values in (("answer_lists", answer_lists), ("answer_types", answer_types),
                         ("question_types", question_types)):
        if values is not None and len(values) != count:
            raise ValueError(f"{count} predictions but {len(values)} {name}; expected one per prediction")
    if count == 0:
        raise ValueError("no predictions to score")
    accuracies = [vqa_accuracy(prediction, answers, legacy_pre_2021=legacy_pre_2021)
                  for prediction, answers in zip(predictions, answer_lists)]
    report: dict[str, Any] = {"overall": _percent(accuracies, digits), "perAnswerType": {}, "perQuestionType": {}}
    for key, types in (("perAnswerType", answer_types), ("perQuestionType", question_types)):
        groups: dict[str, list[float]] = {}
        for kind, accuracy in zip(types or (), accuracies):
            groups.setdefault(kind, []).append(accuracy)
        report[key] = {kind: _percent(values, digits) for kind, values in groups.items()}
    return report


_QUESTION_SCHEMA = "{'image_id', 'question', 'question_id'} (v2_OpenEnded_mscoco_<split>_questions.json)"
_ANNOTATION_SCHEMA = ("{'question_id', 'question_type', 'answer_type', 'answers': [{'answer', ...}]} "
                      "(v2_mscoco_<split>_annotations.json)")
_RESULT_SCHEMA = "{'question_id': int, 'answer': str}"


def _read_annotations(data: Any, file: str) -> dict[int, dict[str, Any]]:
    """question_id -> {answers, answer_type, question_type, entry}, schema-checked."""
    annotations: dict[int, dict[str, Any]] = {}
    for index, record in enumerate(require_list(data, "annotations", file=file, what=_ANNOTATION_SCHEMA)):
        entry = entry_label("annotations", index, "question_id", record)
        question_id = require_key(record, "question_id", int, file=file, entry=entry, what=_ANNOTATION_SCHEMA)
        if question_id in annotations:
            raise ScoreInputError(f"question_id {question_id} appears twice (first at {annotations[question_id]['entry']})",
                                  file=file, entry=entry, expected="one annotation per question")
        answer_type = require_key(record, "answer_type", str, file=file, entry=entry, what=_ANNOTATION_SCHEMA)
        question_type = require_key(record, "question_type", str, file=file, entry=entry, what=_ANNOTATION_SCHEMA)
        answers = require_key(record, "answers", list, file=file, entry=entry, what=_ANNOTATION_SCHEMA)
        if not answers:
            raise ScoreInputError("'answers' is empty", file=file, entry=entry, expected="the human answers (10 in VQA v2)")
        texts = [require_key(answer, "answer", str, file=file, entry=f"{entry}.answers[{j}]",
                             what="{'answer': str, 'answer_confidence', 'answer_id'}")
                 for j, answer in enumerate(answers)]
        annotations[question_id] = {"answers": texts, "answer_type": answer_type,
                                    "question_type": question_type, "entry": entry}
    if not annotations:
        raise ScoreInputError("'annotations' is empty", file=file, expected="at least one annotated question")
    return annotations


def _check_questions(data: Any, file: str, annotations: Mapping[int, Mapping[str, Any]], annotations_file: str) -> None:
    """The questions file must hold exactly the annotated questions (same split)."""
    question_ids: set[int] = set()
    for index, record in enumerate(require_list(data, "questions", file=file, what=_QUESTION_SCHEMA)):
        entry = entry_label("questions", index, "question_id", record)
        question_ids.add(require_key(record, "question_id", int, file=file, entry=entry, what=_QUESTION_SCHEMA))
        require_key(record, "question", str, file=file, entry=entry, what=_QUESTION_SCHEMA)
    unasked = [qid for qid in annotations if qid not in question_ids]
    if unasked:
        raise ScoreInputError(f"{len(unasked)} annotated questions are not in the questions file {file} "
                              f"(question_id {quote_ids(unasked)})", file=annotations_file,
                              entry=annotations[unasked[0]]["entry"],
                              expected="the questions and annotations files of the same split")
    unanswered = sorted(question_ids.difference(annotations))
    if unanswered:
        raise ScoreInputError(f"{len(unanswered)} questions have no annotation in {annotations_file} "
                              f"(question_id {quote_ids(unanswered)})", file=file,
                              expected="the questions and annotations files of the same split")


def _read_results(data: Any, file: str, annotations: Mapping[int, Any], annotations_file: str) -> dict[int, str]:
    """question_id -> raw predicted answer; every annotated question exactly once."""
    results: dict[int, str] = {}
    first_entry: dict[int, str] = {}
    for index, record in enumerate(require_list(data, None, file=file, what=f"[{_RESULT_SCHEMA}, ...]")):
        entry = entry_label("results", index, "question_id", record)
        question_id = require_key(record, "question_id", int, file=file, entry=entry, what=_RESULT_SCHEMA)
        answer = require_key(record, "answer", str, file=file, entry=entry, what=_RESULT_SCHEMA)
        if question_id not in annotations:
            raise ScoreInputError(f"question_id {question_id} is not in the annotations ({annotations_file})",
                                  file=file, entry=entry, expected="results only for annotated questions")
        if question_id in results:
            raise ScoreInputError(f"a second result for question_id {question_id} (first at {first_entry[question_id]})",
                                  file=file, entry=entry, expected="one result per question")
        results[question_id] = answer
        first_entry[question_id] = entry
    missing = [qid for qid in annotations if qid not in results]
    if missing:
        raise ScoreInputError(f"no result for {len(missing)} of {len(annotations)} annotated questions "
                              f"(question_id {quote_ids(missing)})", file=file,
                              expected="a result for every question of the annotations, as the official evaluation requires")
    return results


def evaluate_vqa(questions_json: str | os.PathLike | Mapping[str, Any],
                 annotations_json: str | os.PathLike | Mapping[str, Any],
                 results_json: str | os.PathLike | Sequence[Mapping[str, Any]], *,
                 legacy_pre_2021: bool = False) -> dict[str, Any]:
    """Official VQA v2 accuracy of a results file.

    By default the numbers of the official evaluation code as it is now (since
    its March 2021 fix); with ``legacy_pre_2021`` those of the code before it.
    The human answers are read as stored, without any normalisation beyond
    what the chosen version applies (see the module docstring).

    Args:
        questions_json: ``v2_OpenEnded_mscoco_<split>_questions.json`` (path or loaded):
            ``{"questions": [{"image_id", "question", "question_id"}, ...]}``.
        annotations_json: ``v2_mscoco_<split>_annotations.json`` (path or loaded):
            ``{"annotations": [{"question_id", "question_type", "answer_type",
            "answers": [{"answer", "answer_confidence", "answer_id"}] * 10, ...}]}``.
        results_json: the results (path or loaded): ``[{"question_id", "answer"}, ...]``,
            one per annotated question.
        legacy_pre_2021: score as the official code did before its March 2021 fix.

    Returns:
        ``{"overall": %, "perAnswerType": {type: %}, "perQuestionType": {type: %}}``,
        rounded to two decimals as the official evaluation reports.

    Raises:
        ScoreInputError: a missing key or wrong type (naming the file and entry),
            questions and annotations of different splits, a result for an unknown
            question or a repeated one, or questions without a result (how many).
    """
    annotations_data, annotations_file = load_json_input(annotations_json, "annotations")
    annotations = _read_annotations(annotations_data, annotations_file)
    questions_data, questions_file = load_json_input(questions_json, "questions")
    _check_questions(questions_data, questions_file, annotations, annotations_file)
    results_data, results_file = load_json_input(results_json, "results")
    results = _read_results(results_data, results_file, annotations, annotations_file)
    question_ids = list(annotations)  # the official order: that of the annotation file
    return score_vqa(
        [results[qid] for qid in question_ids],
        [annotations[qid]["answers"] for qid in question_ids],
        answer_types=[annotations[qid]["answer_type"] for qid in question_ids],
        question_types=[annotations[qid]["question_type"] for qid in question_ids],
        legacy_pre_2021=legacy_pre_2021,
    )


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "ScoreInputError",
    "answer_scores",
    "build_answer_vocab",
    "clean_whitespace",
    "evaluate_vqa",
    "exact_match_accuracy",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "score_vqa",
    "soft_scores",
    "vqa_accuracy",
]
