"""Visual question answering data: VQA v2, easy-VQA and JSONL behind one interface.

Three sources, one result (:class:`VQAData`):

* ``vqa-v2`` -- the official VQA v2 files (Goyal et al., 2017, "Making the V in
  VQA Matter"): ``v2_OpenEnded_mscoco_<subtype>_questions.json`` and
  ``v2_mscoco_<subtype>_annotations.json`` (10 human answers per question, with
  ``answer_type``, ``question_type``, ``multiple_choice_answer``), COCO images at
  ``<image_root>/<subtype>/COCO_<subtype>_<12-digit image id>.jpg``. Splits are
  named by the subtype without its year (``train2014`` -> ``train``,
  ``test-dev2015`` -> ``test-dev``); a questions file without annotations is an
  unlabeled split. Metric ``vqa``.
* ``easy-vqa`` -- the synthetic shapes dataset of the ``easy-vqa`` package (train
  38,575 / test 9,673 questions), the zero-set-up default. Metric ``exact_match``.
* ``vqa-jsonl`` -- one JSON object a line with ``image`` (a path under the image
  root), ``question`` and ``answers`` (a list), optionally ``question_id``,
  ``image_id``, ``answer_type``, ``question_type`` (the format of
  ``coco-vqa-mini/vqa/yesno_*.jsonl``). Metric ``exact_match`` when every
  question has one answer, else ``vqa``.

Answers: the vocabulary is the ``answers_top_k`` most frequent *normalised*
answers of the ``train`` split seen at least ``answers_min_count`` times
(:func:`fusionzoo.data.vqa_answers.build_answer_vocab`), built from every
schema-valid training question whether or not its image is on disk, so it does
not change with the splits requested or the images present; pass ``answers=`` to
reuse a model's vocabulary. Each question's target is stored sparsely
(``target_ids``, ``target_scores``): for a question with several answers, VQA
v2's soft scores (:func:`~fusionzoo.data.vqa_answers.soft_scores`; with 10 answers
0.3 per matching answer, at most 1.0); for a question with one answer, 1.0 on
it. Questions whose answers are all outside the vocabulary are kept with an
all-zero target.

Rows hold image paths; see :meth:`TaskData.with_image_transform` for pixels and
:meth:`VQAData.collator` for batches. Bad input (see :mod:`fusionzoo.data.common`)
raises :class:`~fusionzoo.data.common.DataError` naming the file and entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Features, Sequence as ListOf, Value
from torch import Tensor

from fusionzoo.registry import register_dataset

from .checks import (
    DataError,
    MissingRootError,
    PathLike,
    ProblemLog,
    iter_jsonl,
    json_entry,
    jsonl_entry,
    read_json,
    require,
    require_str_list,
)
from .common import (
    TaskData,
    Tokenize,
    discover_files,
    find_image_dir,
    keep_present,
    resolve_files,
    rows_to_dataset,
    safe_join,
    select_splits,
    split_order,
    stack_pixels,
    tokenize_texts,
    verify_rows,
)
from .vqa_answers import build_answer_vocab, normalize_answer, soft_scores

#: Default size of the answer vocabulary (the 3,129 answers of ViLT / bottom-up top-down on VQA v2).
DEFAULT_TOP_K = 3129

#: Columns every VQA split has.
BASE_FEATURES = {
    "question_id": Value("int64"),
    "image_id": Value("int64"),  # -1 when the source has none
    "image_path": Value("string"),
    "question": Value("string"),
    "answers": ListOf(Value("string")),  # raw answers as annotated; empty for an unlabeled split
    "target_ids": ListOf(Value("int32")),  # answer indices with a non-zero score
    "target_scores": ListOf(Value("float32")),  # their scores in (0, 1]
}
#: Columns kept when the source has them.
OPTIONAL_FEATURES = {
    "answer_type": Value("string"),
    "question_type": Value("string"),
    "multiple_choice_answer": Value("string"),
}


# --------------------------------------------------------------------------------------
# The loaded data and its batches
# --------------------------------------------------------------------------------------
@dataclass
class VQACollator:
    """Collate VQA items into a batch for ``FusionModel.forward``.

    Args:
        tokenize: ``TextEncoder.tokenize``-like ``(texts, max_length) -> {"input_ids", "attention_mask"}``.
        num_answers: size ``A`` of the answer vocabulary.
        max_length: longest question in tokens.

    Returns (from ``__call__``):
        ``pixel_values`` (B, 3, H, W) when items have pixels; ``input_ids``,
        ``attention_mask`` (B, T); ``labels`` (B, A) float soft scores;
        ``question_id`` (B,) long (metadata).
    """

    tokenize: Tokenize
    num_answers: int
    max_length: int = 32
    #: The column whose text an item tokenizes (the feature cache keys text states by it).
    text_key: ClassVar[str] = "question"

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        pixels = stack_pixels(items)  # (B, 3, H, W) or None
        if pixels is not None:
            batch["pixel_values"] = pixels
        batch.update(tokenize_texts(self.tokenize, [item[self.text_key] for item in items], self.max_length))
        labels = torch.zeros(len(items), self.num_answers)  # (B, A)
        for i, item in enumerate(items):
            if item["target_ids"]:
                labels[i, torch.as_tensor(item["target_ids"], dtype=torch.long)] = torch.as_tensor(
                    item["target_scores"], dtype=labels.dtype
                )
        batch["labels"] = labels
        batch["question_id"] = torch.as_tensor([item["question_id"] for item in items], dtype=torch.long)  # (B,)
        return batch


@dataclass(kw_only=True)
class VQAData(TaskData):
    """VQA splits with their answer vocabulary (see the module docstring).

    Attributes:
        answers: the answer vocabulary; index ``a`` is logit ``a`` of the VQA head.
        metric: ``vqa`` (10-answer VQA accuracy) or ``exact_match``.
    """

    answers: list[str]
    task: str = "vqa"
    id_key: str = "question_id"
    answer_to_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.answer_to_index = {answer: i for i, answer in enumerate(self.answers)}

    def collator(self, tokenize: Tokenize, max_length: int = 32) -> VQACollator:
        """The batch function for a DataLoader over these splits."""
        return VQACollator(tokenize, len(self.answers), max_length)


# --------------------------------------------------------------------------------------
# Shared steps: vocabulary, targets, image checks, datasets
# --------------------------------------------------------------------------------------
def _targets(answers: list[str], index: dict[str, int]) -> tuple[list[int], list[float]]:
    """Sparse target of one question: answer indices and their scores (see the module docstring)."""
    if not answers:
        return [], []
    if len(answers) == 1:  # one answer: a hard target on it (leave-one-out soft scores would all be 0)
        idx = index.get(normalize_answer(answers[0]))
        return ([idx], [1.0]) if idx is not None else ([], [])
    pairs = sorted(soft_scores(answers, index).items())  # [(answer index, score)], scores > 0
    return [i for i, _ in pairs], [float(s) for _, s in pairs]


@dataclass
class _ParsedSplit:
    """Schema-checked rows of one split, before the image checks."""

    rows: list[dict[str, Any]]
    log: ProblemLog
    source: Path
    describe: Callable[[dict[str, Any]], str]  # row -> entry label


def _build(
    name: str,
    parsed: dict[str, _ParsedSplit],
    wanted: list[str],
    *,
    image_root: Path,
    metric: str,
    answers: Sequence[str] | None,
    answers_top_k: int,
    answers_min_count: int,
    only_present: bool,
    verify_images: bool,
    optional: Sequence[str] = (),
) -> VQAData:
    """Vocabulary from ``parsed["train"]``, targets, image checks, one Dataset per wanted split."""
    for part in parsed.values():
        if not part.rows:  # every entry was bad: warn and fail before building a vocabulary from nothing
            part.log.finish(0, part.source)
    if answers is not None:
        vocab = list(answers)
    elif "train" in parsed:
        vocab = list(build_answer_vocab([row["answers"] for row in parsed["train"].rows if row["answers"]],
                                        top_k=answers_top_k, min_count=answers_min_count))
    else:
        raise DataError(
            f"dataset {name!r} has no 'train' split to build the answer vocabulary from "
            f"(splits: {', '.join(parsed)})",
            expected="a train split, or answers=[...] (e.g. a trained model's vocabulary)",
        )
    if not vocab:
        raise DataError(f"the answer vocabulary of {name!r} is empty",
                        file=parsed["train"].source if "train" in parsed else None,
                        expected=f"answers seen at least answers_min_count={answers_min_count} times in train")
    index = {answer: i for i, answer in enumerate(vocab)}
    features = Features({**BASE_FEATURES, **{key: OPTIONAL_FEATURES[key] for key in optional}})

    splits, reports = {}, {}
    for split in wanted:
        part = parsed[split]
        rows = keep_present(part.rows, part.log, source=part.source, only_present=only_present,
                            describe=part.describe)
        if verify_images:
            rows = verify_rows(rows, part.log, source=part.source, describe=part.describe)
        for row in rows:
            row["target_ids"], row["target_scores"] = _targets(row["answers"], index)
        reports[split] = part.log.finish(len(rows), part.source)
        splits[split] = rows_to_dataset(rows, features)
    return VQAData(name=name, splits=splits, image_root=image_root, metric=metric, reports=reports, answers=vocab)


def _describe_question(row: dict[str, Any]) -> str:
    return row["_entry"]


# --------------------------------------------------------------------------------------
# easy-VQA
# --------------------------------------------------------------------------------------
EASY_VQA_SPLITS = ("train", "test")


def easy_vqa_root() -> Path:
    """The data folder of the installed ``easy-vqa`` package (``train/``, ``test/``, ``answers.txt``)."""
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("easy-VQA needs the 'easy-vqa' package: pip install easy-vqa") from exc
    return Path(easy_vqa.__file__).resolve().parent / "data"


def _easy_vqa_questions(root: Path | None, split: str) -> tuple[list[Any], Path]:
    """The ``[question, answer, image_id]`` triples of a split, from the package API or ``root``."""
    if root is None:
        import easy_vqa

        getter = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
        texts, answers, image_ids = getter()
        return [list(t) for t in zip(texts, answers, image_ids)], easy_vqa_root() / split / "questions.json"
    source = root / split / "questions.json"
    return read_json(source, what="easy-VQA questions file"), source


def _parse_easy_vqa(records: Any, source: Path, image_dir: Path, split: str, skip_bad: bool) -> _ParsedSplit:
    log = ProblemLog(split, skip_bad)
    if not isinstance(records, list):
        raise DataError(f"top level is {type(records).__name__}", file=source,
                        expected="a list of [question, answer, image_id] triples")
    rows = []
    for i, record in enumerate(records):
        entry = json_entry("questions", i)
        try:
            if not (isinstance(record, list) and len(record) == 3):
                raise DataError(f"entry is {type(record).__name__} {record!r:.60}", file=source, entry=entry,
                                expected="a [question, answer, image_id] triple")
            question, answer, image_id = record
            if not isinstance(question, str) or not isinstance(answer, str) or isinstance(image_id, bool) \
                    or not isinstance(image_id, int):
                raise DataError(f"entry has types ({type(question).__name__}, {type(answer).__name__}, "
                                f"{type(image_id).__name__})", file=source, entry=entry,
                                expected="(string, string, integer)")
        except DataError as error:
            log.bad(error)
            continue
        rows.append({"question_id": i, "image_id": image_id, "question": question, "answers": [answer],
                     "image_path": str(image_dir / f"{image_id}.png"), "_entry": entry})
    return _ParsedSplit(rows, log, source, _describe_question)


def load_easy_vqa(
    root: PathLike | None = None,
    *,
    splits: str | Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
    answers_top_k: int = DEFAULT_TOP_K,
    answers_min_count: int = 1,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> VQAData:
    """easy-VQA (train 38,575 / test 9,673 questions on 4,000 / 1,000 PNG images).

    Args:
        root: a folder laid out like the package's data (``<split>/questions.json``
            with ``[question, answer, image_id]`` triples, ``<split>/images/<id>.png``);
            default: the installed ``easy-vqa`` package, read with its API.
        splits: ``train``, ``test`` or both (default).
        answers, answers_top_k, answers_min_count: see the module docstring.
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    base = Path(root) if root is not None else None
    data_root = base if base is not None else easy_vqa_root()
    wanted = select_splits(EASY_VQA_SPLITS, splits, source=data_root)
    needed = list(dict.fromkeys(wanted + ([] if answers is not None else ["train"])))
    parsed = {}
    for split in needed:
        records, source = _easy_vqa_questions(base, split)
        parsed[split] = _parse_easy_vqa(records, source, data_root / split / "images", split, skip_bad)
    return _build("easy-vqa", parsed, wanted, image_root=data_root, metric="exact_match", answers=answers,
                  answers_top_k=answers_top_k, answers_min_count=answers_min_count,
                  only_present=only_present, verify_images=verify_images)


# --------------------------------------------------------------------------------------
# VQA v2 (official files)
# --------------------------------------------------------------------------------------
_V2_QUESTIONS = re.compile(r"^v2_OpenEnded_mscoco_(?P<subtype>.+)_questions\.json$")


def vqa_v2_split_name(subtype: str) -> str:
    """``train2014`` -> ``train``, ``test-dev2015`` -> ``test-dev``: the subtype without its year."""
    return re.sub(r"\d{4}$", "", subtype) or subtype


def _v2_image_folder(subtype: str) -> str:
    """Folder (and file-name infix) of a subtype's images; test-dev images live in ``test2015``."""
    return subtype.replace("test-dev", "test")


def _discover_v2(root: Path) -> dict[str, tuple[str, Path]]:
    """Split -> (subtype, questions file) for every questions file in ``root`` or ``root/annotations``."""
    for folder in (root, root / "annotations", root / "questions"):
        found = {}
        for path in sorted(folder.glob("v2_OpenEnded_mscoco_*_questions.json")) if folder.is_dir() else []:
            subtype = _V2_QUESTIONS.match(path.name).group("subtype")
            found[vqa_v2_split_name(subtype)] = (subtype, path)
        if found:
            return dict(sorted(found.items(), key=lambda item: split_order(item[0])))
    raise DataError(
        f"no VQA v2 questions files found in {root} (or its annotations/ folder)",
        file=root,
        expected="v2_OpenEnded_mscoco_<subtype>_questions.json with v2_mscoco_<subtype>_annotations.json",
    )


def _parse_v2_annotations(path: Path, log: ProblemLog) -> dict[int, dict[str, Any]]:
    """question_id -> checked annotation of a ``v2_mscoco_*_annotations.json`` file."""
    data = read_json(path)
    annotations = require(data, "annotations", list, file=path, entry="top level")
    if not annotations:
        raise DataError("'annotations' is an empty list", file=path, entry="top level",
                        expected="one annotation per question")
    by_question: dict[int, dict[str, Any]] = {}
    for j, ann in enumerate(annotations):
        qid = ann.get("question_id") if isinstance(ann, dict) else None
        entry = json_entry("annotations", j, qid, "question_id")
        try:
            require(ann, "question_id", int, file=path, entry=entry)
            require(ann, "image_id", int, file=path, entry=entry)
            answer_list = require(ann, "answers", list, file=path, entry=entry)
            if not answer_list:
                raise DataError("'answers' is an empty list", file=path, entry=entry,
                                expected="the annotators' answers (10 in VQA v2)")
            texts = [require(a, "answer", str, file=path, entry=f"{entry}, answers[{k}]")
                     for k, a in enumerate(answer_list)]
            for key in ("multiple_choice_answer", "answer_type", "question_type"):
                require(ann, key, str, file=path, entry=entry)
        except DataError as error:
            log.bad(error)
            continue
        by_question[qid] = {
            "image_id": ann["image_id"],
            "answers": texts,
            "multiple_choice_answer": ann["multiple_choice_answer"],
            "answer_type": ann["answer_type"],
            "question_type": ann["question_type"],
        }
    return by_question


def _parse_v2_split(
    split: str, subtype: str, questions_file: Path, image_root: Path | None, root: Path, skip_bad: bool
) -> tuple[_ParsedSplit, Path, bool]:
    """Rows of one VQA v2 split; returns (parsed, image folder, labeled)."""
    log = ProblemLog(split, skip_bad)
    data = read_json(questions_file)
    questions = require(data, "questions", list, file=questions_file, entry="top level")
    if not questions:
        raise DataError("'questions' is an empty list", file=questions_file, entry="top level",
                        expected="the split's questions")
    subtype = data.get("data_subtype", subtype) if isinstance(data.get("data_subtype"), str) else subtype
    folder = _v2_image_folder(subtype)

    annotation_file = questions_file.with_name(f"v2_mscoco_{subtype}_annotations.json")
    labeled = annotation_file.exists()
    annotations = _parse_v2_annotations(annotation_file, log) if labeled else {}

    first = next((q for q in questions if isinstance(q, dict) and isinstance(q.get("image_id"), int)), None)
    sample = f"{folder}/COCO_{folder}_{first['image_id']:012d}.jpg" if first else ""
    candidates = [image_root] if image_root is not None else [root, root / "images", root.parent]
    base = find_image_dir(candidates, sample, file=questions_file, what=f"VQA v2 split {split!r}")

    rows = []
    for i, q in enumerate(questions):
        qid = q.get("question_id") if isinstance(q, dict) else None
        entry = json_entry("questions", i, qid, "question_id")
        try:
            require(q, "question_id", int, file=questions_file, entry=entry)
            image_id = require(q, "image_id", int, file=questions_file, entry=entry)
            question = require(q, "question", str, file=questions_file, entry=entry)
            row: dict[str, Any] = {"question_id": qid, "image_id": image_id, "question": question, "answers": [],
                                   "multiple_choice_answer": None, "answer_type": None, "question_type": None}
            if labeled:
                ann = annotations.get(qid)
                if ann is None:
                    raise DataError(f"question has no annotation in {annotation_file.name}", file=questions_file,
                                    entry=entry, expected="an annotation with the same question_id")
                if ann["image_id"] != image_id:
                    raise DataError(f"image_id {image_id} differs from its annotation's {ann['image_id']}",
                                    file=questions_file, entry=entry, expected="matching image ids")
                row.update(ann)
            row["image_path"] = safe_join(base, f"{folder}/COCO_{folder}_{image_id:012d}.jpg",
                                          file=questions_file, entry=entry)
            row["_entry"] = entry
        except DataError as error:
            log.bad(error)
            continue
        rows.append(row)
    return _ParsedSplit(rows, log, questions_file, _describe_question), base, labeled


def load_vqa_v2(
    root: PathLike | None = None,
    *,
    splits: str | Sequence[str] | None = None,
    image_root: PathLike | None = None,
    answers: Sequence[str] | None = None,
    answers_top_k: int = DEFAULT_TOP_K,
    answers_min_count: int = 1,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> VQAData:
    """The official VQA v2 files.

    Args:
        root: folder with ``v2_OpenEnded_mscoco_<subtype>_questions.json`` and
            ``v2_mscoco_<subtype>_annotations.json`` (directly or in ``annotations/``).
        splits: split names (``train``, ``val``, ``test-dev``, ``test``); default all found.
        image_root: folder holding ``<subtype>/COCO_<subtype>_<id>.jpg``; default the
            first of ``root``, ``root/images``, ``root/..`` that has the images.
        answers, answers_top_k, answers_min_count: see the module docstring.
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    if root is None:
        raise MissingRootError("vqa-v2 needs root= (the folder of the official VQA v2 JSON files)",
                        expected="root=/path/to/vqa_v2")
    root = Path(root)
    files = _discover_v2(root)
    wanted = select_splits(list(files), splits, source=root)
    needed = list(dict.fromkeys(wanted + ([] if answers is not None or "train" not in files else ["train"])))
    parsed, folders = {}, []
    for split in needed:
        subtype, questions_file = files[split]
        parsed[split], folder, labeled = _parse_v2_split(
            split, subtype, questions_file, Path(image_root) if image_root is not None else None, root, skip_bad
        )
        if split == "train" and not labeled:
            raise DataError("the train split has no annotations file", file=questions_file,
                            expected=f"v2_mscoco_{subtype}_annotations.json next to it")
        folders.append(folder)
    return _build("vqa-v2", parsed, wanted, image_root=folders[0], metric="vqa", answers=answers,
                  answers_top_k=answers_top_k, answers_min_count=answers_min_count, only_present=only_present,
                  verify_images=verify_images, optional=tuple(OPTIONAL_FEATURES))


# --------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------
def _parse_jsonl_split(path: Path, split: str, image_root: Path, skip_bad: bool) -> _ParsedSplit:
    log = ProblemLog(split, skip_bad)
    records = list(iter_jsonl(path, log))
    labeled = any("answers" in record for _, record in records)
    rows = []
    joined: dict[str, str] = {}  # image -> its checked path (an image has many questions)
    for lineno, record in records:
        entry = jsonl_entry(lineno)
        try:
            image = require(record, "image", str, file=path, entry=entry)
            question = require(record, "question", str, file=path, entry=entry)
            answers = require_str_list(record, "answers", file=path, entry=entry) if labeled else []
            qid = require(record, "question_id", int, file=path, entry=entry) if "question_id" in record else lineno
            image_id = require(record, "image_id", int, file=path, entry=entry) if "image_id" in record else -1
            optional = {key: require(record, key, str, file=path, entry=entry) if key in record else None
                        for key in ("answer_type", "question_type")}
            image_path = joined.get(image) or joined.setdefault(
                image, safe_join(image_root, image, file=path, entry=entry))
        except DataError as error:
            log.bad(error)
            continue
        rows.append({"question_id": qid, "image_id": image_id, "question": question, "answers": answers,
                     "image_path": image_path, "_entry": entry, **optional})
    return _ParsedSplit(rows, log, path, _describe_question)


def load_vqa_jsonl(
    root: PathLike | None = None,
    *,
    files: Mapping[str, PathLike] | PathLike | None = None,
    image_root: PathLike | None = None,
    splits: str | Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
    answers_top_k: int = DEFAULT_TOP_K,
    answers_min_count: int = 1,
    metric: str | None = None,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> VQAData:
    """VQA questions in JSONL files (``image``, ``question``, ``answers`` per line).

    Args:
        root: dataset folder. Without ``files``, the ``*.jsonl`` files of ``root``
            (or else of ``root/vqa``) are the splits, named by the last ``_`` part
            of the stem when it is a split word (``yesno_train.jsonl`` -> ``train``).
        files: ``{split: path}`` (or one path) instead of discovery.
        image_root: folder the ``image`` paths are relative to; default
            ``root/images`` when it exists, else ``root`` (or the files' folder).
        splits: which splits to return (default all).
        answers, answers_top_k, answers_min_count: see the module docstring.
        metric: override ``exact_match`` / ``vqa`` (default: ``exact_match`` when
            every training question has exactly one answer).
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.

    A file where no line has ``answers`` is an unlabeled split; in a labeled file
    every line needs it.
    """
    base = Path(root) if root is not None else None
    if files is None and base is None:
        raise MissingRootError("vqa-jsonl needs root= (a folder of *.jsonl files) or files={split: path}",
                        expected="root or files")
    paths = resolve_files(files, lambda: discover_files([base, base / "vqa"], "*.jsonl", what="VQA JSONL"))
    if image_root is not None:
        images = Path(image_root)
    elif base is not None:
        images = base / "images" if (base / "images").is_dir() else base
    else:
        images = next(iter(paths.values())).parent
    wanted = select_splits(list(paths), splits, source=base or images)
    needed = list(dict.fromkeys(wanted + ([] if answers is not None or "train" not in paths else ["train"])))
    parsed = {split: _parse_jsonl_split(paths[split], split, images, skip_bad) for split in needed}
    if metric is None:
        labeled_rows = [row for part in parsed.values() for row in part.rows if row["answers"]]
        metric = "exact_match" if all(len(row["answers"]) == 1 for row in labeled_rows) else "vqa"
    optional = [key for key in ("answer_type", "question_type")
                if any(row.get(key) is not None for part in parsed.values() for row in part.rows)]
    return _build("vqa-jsonl", parsed, wanted, image_root=images, metric=metric, answers=answers,
                  answers_top_k=answers_top_k, answers_min_count=answers_min_count, only_present=only_present,
                  verify_images=verify_images, optional=optional)


# --------------------------------------------------------------------------------------
# One entry point, and registration
# --------------------------------------------------------------------------------------
VQA_SOURCES = {"easy-vqa": load_easy_vqa, "vqa-v2": load_vqa_v2, "vqa-jsonl": load_vqa_jsonl}


def load_vqa(source: str = "easy-vqa", root: PathLike | None = None, **kwargs: Any) -> VQAData:
    """Load VQA data from ``source`` (``easy-vqa``, ``vqa-v2`` or ``vqa-jsonl``); kwargs go to its loader.

    Example::

        data = load_vqa("easy-vqa", splits="train")
        data.answers[:3], data.metric, len(data["train"])
    """
    if source not in VQA_SOURCES:
        raise ValueError(f"unknown VQA source {source!r}; expected one of {', '.join(VQA_SOURCES)}")
    return VQA_SOURCES[source](root, **kwargs)


for _name, _loader in VQA_SOURCES.items():
    register_dataset(_name)(_loader)
