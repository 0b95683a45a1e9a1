"""Image + text classification data and the image-caption match builder.

Sources (each gives a :class:`ClassificationData`):

* ``classification-jsonl`` -- one JSON object a line with ``id``, ``img`` (a path
  under the image root), ``text`` and ``label``: the Hateful Memes schema (Kiela
  et al., 2020), whose ``train.jsonl``, ``dev_seen.jsonl``, ``test_seen.jsonl``...
  become splits ``train``, ``dev_seen``, ``test_seen``. Labels are integers or
  strings (not a mix), binary or multi-class. Label names: ``label_names=`` if
  given; else the sorted distinct string labels, or ``"0".."K-1"`` for integer
  labels, of the ``train`` split (of all labeled splits when there is none). A
  file where no line has ``label`` is an unlabeled split (label ``-1``, like
  Hateful Memes' test files); in a labeled file every line needs one. Headline
  metric: ``roc_auc`` for two classes (Hateful Memes' AUROC), else ``accuracy``.
* ``caption-match`` -- any caption dataset turned into "does this caption
  describe this image?" (:func:`build_caption_match`): every caption of an image
  is a positive (label 1, ``match``), and each positive gets one negative, the
  same image with a caption of another image of the same split drawn by a seeded
  generator (label 0, ``mismatch``), so the classes are balanced. Metric
  ``accuracy``.

Their metrics are :mod:`fusionzoo.tasks.classification_eval`'s.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Features, Value

from fusionzoo.registry import DATASETS, register_dataset

from .captions import CaptionData
from .checks import (
    DataError,
    MissingRootError,
    LoadReport,
    PathLike,
    ProblemLog,
    iter_jsonl,
    jsonl_entry,
    require,
)
from .common import (
    NO_LABEL,
    TaskData,
    Tokenize,
    discover_files,
    keep_present,
    resolve_files,
    rows_to_dataset,
    safe_join,
    select_splits,
    stack_pixels,
    tokenize_texts,
    verify_rows,
)

FEATURES = Features({
    "id": Value("string"),
    "image_path": Value("string"),
    "text": Value("string"),
    "label": Value("int64"),  # index into label_names; -1 when unlabeled
})
MATCH_LABELS = ["mismatch", "match"]


# --------------------------------------------------------------------------------------
# The loaded data and its batches
# --------------------------------------------------------------------------------------
@dataclass
class ClassificationCollator:
    """Collate classification items into a batch.

    Returns (from ``__call__``):
        ``pixel_values`` (B, 3, H, W) when items have pixels; ``input_ids``,
        ``attention_mask`` (B, T); ``labels`` (B,) long; ``id`` list of B strings (metadata).
    """

    tokenize: Tokenize
    max_length: int = 32
    #: The column whose text an item tokenizes (the feature cache keys text states by it).
    text_key: ClassVar[str] = "text"

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        pixels = stack_pixels(items)  # (B, 3, H, W) or None
        if pixels is not None:
            batch["pixel_values"] = pixels
        batch.update(tokenize_texts(self.tokenize, [item[self.text_key] for item in items], self.max_length))
        batch["labels"] = torch.as_tensor([item["label"] for item in items], dtype=torch.long)  # (B,)
        batch["id"] = [item["id"] for item in items]
        return batch


@dataclass(kw_only=True)
class ClassificationData(TaskData):
    """Classification splits with their label names.

    Attributes:
        label_names: class names; label ``k`` of a row is ``label_names[k]``.
    """

    label_names: list[str]
    task: str = "classification"
    id_key: str = "id"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def collator(self, tokenize: Tokenize, max_length: int = 32) -> ClassificationCollator:
        """The batch function for a DataLoader over these splits."""
        return ClassificationCollator(tokenize, max_length)


# --------------------------------------------------------------------------------------
# JSONL (Hateful Memes schema)
# --------------------------------------------------------------------------------------
@dataclass
class _ParsedSplit:
    rows: list[dict[str, Any]]
    log: ProblemLog
    source: Path
    labeled: bool


def _describe(row: dict[str, Any]) -> str:
    return row["_entry"]


def _parse_jsonl(path: Path, split: str, image_root: Path, skip_bad: bool) -> _ParsedSplit:
    log = ProblemLog(split, skip_bad)
    records = list(iter_jsonl(path, log))
    labeled = any("label" in record for _, record in records)
    rows = []
    for lineno, record in records:
        entry = jsonl_entry(lineno)
        try:
            ident = require(record, "id", (int, str), file=path, entry=entry)
            image = require(record, "img", str, file=path, entry=entry)
            text = require(record, "text", str, file=path, entry=entry)
            label = require(record, "label", (int, str), file=path, entry=entry) if labeled else None
            image_path = safe_join(image_root, image, file=path, entry=entry)
        except DataError as error:
            log.bad(error)
            continue
        rows.append({"id": str(ident), "image_path": image_path, "text": text, "raw_label": label, "_entry": entry})
    return _ParsedSplit(rows, log, path, labeled)


def _label_names(parsed: dict[str, _ParsedSplit], given: Sequence[str] | None) -> list[str]:
    """Label names from ``given`` or the training labels (see the module docstring)."""
    if given is not None:
        names = [str(n) for n in given]
        if len(set(names)) != len(names) or not names:
            raise DataError(f"label_names must be distinct and non-empty, got {names}",
                            expected="a list of distinct class names")
        return names
    sources = [parsed["train"]] if "train" in parsed and parsed["train"].labeled else \
        [part for part in parsed.values() if part.labeled]
    raw = [row["raw_label"] for part in sources for row in part.rows]
    if not raw:
        raise DataError("no labeled split to take label names from", expected="a labeled train split, or label_names=")
    if all(isinstance(v, int) for v in raw):
        if min(raw) < 0:
            raise DataError(f"negative integer label {min(raw)}", file=sources[0].source,
                            expected="label ids 0..K-1")
        names = [str(i) for i in range(max(raw) + 1)]
    else:
        names = sorted({str(v) for v in raw})
    if len(names) < 2:
        raise DataError(f"only one class ({names}) in the training labels", file=sources[0].source,
                        expected="at least two classes, or label_names=")
    return names


def _map_labels(part: _ParsedSplit, names: list[str], label_kind: type | None) -> list[dict[str, Any]]:
    """Replace ``raw_label`` by an index into ``names``; bad labels go to the split's log."""
    index = {name: i for i, name in enumerate(names)}
    kept = []
    for row in part.rows:
        raw = row["raw_label"]
        try:
            if raw is None:
                label = NO_LABEL
            elif label_kind is not None and type(raw) is not label_kind:
                raise DataError(f"label {raw!r} is {type(raw).__name__} but other labels are {label_kind.__name__}",
                                file=part.source, entry=row["_entry"], expected="all labels of one type")
            elif isinstance(raw, int):
                if not 0 <= raw < len(names):
                    raise DataError(f"label {raw} is out of range", file=part.source, entry=row["_entry"],
                                    expected=f"an id in 0..{len(names) - 1} ({', '.join(names)})")
                label = raw
            elif raw in index:
                label = index[raw]
            else:
                raise DataError(f"unknown label {raw!r}", file=part.source, entry=row["_entry"],
                                expected=f"one of {', '.join(names)}")
        except DataError as error:
            part.log.bad(error)
            continue
        kept.append({**row, "label": label})
    return kept


def load_classification_jsonl(
    root: PathLike | None = None,
    *,
    files: Mapping[str, PathLike] | PathLike | None = None,
    image_root: PathLike | None = None,
    splits: str | Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> ClassificationData:
    """Image + text classification from JSONL files (``id``, ``img``, ``text``, ``label``).

    Args:
        root: dataset folder; without ``files`` its ``*.jsonl`` are the splits
            (``train.jsonl`` -> ``train``, ``dev_seen.jsonl`` -> ``dev_seen``).
        files: ``{split: path}`` (or one path) instead of discovery.
        image_root: folder ``img`` paths are relative to (default ``root``, or the files' folder).
        splits: which splits to return (default all).
        label_names: class names (strings in the files, or names of ids 0..K-1).
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    base = Path(root) if root is not None else None
    if files is None and base is None:
        raise MissingRootError("classification-jsonl needs root= or files={split: path}", expected="root or files")
    paths = resolve_files(files, lambda: discover_files([base], "*.jsonl", what="classification JSONL"))
    images = Path(image_root) if image_root is not None else (base or next(iter(paths.values())).parent)
    wanted = select_splits(list(paths), splits, source=base or images)
    needed = list(dict.fromkeys(wanted + ([] if label_names is not None or "train" not in paths else ["train"])))
    parsed = {split: _parse_jsonl(paths[split], split, images, skip_bad) for split in needed}
    names = _label_names(parsed, label_names)
    first = next((row["raw_label"] for part in parsed.values() for row in part.rows if row["raw_label"] is not None),
                 None)
    label_kind = type(first) if first is not None else None

    splits_out, reports = {}, {}
    for split in wanted:
        part = parsed[split]
        rows = _map_labels(part, names, label_kind)
        rows = keep_present(rows, part.log, source=part.source, only_present=only_present, describe=_describe)
        if verify_images:
            rows = verify_rows(rows, part.log, source=part.source, describe=_describe)
        reports[split] = part.log.finish(len(rows), part.source)
        splits_out[split] = rows_to_dataset(rows, FEATURES)
    return ClassificationData(name="classification-jsonl", splits=splits_out, image_root=images,
                              metric="roc_auc" if len(names) == 2 else "accuracy", reports=reports,
                              label_names=names)


# --------------------------------------------------------------------------------------
# Image-caption match
# --------------------------------------------------------------------------------------
def build_caption_match(
    captions: CaptionData, *, seed: int = 0, max_captions_per_image: int | None = None
) -> ClassificationData:
    """Turn caption splits into balanced match / mismatch classification splits.

    Args:
        captions: a loaded caption dataset (image rows with all their captions).
        seed: seeds the negative sampling; the same seed gives the same pairs.
            Each split draws from its own generator (seeded by ``seed`` and the
            split name), so adding a split does not change the others.
        max_captions_per_image: use at most this many captions of each image as
            positives (the first ones); default all.

    Returns:
        ClassificationData with labels ``mismatch`` (0) and ``match`` (1); row ids
        ``"<image_id>:<caption_id>:pos"`` / ``":neg"``.
    """
    splits, reports = {}, {}
    for split, dataset in captions.splits.items():
        plain = dataset.with_format(None).to_dict()  # columns as lists; drops any image transform (no decoding)
        image_ids, paths = plain["image_id"], plain["image_path"]
        texts, text_ids = plain["captions"], plain["caption_ids"]
        if len(image_ids) < 2:
            raise DataError(f"split {split!r} has {len(image_ids)} image(s)", file=captions.image_root,
                            expected="at least two images to draw mismatched captions from")
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        rows = []
        for i, (image_id, path) in enumerate(zip(image_ids, paths)):
            limit = len(texts[i]) if max_captions_per_image is None else min(max_captions_per_image, len(texts[i]))
            for caption, caption_id in zip(texts[i][:limit], text_ids[i][:limit]):
                other = (i + int(rng.integers(1, len(image_ids)))) % len(image_ids)  # any image but i
                negative = texts[other][int(rng.integers(len(texts[other])))]
                rows.append({"id": f"{image_id}:{caption_id}:pos", "image_path": path, "text": caption, "label": 1})
                rows.append({"id": f"{image_id}:{caption_id}:neg", "image_path": path, "text": negative, "label": 0})
        splits[split] = rows_to_dataset(rows, FEATURES)
        source = captions.reports.get(split, LoadReport())
        reports[split] = LoadReport(source.bad_entries, source.missing_images, len(rows), list(source.examples))
    return ClassificationData(name="caption-match", splits=splits, image_root=captions.image_root,
                              metric="accuracy", reports=reports, label_names=list(MATCH_LABELS),
                              images=captions.images)


def load_caption_match(
    root: PathLike | None = None,
    *,
    source: str = "karpathy-captions",
    seed: int = 0,
    max_captions_per_image: int | None = None,
    **caption_kwargs: Any,
) -> ClassificationData:
    """Load a caption dataset by registry name (``source``) and build its match set.

    ``caption_kwargs`` (``splits``, ``image_root``, ``skip_bad``, ...) go to the caption loader.
    """
    captions = DATASETS.get(source)(root, **caption_kwargs)
    if not isinstance(captions, CaptionData):
        raise ValueError(f"caption-match needs a caption dataset; {source!r} gave {type(captions).__name__}")
    return build_caption_match(captions, seed=seed, max_captions_per_image=max_captions_per_image)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
register_dataset("classification-jsonl")(load_classification_jsonl)
register_dataset("caption-match")(load_caption_match)
