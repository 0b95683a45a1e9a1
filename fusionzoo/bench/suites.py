"""The benchmark's suites and tasks: which data, which splits, which metrics, which settings.

Five suites:

=============  ========================  ==============  =====================================
suite          task                      model task      data (train -> scored on)
=============  ========================  ==============  =====================================
sort-of-clevr  ``sort-of-clevr``         vqa             generated Sort-of-CLEVR scenes
                                                         (:mod:`fusionzoo.data.sort_of_clevr`):
                                                         36,000 train questions -> 3,600 test (or
                                                         3,600 validation) questions, 12 answers;
                                                         exact match
easy-vqa       ``easy-vqa``              vqa             easy-VQA package: 34,774 train questions
                                                         (3,600 images) -> 9,673 test questions
                                                         (1,000 images), or 3,801 validation
                                                         questions (400 images held out of the
                                                         package's train split), 13 answers; exact
                                                         match
coco           ``coco-yesno``            vqa             ``<data-dir>/vqa/yesno_{train,test}.jsonl``:
                                                         9,515 -> 1,172 test (1,132 val) real
                                                         yes/no questions; exact match. Left out,
                                                         with a note, where ``vqa/`` is absent
coco           ``coco-captioning``       captioning      Karpathy split of ``<data-dir>``: 844
                                                         train images (5 captions each) -> 74 test
                                                         (95 val) images; BLEU-4, METEOR, ROUGE-L,
                                                         CIDEr
coco           ``coco-match``            classification  the same images: each caption paired with
                                                         its image (match) and with another
                                                         image's caption (mismatch): 8,448 -> 740
                                                         test (950 val) pairs; accuracy, macro-F1,
                                                         ROC-AUC
coco           ``coco-retrieval``        retrieval       the same Karpathy split: 4,224 (image,
                                                         caption) pairs of 844 train images -> 74
                                                         test images x 370 captions (95 x 475
                                                         val); recall@1/5/10 both ways, r_mean
                                                         (:mod:`fusionzoo.bench.retrieval`)
vqav2          ``vqav2``                 vqa             the official VQA v2 files: train2014
                                                         (without a held-out validation slice) ->
                                                         val2014; VQA accuracy (ten answers), per
                                                         answer and question type
flickr30k      ``flickr30k-captioning``  captioning      ``dataset_flickr30k.json`` (Karpathy
                                                         split), as ``coco-captioning``
flickr30k      ``flickr30k-match``       classification  as ``coco-match``
flickr30k      ``flickr30k-retrieval``   retrieval       as ``coco-retrieval``
=============  ========================  ==============  =====================================

Counts are those of ``../shared/data/coco-vqa-mini`` for the coco suite. Every task has a
validation split (``eval_split="val"``, ``--eval-split val``): its data's own (Sort-of-CLEVR,
``yesno_val.jsonl``, the Karpathy ``val`` split) or, where the data has none (easy-VQA,
VQA v2), :data:`VALIDATION_FRACTION` of the train images chosen by a fixed seed
(:func:`carve_validation`). Those images are left out of train on *every* load of the task,
whichever split is scored, so the models scored on validation and on test train on the same
images.

Data layouts (``--data-dir``):

* ``coco``: the Karpathy split file -- ``dataset_coco.json`` or ``karpathy*.json``, directly
  or in ``annotations/`` -- with its images at ``<filepath>/<filename>`` under
  ``--data-dir`` or ``--data-dir/images`` (coco-vqa-mini: ``annotations/karpathy_mini.json``
  and ``images/val2014/``; full COCO: ``dataset_coco.json`` and ``train2014/``,
  ``val2014/``); ``vqa/yesno_{train,val,test}.jsonl`` for ``coco-yesno``. The official
  caption files (``captions_*.json``) are not read.
* ``vqav2``: ``v2_OpenEnded_mscoco_{train,val}2014_questions.json`` and
  ``v2_mscoco_{train,val}2014_annotations.json`` (directly, in ``annotations/`` or in
  ``questions/``), images at ``{train,val}2014/COCO_{train,val}2014_<12-digit id>.jpg``
  under ``--data-dir``, ``--data-dir/images`` or the folder above.
* ``flickr30k``: ``dataset_flickr30k.json`` (directly or in ``annotations/``), images in
  ``flickr30k-images/`` (or ``flickr30k_images/``, ``images/``, or ``--data-dir`` itself).

``--max-train N`` / ``--max-test N`` (:func:`load_tasks`) keep at most N images of a task's
train / scored split, with every sample of each kept image.

``--quick`` keeps a small, fixed subset of images per split (64 train / 32 test for
easy-VQA and Sort-of-CLEVR, 128 / 48 for the photo suites: coco, vqav2, flickr30k),
preferring images that every selected task uses, and every row of each task on those images: a few hundred samples per task, and
few images to encode.

Per-type breakdowns (``metrics["per_question_type"]`` / ``["per_answer_type"]``):

* Sort-of-CLEVR's questions carry their template (``question_type``: ``shape``,
  ``horizontal``, ``vertical``, ``closest_shape``, ``furthest_shape``,
  ``count_same_shape``) and its group (``answer_type``: ``non-relational`` /
  ``relational``).

* easy-VQA has no type annotations; the question type is read from the
  question's template (:func:`easy_vqa_question_type`): ``what shape``
  ("what shape is in the image?", "what is the blue shape?"), ``what color``
  ("what color is the circle?", "what is the color of the circle?"), and the
  yes/no templates split by what they ask about (a colour or a shape) and
  whether they are negated ("is there not a red shape?", "is no circle
  present?"). Six types in all.
* Other VQA data uses its own ``answer_type`` / ``question_type`` fields when it has
  them; otherwise the answer type follows VQA v2's convention from the gold
  answer (``yes/no``, ``number``, ``other``) and the question type is the
  question's first two words ("is this", "are there"), as VQA v2's question
  types are question prefixes.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import FusionZooError
from ..registry import DATASETS
from ..tasks.vqa_eval import normalize_answer

logger = logging.getLogger(__name__)

#: easy-VQA's colour words (its answers that are colours).
EASY_VQA_COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})


class BenchError(FusionZooError, ValueError):
    """A benchmark option or input that cannot work (unknown suite, task or fusion; missing data folder)."""


# --------------------------------------------------------------------------------------
# What a task hands the benchmark
# --------------------------------------------------------------------------------------
@dataclass
class SplitData:
    """The samples of one split, as image paths and texts (the runner maps them to feature rows).

    Attributes:
        image_paths: one image file per sample.
        texts: one text per sample (question, caption, or the text of a pair);
            for a captioning evaluation split, None (the model writes the text).
        labels: VQA: (S, A) float soft scores; classification: (S,) long label ids;
            captioning: None (the caption ids are the targets).
        answers: VQA: the gold answers of each sample (scoring).
        groups: breakdown name -> one category per sample (``question_type``, ...).
        image_ids: captioning and retrieval: one image id per sample.
        references: captioning evaluation: image id -> reference captions.
        caption_ids: retrieval: one caption id per sample (Karpathy ``sentid``).
        question_ids: VQA with official question ids (VQA v2): one per sample, for the
            official results file (``vqa_results_<task>_<fusion>.json``); else None.
    """

    image_paths: list[str]
    texts: list[str] | None
    labels: torch.Tensor | None = None
    answers: list[list[str]] | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    image_ids: list[int] | None = None
    references: dict[int, list[str]] | None = None
    caption_ids: list[int] | None = None
    question_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.image_paths)

    def subset(self, keep: Sequence[int]) -> "SplitData":
        """The samples at indices ``keep`` (references kept for the images that remain)."""
        keep = list(keep)
        pick = lambda values: None if values is None else [values[i] for i in keep]  # noqa: E731
        image_ids = pick(self.image_ids)
        references = None
        if self.references is not None and image_ids is not None:
            references = {i: self.references[i] for i in image_ids}
        return SplitData(
            image_paths=pick(self.image_paths),
            texts=pick(self.texts),
            labels=None if self.labels is None else self.labels[torch.as_tensor(keep, dtype=torch.long)],
            answers=pick(self.answers),
            groups={name: pick(values) for name, values in self.groups.items()},
            image_ids=image_ids,
            references=references,
            caption_ids=pick(self.caption_ids),
            question_ids=pick(self.question_ids),
        )


@dataclass
class BenchTask:
    """One task of a suite, loaded.

    Attributes:
        name: benchmark task name (``easy-vqa``, ``coco-yesno``, ...).
        task: the model task (``vqa``, ``captioning``, ``classification``).
        metric: the headline metric, a key of the row's ``metrics``.
        vocabulary: answers (VQA) or label names (classification); None for captioning.
        train, test: the splits trained on and scored on (``test`` holds the validation
            split when the task was loaded with ``eval_split="val"``).
        scoring: ``exact_match`` (one answer per question) or ``vqa`` (ten answers).
        description: one line for the report.
    """

    name: str
    task: str
    metric: str
    vocabulary: list[str] | None
    train: SplitData
    test: SplitData
    scoring: str = "exact_match"
    description: str = ""

    @property
    def causal_text(self) -> bool:
        """Whether the text side is a causal decoder (a task that writes text, such as captioning)."""
        from ..tasks import get_task

        return get_task(self.task).generates_text


# --------------------------------------------------------------------------------------
# Question types
# --------------------------------------------------------------------------------------
def easy_vqa_question_type(question: str) -> str:
    """The template family of an easy-VQA question (see the module docstring).

    >>> easy_vqa_question_type("is there not a red shape in the image?")
    'yes/no color, negated'
    """
    words = question.lower().rstrip("?").split()
    if words and words[0] == "what":
        return "what color" if "color" in words else "what shape"
    about = "color" if any(word in EASY_VQA_COLORS for word in words) else "shape"
    negated = "not" in words or "no" in words
    return f"yes/no {about}{', negated' if negated else ''}"


@functools.lru_cache(maxsize=65536)
def vqa_answer_type(answer: str) -> str:
    """VQA v2's answer type of an answer: ``yes/no``, ``number`` or ``other``."""
    normalized = normalize_answer(answer)
    if normalized in ("yes", "no"):
        return "yes/no"
    if normalized.replace(".", "", 1).isdigit():
        return "number"
    return "other"


def question_prefix(question: str, words: int = 2) -> str:
    """The first ``words`` words of a question, lower-cased (VQA v2-style question type)."""
    return " ".join(question.lower().rstrip("?").split()[:words])


# --------------------------------------------------------------------------------------
# Validation splits carved from train
# --------------------------------------------------------------------------------------
#: Fraction of a task's train images held out as its validation split when the data has none.
VALIDATION_FRACTION = 0.1
#: Seed of that choice: fixed, so every run (whatever its ``--seeds``) holds out the same images.
VALIDATION_SEED = 0


def held_out_images(image_paths: Sequence[str], fraction: float = VALIDATION_FRACTION,
                    seed: int = VALIDATION_SEED) -> set[str]:
    """The images of a train split that form its validation split: ``fraction`` of them, by a seeded shuffle.

    The distinct paths are sorted, shuffled by ``random.Random(seed)`` and the first
    ``round(fraction * n)`` kept (at least one when there are two or more images), so the
    choice depends on the image set alone, not on the order of the samples or on where
    the data folder is (every path shares its prefix).
    """
    images = sorted(set(image_paths))
    count = min(len(images) - 1, max(1, round(fraction * len(images)))) if len(images) > 1 else 0
    random.Random(seed).shuffle(images)
    return set(images[:count])


def carve_validation(train: SplitData) -> tuple[SplitData, SplitData]:
    """(train without the held-out images, validation = every sample of the held-out images).

    Done on every load of a task without a validation split of its own, whichever split is
    scored: the model scored on test and the one scored on validation train on the same images.
    """
    held_out = held_out_images(train.image_paths)
    keep = [i for i, path in enumerate(train.image_paths) if path not in held_out]
    val = [i for i, path in enumerate(train.image_paths) if path in held_out]
    return train.subset(keep), train.subset(val)


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------
def _vqa_split(dataset: Any, answers: list[str], question_type: Callable[[str], str],
               data_types: bool, question_ids: bool = False) -> SplitData:
    """SplitData of a VQAData split: dense soft-score labels, gold answers, types (and question ids)."""
    columns = dataset.with_format(None).to_dict()  # lists; no image decoding
    count = len(columns["question"])
    labels = torch.zeros(count, len(answers))  # (S, A)
    rows = [i for i, ids in enumerate(columns["target_ids"]) for _ in ids]
    if rows:  # one scatter for the whole split, not one call per question
        cols = [j for ids in columns["target_ids"] for j in ids]
        scores = [x for row in columns["target_scores"] for x in row]
        labels[torch.as_tensor(rows), torch.as_tensor(cols, dtype=torch.long)] = torch.as_tensor(scores)
    answer_types = columns.get("answer_type") if data_types else None
    question_types = columns.get("question_type") if data_types else None
    if not answer_types or any(t is None for t in answer_types):
        answer_types = [vqa_answer_type(a[0]) if a else "unlabeled" for a in columns["answers"]]
    if not question_types or any(t is None for t in question_types):
        question_types = [question_type(q) for q in columns["question"]]
    return SplitData(
        image_paths=list(columns["image_path"]),
        texts=list(columns["question"]),
        labels=labels,
        answers=[list(a) for a in columns["answers"]],
        groups={"answer_type": answer_types, "question_type": question_types},
        question_ids=[int(q) for q in columns["question_id"]] if question_ids else None,
    )


def load_easy_vqa_task(data_dir: Path | None, eval_split: str = "test") -> BenchTask:
    """easy-VQA from the installed package (``data_dir`` is not needed and ignored).

    The package has train and test only: the validation split is carved from train
    (:func:`carve_validation`), and train is without those images for either ``eval_split``.
    """
    data = DATASETS.get("easy-vqa")(splits=("train",) if eval_split == "val" else ("train", "test"))
    train, val = carve_validation(_vqa_split(data["train"], data.answers, easy_vqa_question_type, data_types=False))
    scored = val if eval_split == "val" else _vqa_split(data["test"], data.answers, easy_vqa_question_type,
                                                        data_types=False)
    return BenchTask(
        name="easy-vqa", task="vqa", metric="accuracy", vocabulary=list(data.answers), train=train, test=scored,
        scoring=data.metric,
        description=f"easy-VQA (synthetic shapes, 64x64 images): {eval_split} accuracy, exact match",
    )


def coco_yesno_files(data_dir: Path, eval_split: str = "test") -> list[Path]:
    """The files the ``coco-yesno`` task reads: ``<data_dir>/vqa/yesno_{train,<eval_split>}.jsonl``."""
    return [data_dir / "vqa" / f"yesno_{split}.jsonl" for split in ("train", eval_split)]


def load_coco_yesno_task(data_dir: Path, eval_split: str = "test") -> BenchTask:
    """Real yes/no questions on COCO images: ``<data_dir>/vqa/yesno_*.jsonl`` (vqa-jsonl loader)."""
    train_file, eval_file = coco_yesno_files(data_dir, eval_split)
    data = DATASETS.get("vqa-jsonl")(data_dir, files={"train": train_file, eval_split: eval_file})
    return BenchTask(
        name="coco-yesno", task="vqa", metric="accuracy", vocabulary=list(data.answers),
        train=_vqa_split(data["train"], data.answers, question_prefix, data_types=True),
        test=_vqa_split(data[eval_split], data.answers, question_prefix, data_types=True),
        scoring=data.metric,
        description=f"COCO yes/no questions (real photos): {eval_split} accuracy, exact match",
    )


#: The official VQA v2 files the ``vqav2`` task reads, per scored split (``test`` is val2014).
VQAV2_SUBTYPES = {"test": ("train2014", "val2014"), "val": ("train2014",)}


def vqav2_missing_files(data_dir: Path, eval_split: str = "test") -> list[str]:
    """The official VQA v2 files (questions and annotations) that ``data_dir`` lacks.

    Looked for where the vqa-v2 loader looks: ``data_dir``, ``annotations/``, ``questions/``.
    """
    names = [name for subtype in VQAV2_SUBTYPES[eval_split]
             for name in (f"v2_OpenEnded_mscoco_{subtype}_questions.json", f"v2_mscoco_{subtype}_annotations.json")]
    folders = (data_dir, data_dir / "annotations", data_dir / "questions")
    return [name for name in names if not any((folder / name).is_file() for folder in folders)]


def load_vqav2_task(data_dir: Path, eval_split: str = "test") -> BenchTask:
    """VQA v2 from the official files (vqa-v2 loader): train2014 -> val2014, VQA accuracy.

    The validation split is carved from train2014 by image (:func:`carve_validation`) and
    left out of training for either ``eval_split``; test is the whole val2014 split. The answer
    vocabulary is the loader's: the commonest answers of every train2014 question (the held-out
    images' included; a list of answers, not their labels). Breakdowns: the annotations'
    ``answer_type`` and ``question_type``.
    """
    if missing := vqav2_missing_files(data_dir, eval_split):
        raise BenchError(f"the vqav2 task needs the official VQA v2 files {', '.join(missing)} in {data_dir} "
                         "(or its annotations/ folder)")
    data = DATASETS.get("vqa-v2")(data_dir, splits=("train",) if eval_split == "val" else ("train", "val"))
    split = lambda name: _vqa_split(data[name], data.answers, question_prefix, data_types=True,  # noqa: E731
                                    question_ids=True)
    train, val = carve_validation(split("train"))
    return BenchTask(
        name="vqav2", task="vqa", metric="accuracy", vocabulary=list(data.answers), train=train,
        test=val if eval_split == "val" else split("val"), scoring=data.metric,
        description=f"VQA v2 (COCO photos, 10 answers a question): "
                    f"{'train2014 validation slice' if eval_split == 'val' else 'val2014'} VQA accuracy",
    )


@dataclass(frozen=True)
class KarpathyCollection:
    """An image collection with a Karpathy split file (COCO, Flickr30k).

    Attributes:
        title: its name in task descriptions.
        files: names of its split file (shell patterns, in order), searched in ``--data-dir``
            and then ``--data-dir/annotations``.
        image_folders: folders of ``--data-dir`` that may hold its images, tried first (for a
            split file that names files without a folder); else the loader looks in
            ``--data-dir`` and ``--data-dir/images`` for ``<filepath>/<filename>``.
    """

    title: str
    files: tuple[str, ...]
    image_folders: tuple[str, ...] = ()


KARPATHY_COLLECTIONS: dict[str, KarpathyCollection] = {
    "coco": KarpathyCollection("COCO", ("dataset_coco.json", "karpathy*.json")),
    "flickr30k": KarpathyCollection("Flickr30k", ("dataset_flickr30k.json",),
                                    image_folders=("flickr30k-images", "flickr30k_images")),
}


def karpathy_source(collection: str, data_dir: Path) -> dict[str, Path]:
    """The karpathy-captions loader's ``file`` (and ``image_root`` when an image folder is found) in ``data_dir``."""
    spec = KARPATHY_COLLECTIONS[collection]
    folders = [data_dir, data_dir / "annotations"]
    found = next((match for folder in folders if folder.is_dir() for pattern in spec.files
                  for match in sorted(folder.glob(pattern))), None)
    if found is None:
        raise BenchError(f"no Karpathy split file for {spec.title} ({' or '.join(spec.files)}) in {data_dir} "
                         f"or {data_dir / 'annotations'}")
    source = {"file": found}
    image_root = next((data_dir / name for name in spec.image_folders if (data_dir / name).is_dir()), None)
    if image_root is not None:
        source["image_root"] = image_root
    return source


def load_captioning_task(collection: str, data_dir: Path, eval_split: str = "test") -> BenchTask:
    """``<collection>-captioning``: train on every (image, caption) pair of the Karpathy train split,
    caption the ``eval_split`` images."""
    title = KARPATHY_COLLECTIONS[collection].title
    data = DATASETS.get("karpathy-captions")(data_dir, splits=("train", eval_split),
                                             **karpathy_source(collection, data_dir))
    pairs = data.pairs("train").with_format(None).to_dict()
    scored = data[eval_split].with_format(None).to_dict()
    train = SplitData(image_paths=list(pairs["image_path"]), texts=list(pairs["caption"]),
                      image_ids=list(pairs["image_id"]))
    evaluation = SplitData(image_paths=list(scored["image_path"]), texts=None, image_ids=list(scored["image_id"]),
                           references={i: list(c) for i, c in zip(scored["image_id"], scored["captions"])})
    return BenchTask(name=f"{collection}-captioning", task="captioning", metric="CIDEr", vocabulary=None,
                     train=train, test=evaluation, scoring="coco-caption",
                     description=f"{title} captions, Karpathy split ({eval_split}): BLEU-4, METEOR, ROUGE-L, CIDEr "
                                 "(greedy decoding)")


def load_match_task(collection: str, data_dir: Path, eval_split: str = "test") -> BenchTask:
    """``<collection>-match``: image-caption match on the Karpathy images (caption-match loader)."""
    title = KARPATHY_COLLECTIONS[collection].title
    data = DATASETS.get("caption-match")(data_dir, splits=("train", eval_split),
                                         **karpathy_source(collection, data_dir))

    def split(name: str) -> SplitData:
        columns = data[name].with_format(None).to_dict()
        labels = torch.as_tensor(columns["label"], dtype=torch.long)  # (S,)
        names = [data.label_names[i] for i in columns["label"]]
        return SplitData(image_paths=list(columns["image_path"]), texts=list(columns["text"]), labels=labels,
                         groups={"label": names})

    return BenchTask(name=f"{collection}-match", task="classification", metric="accuracy",
                     vocabulary=list(data.label_names), train=split("train"), test=split(eval_split),
                     scoring="classification",
                     description=f"{title} image-caption match (balanced match / mismatch pairs): "
                                 f"{eval_split} accuracy")


def load_retrieval_task(collection: str, data_dir: Path, eval_split: str = "test") -> BenchTask:
    """``<collection>-retrieval``: train on every (image, caption) pair of the Karpathy train split,
    rank ``eval_split``.

    Both splits are one sample per caption (image path, caption, image id, caption id); the
    evaluation ranks every caption of ``eval_split`` against every one of its images both
    ways. ``eval_split="val"`` is how the task's settings were chosen
    (:func:`fusionzoo.bench.retrieval.select_settings`); the benchmark scores ``test``.
    """
    title = KARPATHY_COLLECTIONS[collection].title
    data = DATASETS.get("karpathy-captions")(data_dir, splits=("train", eval_split),
                                             **karpathy_source(collection, data_dir))

    def split(name: str) -> SplitData:
        pairs = data.pairs(name).with_format(None).to_dict()
        return SplitData(image_paths=list(pairs["image_path"]), texts=list(pairs["caption"]),
                         image_ids=list(pairs["image_id"]), caption_ids=list(pairs["caption_id"]))

    return BenchTask(name=f"{collection}-retrieval", task="retrieval", metric="r_mean", vocabulary=None,
                     train=split("train"), test=split(eval_split), scoring="recall",
                     description=f"{title} image-text retrieval, Karpathy split ({eval_split}): recall@1/5/10 "
                                 "image->text (txt_) and text->image (img_), r_mean their mean; ITC shortlist, "
                                 "ITM rerank")


def load_coco_retrieval_task(data_dir: Path, eval_split: str = "test") -> BenchTask:
    """``coco-retrieval`` (:func:`load_retrieval_task` on COCO's Karpathy split)."""
    return load_retrieval_task("coco", data_dir, eval_split)


def load_sort_of_clevr_task(data_dir: Path | None, eval_split: str = "test") -> BenchTask:
    """Sort-of-CLEVR, generated (or found in the cache) with the dataset's defaults: 3,000 train scenes.

    ``data_dir`` is the generated sets' cache folder (default: next to the feature cache,
    see :mod:`fusionzoo.data.sort_of_clevr`). Scored on ``eval_split`` (``val`` is how the
    suite's grid and settings were chosen; the benchmark scores ``test``). Breakdowns:
    ``answer_type`` (non-relational / relational) and ``question_type`` (the template).
    """
    from ..data import sort_of_clevr  # noqa: F401  (registers the dataset)

    data = DATASETS.get("sort-of-clevr")(data_dir, splits=("train", eval_split))
    return BenchTask(
        name="sort-of-clevr", task="vqa", metric="accuracy", vocabulary=list(data.answers),
        train=_vqa_split(data["train"], data.answers, question_prefix, data_types=True),
        test=_vqa_split(data[eval_split], data.answers, question_prefix, data_types=True),
        scoring=data.metric,
        description=f"Sort-of-CLEVR (generated scenes, 6 objects; relational and non-relational questions): "
                    f"{eval_split} accuracy, exact match",
    )


#: Task name -> loader(data_dir, eval_split) -> BenchTask. Every task can score ``test`` or
#: ``val``: its own validation split, or one carved from train (:func:`carve_validation`).
TASK_LOADERS: dict[str, Callable[[Path | None, str], BenchTask]] = {
    "easy-vqa": load_easy_vqa_task,
    "coco-yesno": load_coco_yesno_task,
    **{f"{collection}-{kind}": functools.partial(loader, collection)
       for collection in KARPATHY_COLLECTIONS
       for kind, loader in (("captioning", load_captioning_task), ("match", load_match_task),
                            ("retrieval", load_retrieval_task))},
    "vqav2": load_vqav2_task,
    "sort-of-clevr": load_sort_of_clevr_task,
}

#: Each task's model task (its ``BenchTask.task``), known before any data is read, so an option
#: that only some model tasks support fails first (``--train-encoders``); :func:`load_tasks`
#: checks that the loaders agree.
MODEL_TASKS: dict[str, str] = {
    "easy-vqa": "vqa",
    "coco-yesno": "vqa",
    **{f"{collection}-{kind}": model_task for collection in KARPATHY_COLLECTIONS
       for kind, model_task in (("captioning", "captioning"), ("match", "classification"),
                                ("retrieval", "retrieval"))},
    "vqav2": "vqa",
    "sort-of-clevr": "vqa",
}

#: Tasks whose loader can score the validation split (``eval_split="val"``, ``--eval-split val``): all.
VALIDATION_TASKS = frozenset(TASK_LOADERS)

#: Tasks a suite leaves out, with a logged note, when none of the files they read is in
#: ``--data-dir`` (and ``--tasks`` did not name them): task -> its files (data_dir, eval_split).
OPTIONAL_TASK_FILES: dict[str, Callable[[Path, str], list[Path]]] = {"coco-yesno": coco_yesno_files}


# --------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    """A set of tasks run together on one image preprocessing.

    Attributes:
        name: ``--suite`` value.
        tasks: its task names, in report order.
        image_size: encoder input size (square); images are resized whole, not cropped.
        needs_data_dir: whether ``--data-dir`` is required.
        quick_images: ``--quick`` image budget per split, (train, test).
        image_grid: the encoder's square token grid is average-pooled to
            ``image_grid`` x ``image_grid`` tokens before the fusions see it
            (None = every token); see :func:`fusionzoo.bench.features.pool_image_tokens`.
        image_stage: take the tokens of this intermediate stage of the encoder
            (:meth:`~fusionzoo.encoders.VisionEncoder.stage_tokens`) instead of its last map.
        image_positions: frequencies per axis of the 2-D position channels appended to
            every image token (:func:`fusionzoo.bench.features.add_position_channels`; 0 = none).
    """

    name: str
    tasks: tuple[str, ...]
    image_size: int
    needs_data_dir: bool
    quick_images: tuple[int, int]
    image_grid: int | None = None
    image_stage: int | None = None
    image_positions: int = 0


SUITES: dict[str, Suite] = {
    # easy-VQA images are 64x64, but at 64 px EfficientNet's 2x2 feature map tells the colours apart
    # only 94% of the time (linear probe); upscaled to 128 px, 4x4, ~99%. Each shape fills its
    # image, so the 4x4 grid is pooled to 2x2 tokens: 4x less work for the fusions, same accuracy.
    "easy-vqa": Suite("easy-vqa", ("easy-vqa",), image_size=128, needs_data_dir=False, quick_images=(64, 32),
                      image_grid=2),
    # COCO photographs: EfficientNet's 7x7 map at 224 px, pooled to 3x3 (9 tokens instead of 49).
    "coco": Suite("coco", ("coco-yesno", "coco-captioning", "coco-match", "coco-retrieval"), image_size=224,
                  needs_data_dir=True, quick_images=(128, 48), image_grid=3),
    # VQA v2 and Flickr30k are photographs as COCO's are (VQA v2's are COCO's): the same input.
    "vqav2": Suite("vqav2", ("vqav2",), image_size=224, needs_data_dir=True, quick_images=(128, 48), image_grid=3),
    "flickr30k": Suite("flickr30k", ("flickr30k-captioning", "flickr30k-match", "flickr30k-retrieval"),
                       image_size=224, needs_data_dir=True, quick_images=(128, 48), image_grid=3),
    # Generated scenes of six 16 px objects at 128 px: EfficientNet's stride-8 map (stage 2, 40
    # channels, 16x16) keeps each object's colour and shape, which its last, stride-32 map (4x4,
    # 1,280 channels) blurs: there, no fusion answered left/right above chance on validation.
    # Pooled to 4x4 (32 px cells) and given 2-D position channels. Chosen on the validation split:
    # after 4 epochs merged_transformer scored 98.9% non-relational / 81.8% relational on the 4x4
    # grid against 85.3% / 82.9% on 8x8, in a third of the time (co_attention: 81.8 / 79.2
    # against 80.3 / 79.6); attention over 16 tokens finds the asked object in fewer steps.
    "sort-of-clevr": Suite("sort-of-clevr", ("sort-of-clevr",), image_size=128, needs_data_dir=False,
                           quick_images=(64, 32), image_grid=4, image_stage=2, image_positions=2),
}


def load_tasks(suite: Suite, names: Sequence[str], data_dir: Path | None, quick: bool, seed: int = 0,
               eval_split: str = "test", max_train: int | None = None, max_test: int | None = None,
               drop_missing: bool = False) -> list[BenchTask]:
    """Load the named tasks of ``suite``, scored on ``eval_split``; optionally on fewer images.

    Args:
        suite, names: the suite and which of its tasks.
        data_dir: ``--data-dir``.
        quick: keep a small image subset per split (module docstring), after ``max_*``.
        seed: seeds the ``quick`` and ``max_*`` choices of images.
        eval_split: ``test``, or ``val``: every task's validation split (its own, or one
            carved from train by image, :func:`carve_validation`).
        max_train, max_test: at most this many images of the train split and of the scored
            split per task, chosen by a seeded shuffle of the distinct images (every sample of
            a kept image stays; tasks on the same images keep the same ones); None = all.
        drop_missing: leave out, with a logged note, the :data:`OPTIONAL_TASK_FILES` tasks none
            of whose files is in ``data_dir`` (a suite run without ``--tasks``); else such a
            task fails, naming its missing files.
    """
    if suite.needs_data_dir and data_dir is None:
        raise BenchError(f"the {suite.name!r} suite needs --data-dir (e.g. ../shared/data/coco-vqa-mini)")
    if data_dir is not None and not Path(data_dir).is_dir() and suite.needs_data_dir:
        raise BenchError(f"--data-dir {data_dir} is not a folder")
    if eval_split not in ("test", "val"):
        raise BenchError(f"--eval-split must be test or val, got {eval_split!r}")
    for option, limit in (("--max-train", max_train), ("--max-test", max_test)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BenchError(f"{option} must be a whole number of images >= 1, got {limit!r}")
    root = Path(data_dir) if data_dir is not None else None
    names = _available_tasks(names, root, eval_split, drop_missing)
    tasks = [TASK_LOADERS[name](root, eval_split) for name in names]
    for task in tasks:
        if task.task != MODEL_TASKS[task.name]:  # a bug: the table above drifted from the loaders
            raise RuntimeError(f"task {task.name} loads as model task {task.task!r}, but MODEL_TASKS says "
                               f"{MODEL_TASKS[task.name]!r}")
    tasks = [replace(task, train=_limit_images(task.train, max_train, seed * 2),
                     test=_limit_images(task.test, max_test, seed * 2 + 1)) for task in tasks]
    if not quick:
        return tasks
    train_images, test_images = _quick_images(tasks, suite.quick_images, seed)
    return [replace(task, train=_keep_images(task.train, train_images), test=_keep_images(task.test, test_images))
            for task in tasks]


def _available_tasks(names: Sequence[str], root: Path | None, eval_split: str, drop_missing: bool) -> list[str]:
    """``names`` without the optional tasks whose data is absent (``drop_missing``); a clear error otherwise."""
    kept = []
    for name in names:
        files = OPTIONAL_TASK_FILES[name](root, eval_split) if name in OPTIONAL_TASK_FILES and root else []
        missing = [path for path in files if not path.is_file()]
        if not missing:
            kept.append(name)
        elif drop_missing and len(missing) == len(files):
            logger.warning("leaving out task %s: --data-dir has none of its files (%s)", name,
                           ", ".join(map(str, missing)))
        else:
            raise BenchError(f"task {name} needs {', '.join(map(str, missing))} (not found)")
    if not kept:
        raise BenchError(f"none of the tasks {', '.join(names)} has its data in --data-dir {root}")
    return kept


def _limit_images(split: SplitData, limit: int | None, seed: int) -> SplitData:
    """At most ``limit`` distinct images of ``split`` (a seeded shuffle of the sorted paths) and all their samples."""
    images = sorted(set(split.image_paths))
    if limit is None or len(images) <= limit:
        return split
    random.Random(seed).shuffle(images)
    return _keep_images(split, set(images[:limit]))


def _quick_images(tasks: Sequence[BenchTask], budget: tuple[int, int], seed: int) -> tuple[set[str], set[str]]:
    """A fixed subset of train and test images, preferring images every task uses."""
    chosen = []
    for k, limit in enumerate(budget):
        per_task = [set((task.train, task.test)[k].image_paths) for task in tasks]
        shared = sorted(set.intersection(*per_task))
        rest = sorted(set.union(*per_task) - set(shared))
        rng = random.Random(seed * 2 + k)
        rng.shuffle(shared)
        rng.shuffle(rest)
        chosen.append(set((shared + rest)[:limit]))
    return chosen[0], chosen[1]


def _keep_images(split: SplitData, images: set[str]) -> SplitData:
    return split.subset([i for i, path in enumerate(split.image_paths) if path in images])
