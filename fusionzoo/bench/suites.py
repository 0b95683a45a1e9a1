"""The benchmark's suites and tasks: which data, which splits, which metrics, which settings.

Three suites:

=============  ==================  ==============  ========================================
suite          task                model task      data (train -> scored on)
=============  ==================  ==============  ========================================
sort-of-clevr  ``sort-of-clevr``   vqa             generated Sort-of-CLEVR scenes
                                                   (:mod:`fusionzoo.tasks.sort_of_clevr`):
                                                   36,000 train questions -> 3,600 test (or,
                                                   ``eval_split="val"``, 3,600 validation)
                                                   questions, 12 answers; exact match
easy-vqa       ``easy-vqa``        vqa             easy-VQA package: 38,575 train questions ->
                                                   9,673 test questions, 13 answers; exact match
coco           ``coco-yesno``      vqa             ``<data-dir>/vqa/yesno_{train,test}.jsonl``:
                                                   9,515 -> 1,172 real yes/no questions; exact match
coco           ``coco-captioning`` captioning      Karpathy split of ``<data-dir>``: 844 train
                                                   images (5 captions each) -> 74 test images;
                                                   BLEU-4, METEOR, ROUGE-L, CIDEr
coco           ``coco-match``      classification  the same images: each caption paired with its
                                                   image (match) and with another image's caption
                                                   (mismatch); accuracy, macro-F1, ROC-AUC
coco           ``coco-retrieval``  retrieval       the same Karpathy split: 4,224 (image, caption)
                                                   pairs of 844 train images -> 74 test images x
                                                   370 captions; recall@1/5/10 both ways, r_mean
                                                   (:mod:`fusionzoo.bench.retrieval`)
=============  ==================  ==============  ========================================

A Flickr30k-format Karpathy file (``dataset_flickr30k.json``, ``imgid`` ids) loads the
same way as COCO's, by the ``karpathy-captions`` dataset.

``--quick`` keeps a small, fixed subset of images per split (64 train / 32 test for
easy-VQA and Sort-of-CLEVR, 128 / 48 for COCO), preferring images that every selected task uses,
and every row of each task on those images: a few hundred samples per task, and
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
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import FusionZooError
from ..registry import DATASETS
from ..tasks.vqa_eval import normalize_answer

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
    """

    image_paths: list[str]
    texts: list[str] | None
    labels: torch.Tensor | None = None
    answers: list[list[str]] | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    image_ids: list[int] | None = None
    references: dict[int, list[str]] | None = None
    caption_ids: list[int] | None = None

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
        )


@dataclass
class BenchTask:
    """One task of a suite, loaded.

    Attributes:
        name: benchmark task name (``easy-vqa``, ``coco-yesno``, ...).
        task: the model task (``vqa``, ``captioning``, ``classification``).
        metric: the headline metric, a key of the row's ``metrics``.
        vocabulary: answers (VQA) or label names (classification); None for captioning.
        train, test: the splits trained on and scored on.
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
# Loaders
# --------------------------------------------------------------------------------------
def _vqa_split(dataset: Any, answers: list[str], question_type: Callable[[str], str],
               data_types: bool) -> SplitData:
    """SplitData of a VQAData split: dense soft-score labels, gold answers, types."""
    columns = dataset.with_format(None).to_dict()  # lists; no image decoding
    count = len(columns["question"])
    labels = torch.zeros(count, len(answers))  # (S, A)
    rows = [i for i, ids in enumerate(columns["target_ids"]) for _ in ids]
    if rows:  # one scatter for the whole split (a call per question took ~1 s on easy-VQA)
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
    )


def load_easy_vqa_task(data_dir: Path | None) -> BenchTask:
    """easy-VQA from the installed package (``data_dir`` is not needed and ignored)."""
    data = DATASETS.get("easy-vqa")(splits=("train", "test"))
    return BenchTask(
        name="easy-vqa", task="vqa", metric="accuracy", vocabulary=list(data.answers),
        train=_vqa_split(data["train"], data.answers, easy_vqa_question_type, data_types=False),
        test=_vqa_split(data["test"], data.answers, easy_vqa_question_type, data_types=False),
        scoring=data.metric,
        description="easy-VQA (synthetic shapes, 64x64 images): test accuracy, exact match",
    )


def load_coco_yesno_task(data_dir: Path) -> BenchTask:
    """Real yes/no questions on COCO images: ``<data_dir>/vqa/*.jsonl`` (vqa-jsonl loader)."""
    data = DATASETS.get("vqa-jsonl")(data_dir, splits=("train", "test"))
    return BenchTask(
        name="coco-yesno", task="vqa", metric="accuracy", vocabulary=list(data.answers),
        train=_vqa_split(data["train"], data.answers, question_prefix, data_types=True),
        test=_vqa_split(data["test"], data.answers, question_prefix, data_types=True),
        scoring=data.metric,
        description="COCO yes/no questions (real photos): test accuracy, exact match",
    )


def load_coco_captioning_task(data_dir: Path) -> BenchTask:
    """Karpathy-split captions of ``data_dir``: train on every (image, caption) pair, caption the test images."""
    data = DATASETS.get("karpathy-captions")(data_dir, splits=("train", "test"))
    pairs = data.pairs("train").with_format(None).to_dict()
    test = data["test"].with_format(None).to_dict()
    train = SplitData(image_paths=list(pairs["image_path"]), texts=list(pairs["caption"]),
                      image_ids=list(pairs["image_id"]))
    evaluation = SplitData(image_paths=list(test["image_path"]), texts=None, image_ids=list(test["image_id"]),
                           references={i: list(c) for i, c in zip(test["image_id"], test["captions"])})
    return BenchTask(name="coco-captioning", task="captioning", metric="CIDEr", vocabulary=None,
                     train=train, test=evaluation, scoring="coco-caption",
                     description="COCO captions, Karpathy split: BLEU-4, METEOR, ROUGE-L, CIDEr (greedy decoding)")


def load_coco_match_task(data_dir: Path) -> BenchTask:
    """Image-caption match on the Karpathy images (caption-match loader): match vs mismatch."""
    data = DATASETS.get("caption-match")(data_dir, splits=("train", "test"))

    def split(name: str) -> SplitData:
        columns = data[name].with_format(None).to_dict()
        labels = torch.as_tensor(columns["label"], dtype=torch.long)  # (S,)
        names = [data.label_names[i] for i in columns["label"]]
        return SplitData(image_paths=list(columns["image_path"]), texts=list(columns["text"]), labels=labels,
                         groups={"label": names})

    return BenchTask(name="coco-match", task="classification", metric="accuracy",
                     vocabulary=list(data.label_names), train=split("train"), test=split("test"),
                     scoring="classification",
                     description="COCO image-caption match (balanced match / mismatch pairs): test accuracy")


def load_coco_retrieval_task(data_dir: Path, eval_split: str = "test") -> BenchTask:
    """Image-text retrieval on the Karpathy split: train on every (image, caption) pair, rank ``eval_split``.

    Both splits are one sample per caption (image path, caption, image id, caption id); the
    evaluation ranks every caption of ``eval_split`` against every one of its images both
    ways. ``eval_split="val"`` is how the task's settings were chosen
    (:func:`fusionzoo.bench.retrieval.select_settings`); the benchmark scores ``test``.
    """
    data = DATASETS.get("karpathy-captions")(data_dir, splits=("train", eval_split))

    def split(name: str) -> SplitData:
        pairs = data.pairs(name).with_format(None).to_dict()
        return SplitData(image_paths=list(pairs["image_path"]), texts=list(pairs["caption"]),
                         image_ids=list(pairs["image_id"]), caption_ids=list(pairs["caption_id"]))

    return BenchTask(name="coco-retrieval", task="retrieval", metric="r_mean", vocabulary=None,
                     train=split("train"), test=split(eval_split), scoring="recall",
                     description="COCO image-text retrieval, Karpathy split: recall@1/5/10 image->text (txt_) "
                                 "and text->image (img_), r_mean their mean; ITC shortlist, ITM rerank")


def load_sort_of_clevr_task(data_dir: Path | None, eval_split: str = "test") -> BenchTask:
    """Sort-of-CLEVR, generated (or found in the cache) with the dataset's defaults: 3,000 train scenes.

    ``data_dir`` is the generated sets' cache folder (default: next to the feature cache,
    see :mod:`fusionzoo.tasks.sort_of_clevr`). Scored on ``eval_split`` (``val`` is how the
    suite's grid and settings were chosen; the benchmark scores ``test``). Breakdowns:
    ``answer_type`` (non-relational / relational) and ``question_type`` (the template).
    """
    from ..tasks import sort_of_clevr  # noqa: F401  (registers the dataset)

    data = DATASETS.get("sort-of-clevr")(data_dir, splits=("train", eval_split))
    return BenchTask(
        name="sort-of-clevr", task="vqa", metric="accuracy", vocabulary=list(data.answers),
        train=_vqa_split(data["train"], data.answers, question_prefix, data_types=True),
        test=_vqa_split(data[eval_split], data.answers, question_prefix, data_types=True),
        scoring=data.metric,
        description=f"Sort-of-CLEVR (generated scenes, 6 objects; relational and non-relational questions): "
                    f"{eval_split} accuracy, exact match",
    )


#: Task name -> loader(data_dir) -> BenchTask.
TASK_LOADERS: dict[str, Callable[[Path | None], BenchTask]] = {
    "easy-vqa": load_easy_vqa_task,
    "coco-yesno": load_coco_yesno_task,
    "coco-captioning": load_coco_captioning_task,
    "coco-match": load_coco_match_task,
    "coco-retrieval": load_coco_retrieval_task,
    "sort-of-clevr": load_sort_of_clevr_task,
}

#: Tasks whose loader can score the validation split (``eval_split="val"``, ``--eval-split val``).
VALIDATION_TASKS = frozenset({"coco-retrieval", "sort-of-clevr"})


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
            (None = every token); see :func:`fusionzoo.bench.runner.pool_image_tokens`.
        image_stage: take the tokens of this intermediate stage of the encoder
            (:meth:`~fusionzoo.encoders.VisionEncoder.stage_tokens`) instead of its last map.
        image_positions: frequencies per axis of the 2-D position channels appended to
            every image token (:func:`fusionzoo.bench.runner.add_position_channels`; 0 = none).
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
               eval_split: str = "test") -> list[BenchTask]:
    """Load the named tasks of ``suite``; with ``quick``, keep a small image subset (module docstring).

    ``eval_split="val"`` scores each task's validation split (only :data:`VALIDATION_TASKS` have one).
    """
    if suite.needs_data_dir and data_dir is None:
        raise BenchError(f"the {suite.name!r} suite needs --data-dir (e.g. ../shared/data/coco-vqa-mini)")
    if data_dir is not None and not Path(data_dir).is_dir() and suite.needs_data_dir:
        raise BenchError(f"--data-dir {data_dir} is not a folder")
    if eval_split not in ("test", "val"):
        raise BenchError(f"--eval-split must be test or val, got {eval_split!r}")
    if eval_split == "val" and (missing := [name for name in names if name not in VALIDATION_TASKS]):
        raise BenchError(f"task(s) {', '.join(missing)} have no validation split to score; "
                         f"--eval-split val works for {', '.join(sorted(VALIDATION_TASKS))}")
    root = Path(data_dir) if data_dir is not None else None
    tasks = [TASK_LOADERS[name](root, eval_split) if eval_split != "test" else TASK_LOADERS[name](root)
             for name in names]
    if not quick:
        return tasks
    train_images, test_images = _quick_images(tasks, suite.quick_images, seed)
    return [replace(task, train=_keep_images(task.train, train_images), test=_keep_images(task.test, test_images))
            for task in tasks]


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
