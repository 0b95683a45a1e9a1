"""Image captioning data: official COCO caption files and Karpathy's split file.

Two sources, one result (:class:`CaptionData`):

* ``coco-captions`` -- ``captions_<subtype>.json`` in the official COCO schema
  (Chen et al., 2015, "Microsoft COCO Captions"): ``images[]`` with ``id`` and
  ``file_name``, ``annotations[]`` with ``image_id``, ``id`` and ``caption``.
  One file is one split, named by the subtype without its year
  (``captions_val2014.json`` -> ``val``, ``captions_mini.json`` -> ``mini``).
  ``file_name`` is relative to the split's image folder, found as the first of
  ``<base>/<subtype>``, ``<base>/<folder in the file name>`` (``COCO_val2014_...``
  -> ``val2014``), ``<base>`` that holds the first image, for ``base`` in
  ``image_root`` (if given) or ``root``, ``root/images``.
* ``karpathy-captions`` -- Karpathy & Fei-Fei's (2015) ``dataset_coco.json``:
  ``images[]`` with ``filepath``, ``filename``, ``split``, ``cocoid`` (or
  ``imgid``) and ``sentences[].raw``; the ``split`` field gives the splits
  (``restval`` joins ``train`` unless ``merge_restval=False``). Images are at
  ``<image_root>/<filepath>/<filename>``.

Rows are images (``image_id``, ``image_path``, ``captions``, ``caption_ids``), the
form evaluation needs (all references of an image); :meth:`CaptionData.pairs`
gives one row per caption for teacher-forced training. Captions are stripped of
surrounding whitespace and otherwise kept as written. Headline metric: ``cider``
(scored by :mod:`fusionzoo.tasks.caption_eval`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset, Features, Sequence as ListOf, Value
from PIL import Image
from torch import Tensor

from fusionzoo.registry import register_dataset

from .checks import DataError, MissingRootError, PathLike, ProblemLog, json_entry, read_json, require
from .common import (
    IGNORE_INDEX,
    ImageLoader,
    TaskData,
    Tokenize,
    find_image_dir,
    keep_present,
    rows_to_dataset,
    safe_join,
    select_splits,
    split_order,
    stack_pixels,
    tokenize_texts,
    verify_rows,
)

IMAGE_FEATURES = Features({
    "image_id": Value("int64"),
    "image_path": Value("string"),
    "captions": ListOf(Value("string")),  # every reference caption of the image
    "caption_ids": ListOf(Value("int64")),  # their annotation / sentence ids
})
PAIR_FEATURES = Features({
    "image_id": Value("int64"),
    "image_path": Value("string"),
    "caption": Value("string"),
    "caption_id": Value("int64"),
})


# --------------------------------------------------------------------------------------
# The loaded data and its batches
# --------------------------------------------------------------------------------------
@dataclass
class CaptionCollator:
    """Collate caption items (image rows or caption pairs) into a batch.

    Pair rows use their ``caption``; image rows use their first caption (for a
    validation loss; generation reads only the pixels and ``image_id``).

    Args:
        tokenize: ``TextEncoder.tokenize``-like ``(texts, max_length) -> {"input_ids", "attention_mask"}``.
        max_length: longest caption in tokens (longer ones are truncated).

    Returns (from ``__call__``):
        ``pixel_values`` (B, 3, H, W) when items have pixels; ``input_ids``,
        ``attention_mask`` (B, T); ``labels`` (B, T) long, the caption ids with
        padding set to -100; ``image_id`` (B,) long (metadata).
    """

    tokenize: Tokenize
    max_length: int = 32
    #: The column whose text a pair row tokenizes (the feature cache keys text states by it).
    text_key: ClassVar[str] = "caption"

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        pixels = stack_pixels(items)  # (B, 3, H, W) or None
        if pixels is not None:
            batch["pixel_values"] = pixels
        texts = [item[self.text_key] if self.text_key in item else item["captions"][0] for item in items]
        batch.update(tokenize_texts(self.tokenize, texts, self.max_length))
        batch["labels"] = batch["input_ids"].long().masked_fill(~batch["attention_mask"].bool(), IGNORE_INDEX)  # (B, T)
        batch["image_id"] = torch.as_tensor([item["image_id"] for item in items], dtype=torch.long)  # (B,)
        return batch


@dataclass(kw_only=True)
class CaptionData(TaskData):
    """Caption splits: one row per image, plus one-row-per-caption views (see the module docstring).

    Attributes:
        pair_splits: split -> Dataset with one row per (image, caption).
    """

    task: str = "captioning"
    metric: str = "cider"
    id_key: str = "image_id"
    pair_splits: dict[str, Dataset] = field(default_factory=dict, repr=False)

    def pairs(self, split: str) -> Dataset:
        """One row per caption of ``split`` (``image_id``, ``image_path``, ``caption``, ``caption_id``)."""
        self[split]  # the same error as for the image rows when the split does not exist
        return self.pair_splits[split]

    def references(self, split: str) -> dict[int, list[str]]:
        """``image_id -> reference captions`` of ``split``, for caption metrics."""
        pairs = self.pairs(split).with_format(None).to_dict()  # columns as lists, no image decoding
        refs: dict[int, list[str]] = {}
        for image_id, caption in zip(pairs["image_id"], pairs["caption"]):
            refs.setdefault(image_id, []).append(caption)
        return refs

    def with_image_transform(
        self,
        transform: Callable[[Image.Image], Tensor],
        train_transform: Callable[[Image.Image], Tensor] | None = None,
        train_splits: Sequence[str] = ("train",),
        skip_bad: bool = False,
    ) -> "CaptionData":
        """As :meth:`TaskData.with_image_transform`, for the image rows and the caption pairs."""
        out = super().with_image_transform(transform, train_transform, train_splits, skip_bad)
        pairs = {}
        for split, dataset in self.pair_splits.items():
            chosen = train_transform if (train_transform is not None and split in train_splits) else transform
            pairs[split] = dataset.with_transform(ImageLoader(chosen, self.id_key, skip_bad=skip_bad,
                                                              images=self.images))
        return replace(out, pair_splits=pairs)

    def collator(self, tokenize: Tokenize, max_length: int = 32) -> CaptionCollator:
        """The batch function for a DataLoader over image rows or caption pairs."""
        return CaptionCollator(tokenize, max_length)


# --------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------
@dataclass
class ParsedCaptions:
    """One split's parsed image rows (``image_id``, ``image_path``, ``captions``, ``caption_ids``, ``_entry``)."""

    rows: list[dict[str, Any]]
    log: ProblemLog
    source: Path


def _describe(row: dict[str, Any]) -> str:
    return row["_entry"]


def build_caption_data(name: str, parsed: dict[str, ParsedCaptions], *, image_root: Path, only_present: bool,
                       verify_images: bool, images: Callable[..., Image.Image] | None = None) -> CaptionData:
    """The :class:`CaptionData` of parsed splits: missing images dropped or reported, pair views built.

    Every caption loader ends here (the COCO and Karpathy files, image-text JSONL, ``datasets``).

    Args:
        name: the loader's registry name.
        parsed: split -> its parsed rows and problem log.
        image_root: the folder the images are under (for messages and ``describe()``).
        only_present, verify_images: see :mod:`fusionzoo.data.common`.
        images: for images stored inside a dataset, the callable that opens a row's
            ``image_path`` reference (see :attr:`TaskData.images`); nothing is then looked up on disk.
    """
    splits, pairs, reports = {}, {}, {}
    for split, part in parsed.items():
        rows = part.rows
        if images is None:
            rows = keep_present(rows, part.log, source=part.source, only_present=only_present, describe=_describe)
        if verify_images:
            rows = verify_rows(rows, part.log, source=part.source, describe=_describe, opener=images)
        reports[split] = part.log.finish(len(rows), part.source)
        splits[split] = rows_to_dataset(rows, IMAGE_FEATURES)
        flat = [
            {"image_id": row["image_id"], "image_path": row["image_path"], "caption": caption, "caption_id": cid}
            for row in rows
            for caption, cid in zip(row["captions"], row["caption_ids"])
        ]
        pairs[split] = rows_to_dataset(flat, PAIR_FEATURES)
    return CaptionData(name=name, splits=splits, pair_splits=pairs, image_root=image_root, reports=reports,
                       images=images)


# --------------------------------------------------------------------------------------
# Official COCO captions
# --------------------------------------------------------------------------------------
_COCO_FOLDER = re.compile(r"^COCO_([A-Za-z\-]+\d{4})_")


def coco_split_name(subtype: str) -> str:
    """``val2014`` -> ``val``, ``mini`` -> ``mini``: the subtype without its year."""
    return re.sub(r"\d{4}$", "", subtype) or subtype


def _discover_coco(root: Path) -> dict[str, Path]:
    for folder in (root / "annotations", root):
        matches = sorted(folder.glob("captions_*.json")) if folder.is_dir() else []
        if matches:
            found = {coco_split_name(path.stem[len("captions_"):]): path for path in matches}
            return dict(sorted(found.items(), key=lambda item: split_order(item[0])))
    raise DataError(f"no COCO caption files (captions_*.json) in {root} or {root / 'annotations'}", file=root,
                    expected="captions_<subtype>.json, or files={split: path}")


def _parse_coco(
    path: Path, split: str, image_root: Path | None, root: Path | None, skip_bad: bool
) -> tuple[ParsedCaptions, Path]:
    log = ProblemLog(split, skip_bad)
    data = read_json(path, what="COCO captions file")
    images = require(data, "images", list, file=path, entry="top level")
    annotations = require(data, "annotations", list, file=path, entry="top level")
    for key, items in (("images", images), ("annotations", annotations)):
        if not items:
            raise DataError(f"{key!r} is an empty list", file=path, entry="top level",
                            expected=f"the split's {key}")

    first_name = next((im["file_name"] for im in images if isinstance(im, dict)
                       and isinstance(im.get("file_name"), str)), "")
    subtype = path.stem[len("captions_"):] if path.stem.startswith("captions_") else path.stem
    match = _COCO_FOLDER.match(first_name)
    if image_root is not None:
        bases = [image_root]
    elif root is not None:
        bases = [root, root / "images"]
    else:  # next to the annotations folder, as COCO unpacks
        bases = [path.parent.parent, path.parent.parent / "images", path.parent]
    candidates = [c for b in bases for c in (b / subtype, *([b / match.group(1)] if match else []), b)]
    base = find_image_dir(candidates, first_name, file=path, what=f"COCO caption split {split!r}")

    by_id: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(images):
        entry = json_entry("images", i, im.get("id") if isinstance(im, dict) else None)
        try:
            image_id = require(im, "id", int, file=path, entry=entry)
            file_name = require(im, "file_name", str, file=path, entry=entry)
            if image_id in by_id:
                raise DataError(f"duplicate image id {image_id}", file=path, entry=entry, expected="unique ids")
            image_path = safe_join(base, file_name, file=path, entry=entry)
        except DataError as error:
            log.bad(error)
            continue
        by_id[image_id] = {"image_id": image_id, "image_path": image_path, "captions": [], "caption_ids": [],
                           "_entry": entry}
    known = {im.get("id") for im in images if isinstance(im, dict)}
    for j, ann in enumerate(annotations):
        entry = json_entry("annotations", j, ann.get("id") if isinstance(ann, dict) else None)
        try:
            cid = require(ann, "id", int, file=path, entry=entry)
            image_id = require(ann, "image_id", int, file=path, entry=entry)
            caption = require(ann, "caption", str, file=path, entry=entry)
            if image_id not in known:
                raise DataError(f"image_id {image_id} is not in 'images'", file=path, entry=entry,
                                expected="an image_id listed in 'images'")
            if not caption.strip():
                raise DataError("empty caption", file=path, entry=entry, expected="a non-empty caption")
        except DataError as error:
            log.bad(error)
            continue
        if image_id in by_id:  # else its image entry was bad and already counted
            by_id[image_id]["captions"].append(caption.strip())
            by_id[image_id]["caption_ids"].append(cid)

    rows = []
    for row in by_id.values():
        if not row["captions"]:
            log.bad(DataError(f"image {row['image_id']} has no captions", file=path, entry=row["_entry"],
                              expected="at least one annotation with its image_id"))
            continue
        rows.append(row)
    return ParsedCaptions(rows, log, path), base


def load_coco_captions(
    root: PathLike | None = None,
    *,
    files: Mapping[str, PathLike] | PathLike | None = None,
    image_root: PathLike | None = None,
    splits: str | Sequence[str] | None = None,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> CaptionData:
    """Official COCO caption files, one split per ``captions_<subtype>.json``.

    Args:
        root: COCO folder; without ``files`` its ``annotations/captions_*.json``
            (or ``captions_*.json``) are the splits.
        files: ``{split: path}`` or one path instead of discovery.
        image_root: base folder of the images (see the module docstring).
        splits: which splits to return (default all found).
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    base = Path(root) if root is not None else None
    if files is None:
        if base is None:
            raise MissingRootError("coco-captions needs root= or files={split: path}", expected="root or files")
        paths = _discover_coco(base)
    elif isinstance(files, Mapping):
        paths = {str(s): Path(p) for s, p in files.items()}
    else:
        path = Path(files)
        paths = {coco_split_name(path.stem.removeprefix("captions_")): path}
    wanted = select_splits(list(paths), splits, source=base or next(iter(paths.values())))
    parsed, folders = {}, []
    for split in wanted:
        parsed[split], folder = _parse_coco(paths[split], split, Path(image_root) if image_root else None,
                                            base, skip_bad)
        folders.append(folder)
    return build_caption_data("coco-captions", parsed, image_root=folders[0], only_present=only_present,
                  verify_images=verify_images)


# --------------------------------------------------------------------------------------
# Karpathy split file
# --------------------------------------------------------------------------------------
KARPATHY_NAMES = ("dataset_coco.json", "karpathy*.json", "dataset_*.json")


def _discover_karpathy(root: Path) -> Path:
    for folder in (root, root / "annotations"):
        for pattern in KARPATHY_NAMES:
            matches = sorted(folder.glob(pattern)) if folder.is_dir() else []
            if matches:
                return matches[0]
    raise DataError(f"no Karpathy split file ({', '.join(KARPATHY_NAMES)}) in {root} or {root / 'annotations'}",
                    file=root, expected="dataset_coco.json, or file=path")


def _parse_karpathy(path: Path, image_root: Path | None, root: Path | None, merge_restval: bool,
                    skip_bad: bool) -> tuple[dict[str, ParsedCaptions], Path]:
    data = read_json(path, what="Karpathy split file")
    images = require(data, "images", list, file=path, entry="top level")
    if not images:
        raise DataError("'images' is an empty list", file=path, entry="top level", expected="the dataset's images")

    first = next((im for im in images if isinstance(im, dict) and isinstance(im.get("filename"), str)), {})
    sample = f"{first.get('filepath', '')}/{first.get('filename', '')}".lstrip("/")
    if image_root is not None:
        candidates = [image_root]
    else:
        bases = [root, root / "images"] if root is not None else [path.parent, path.parent.parent / "images"]
        candidates = [*bases, path.parent.parent]
    base = find_image_dir(candidates, sample, file=path, what="the Karpathy images")

    logs: dict[str, ProblemLog] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    pending: list[DataError] = []  # errors of entries whose split is unknown (attributed to 'train')
    for i, im in enumerate(images):
        ident = im.get("cocoid", im.get("imgid")) if isinstance(im, dict) else None
        entry = json_entry("images", i, ident, "cocoid" if isinstance(im, dict) and "cocoid" in im else "imgid")
        split = im.get("split") if isinstance(im, dict) and isinstance(im.get("split"), str) else None
        if split == "restval" and merge_restval:
            split = "train"
        try:
            require(im, "split", str, file=path, entry=entry)
            filename = require(im, "filename", str, file=path, entry=entry)
            filepath = require(im, "filepath", str, file=path, entry=entry) if "filepath" in im else ""
            key = "cocoid" if "cocoid" in im else "imgid"
            image_id = require(im, key, int, file=path, entry=entry)
            sentences = require(im, "sentences", list, file=path, entry=entry)
            if not sentences:
                raise DataError("'sentences' is an empty list", file=path, entry=entry, expected="the image's captions")
            captions, caption_ids = [], []
            for k, sentence in enumerate(sentences):
                raw = require(sentence, "raw", str, file=path, entry=f"{entry}, sentences[{k}]")
                if not raw.strip():
                    raise DataError("empty caption", file=path, entry=f"{entry}, sentences[{k}]",
                                    expected="a non-empty 'raw' caption")
                sid = sentence.get("sentid", k)
                caption_ids.append(sid if isinstance(sid, int) and not isinstance(sid, bool) else k)
                captions.append(raw.strip())
            image_path = safe_join(base, f"{filepath}/{filename}" if filepath else filename, file=path, entry=entry)
        except DataError as error:
            if split is None:
                pending.append(error)
            else:
                logs.setdefault(split, ProblemLog(split, skip_bad)).bad(error)
            continue
        logs.setdefault(split, ProblemLog(split, skip_bad))
        rows.setdefault(split, []).append({"image_id": image_id, "image_path": image_path, "captions": captions,
                                           "caption_ids": caption_ids, "_entry": entry})
    for error in pending:
        logs.setdefault("train", ProblemLog("train", skip_bad)).bad(error)
    order = sorted(logs, key=split_order)
    return {split: ParsedCaptions(rows.get(split, []), logs[split], path) for split in order}, base


def load_karpathy_captions(
    root: PathLike | None = None,
    *,
    file: PathLike | None = None,
    image_root: PathLike | None = None,
    splits: str | Sequence[str] | None = None,
    merge_restval: bool = True,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> CaptionData:
    """Captions with Karpathy's train/val/test split (``dataset_coco.json`` schema).

    Args:
        root: folder holding the split file (``dataset_coco.json`` or ``karpathy*.json``,
            directly or in ``annotations/``) and the images (under ``root`` or ``root/images``).
        file: the split file, instead of discovery.
        image_root: folder that ``<filepath>/<filename>`` is relative to.
        splits: which splits to return (default all in the file).
        merge_restval: count ``restval`` images as ``train`` (the usual 113k-image training set).
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    base = Path(root) if root is not None else None
    if file is None and base is None:
        raise MissingRootError("karpathy-captions needs root= or file=", expected="root or file")
    path = Path(file) if file is not None else _discover_karpathy(base)
    parsed, folder = _parse_karpathy(path, Path(image_root) if image_root else None, base, merge_restval, skip_bad)
    wanted = select_splits(list(parsed), splits, source=path)
    return build_caption_data("karpathy-captions", {split: parsed[split] for split in wanted}, image_root=folder,
                  only_present=only_present, verify_images=verify_images)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
register_dataset("coco-captions")(load_coco_captions)
register_dataset("karpathy-captions")(load_karpathy_captions)
