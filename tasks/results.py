"""Results files in the official formats, and the references that score them (``fusionzoo eval results=``).

* VQA results: ``[{"question_id": int, "answer": str}, ...]``, the file the VQA evaluation
  server (EvalAI) takes for test-dev and test-std and that ``fusionzoo score vqa`` reads.
* VQA references: the split's questions and annotations in the official VQA v2 schema, both
  in one JSON object (``questions`` and ``annotations`` lists, with the official ``info``,
  ``task_type``, ``data_type``, ``data_subtype`` and ``license`` fields), so the one file is
  given as both ``--questions`` and ``--annotations``. Data with one answer a question
  (easy-VQA, yes/no sets; scored by exact match of the normalised answer) is written with
  that answer normalised ten times: the official code then asks the prediction to equal it
  exactly, which for answers from the model's (normalised) vocabulary is the exact match eval
  scores. Answer and question types the data lacks are written as ``unknown``.
* Caption results: ``[{"image_id", "caption"}, ...]`` (the COCO caption server's format,
  what ``fusionzoo score captions`` reads); references: a COCO captions file of the split's
  images (``images``, ``annotations`` with ``image_id``, ``id``, ``caption``).
* Classification results: JSON Lines, one ``{"id", "label", "probabilities": {label: p}}``
  object a line.

Every file is written atomically (:mod:`fusionzoo.io`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from fusionzoo.data.vqa_answers import normalize_answer
from fusionzoo.errors import FusionZooError
from fusionzoo.io import atomic_write, write_json_atomic

#: Human answers a VQA v2 question has; one-answer data repeats its answer this many times.
VQA_ANSWERS_PER_QUESTION = 10


class ResultsError(FusionZooError, ValueError):
    """A results or references file cannot be written as asked (names the key and the entry)."""


def write_vqa_results(path: str | os.PathLike, question_ids: Sequence[int], answers: Sequence[str]) -> None:
    """``[{"question_id", "answer"}, ...]``, in the given order."""
    write_json_atomic(path, [{"question_id": int(q), "answer": a} for q, a in zip(question_ids, answers)], indent=None)


def vqa_references(rows: Sequence[Mapping[str, Any]], split: str, source: str, one_answer: bool) -> dict[str, Any]:
    """The official questions and annotations of ``rows`` (dicts with ``question_id``, ``image_id``,
    ``question``, ``answers`` and, where the data has them, ``answer_type``, ``question_type``).

    ``one_answer``: exact-match data, written as its answer normalised ten times (see the module
    docstring); a question of such data with several answers is an error.
    """
    questions, annotations = [], []
    for row in rows:
        answers = list(row["answers"])
        if one_answer:
            if len(answers) != 1:
                raise ResultsError(f"key 'references': question_id {row['question_id']} of {source} split {split!r} "
                                   f"has {len(answers)} answers but the data is scored by exact match; expected one "
                                   "answer a question (or data scored by VQA accuracy)")
            answers = [normalize_answer(answers[0])] * VQA_ANSWERS_PER_QUESTION
        questions.append({"image_id": int(row["image_id"]), "question": row["question"],
                          "question_id": int(row["question_id"])})
        annotations.append({
            "question_id": int(row["question_id"]), "image_id": int(row["image_id"]),
            "question_type": row.get("question_type") or "unknown", "answer_type": row.get("answer_type") or "unknown",
            "multiple_choice_answer": row.get("multiple_choice_answer") or answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
        })
    return {"info": {"description": f"fusionzoo eval references of {source} split {split!r}"},
            "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "license": {},
            "questions": questions, "annotations": annotations}


def write_caption_results(path: str | os.PathLike, captions: Mapping[Hashable, str]) -> None:
    """``[{"image_id", "caption"}, ...]`` from ``image_id -> caption``."""
    write_json_atomic(path, [{"image_id": i, "caption": c} for i, c in captions.items()], indent=None)


def caption_references(references: Mapping[Hashable, Sequence[str]], split: str, source: str) -> dict[str, Any]:
    """A COCO captions file of ``image_id -> reference captions``."""
    annotations = [{"image_id": image_id, "id": 0, "caption": caption}
                   for image_id, captions in references.items() for caption in captions]
    for number, annotation in enumerate(annotations):
        annotation["id"] = number
    return {"info": {"description": f"fusionzoo eval references of {source} split {split!r}"}, "licenses": [],
            "type": "captions", "images": [{"id": image_id} for image_id in references], "annotations": annotations}


def write_references(path: str | os.PathLike, references: Mapping[str, Any]) -> None:
    """A references file (:func:`vqa_references`, :func:`caption_references`)."""
    write_json_atomic(path, references, indent=None)


def write_classification_results(path: str | os.PathLike, ids: Sequence[Any], label_names: Sequence[str],
                                 probabilities: Sequence[Sequence[float]]) -> None:
    """JSON Lines: ``{"id", "label", "probabilities": {label: p}}`` a row, ``label`` the most likely."""
    with atomic_write(path) as handle:
        for ident, row in zip(ids, probabilities):
            best = max(range(len(row)), key=row.__getitem__)
            handle.write(json.dumps({"id": ident, "label": label_names[best],
                                     "probabilities": dict(zip(label_names, map(float, row)))}) + "\n")
