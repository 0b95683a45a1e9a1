"""Image-text pairs in JSONL or a JSON list (ALBEF's pretraining format), as :class:`CaptionData`.

``image-text-jsonl``: each entry is one object ``{"image": path, "caption": text}``; ``caption``
may also be a list of texts, or the entry may have ``captions``, a list of texts, instead.
Other keys are ignored. A file is either one object a line (``.jsonl``) or one JSON list of
such objects (``.json``, the layout of ALBEF's ``coco.json`` and ``cc3m_train.json``, Li et al.,
2021). ``image`` is relative to the folder of the file it is in (or to ``image_root=``);
absolute paths and paths that leave that folder are refused.

Splits: without ``files``, the ``*.jsonl`` and ``*.json`` files of ``root`` whose name ends
in a split name (``train.jsonl``, ``val.jsonl``, ``cc3m_test.json``); with ``files``, a path
(its split from its name, ``train`` when the name is not a split's), a list of paths (one
``train`` split read from all of them, as ALBEF's ``train_file`` list) or ``{split: path or
list of paths}``.

Entries of a split that name the same image become one image row holding all their
captions (COCO's five captions of an image are five entries). Image ids are numbered in
the order images first appear, over all the splits loaded, so an image in two splits has
one id; caption ids are numbered the same way. The result is the same :class:`CaptionData`
the COCO loaders give, so pretraining, captioning, retrieval and ``caption-match`` read it
unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionzoo.registry import register_dataset

from .captions import CaptionData, ParsedCaptions, build_caption_data
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
from .common import KNOWN_SPLITS, safe_join, select_splits, split_from_stem, split_order

CAPTION_EXPECTED = "'caption' holding a string or a list of strings, or 'captions' holding a list of strings"


# --------------------------------------------------------------------------------------
# Which files are which split
# --------------------------------------------------------------------------------------
def _split_of_file(path: Path) -> str:
    """The split a lone file is: the split its name ends in, else ``train``."""
    split = split_from_stem(path.stem)
    return split if split in KNOWN_SPLITS else "train"


def _discover(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError("dataset folder not found", file=root, expected="a folder of train.jsonl / val.jsonl ... files")
    found: dict[str, list[Path]] = {}
    for path in sorted([*root.glob("*.jsonl"), *root.glob("*.json")]):
        split = split_from_stem(path.stem)
        if split in KNOWN_SPLITS:
            found.setdefault(split, []).append(path)
    if not found:
        raise DataError("no image-text files found", file=root,
                        expected="train.jsonl, val.jsonl, test.jsonl (or .json lists) in the folder, or data_files=")
    return dict(sorted(found.items(), key=lambda item: split_order(item[0])))


def resolve_split_files(files: Mapping[str, Any] | Sequence[PathLike] | PathLike | None,
                        root: Path | None) -> dict[str, list[Path]]:
    """Split -> files from a ``files`` argument (see the module docstring); relative paths are under ``root``."""
    def place(path: PathLike) -> Path:
        path = Path(path)
        return path if path.is_absolute() or root is None else root / path

    if files is None:
        if root is None:
            raise MissingRootError("image-text-jsonl needs root= or files=", expected="root or files")
        return _discover(root)
    if isinstance(files, (str, os.PathLike)):
        path = place(files)
        return {_split_of_file(path): [path]}
    if isinstance(files, Mapping):
        out = {}
        for split, value in files.items():
            paths = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            out[str(split)] = [place(p) for p in paths]
        return out
    return {"train": [place(p) for p in files]}


# --------------------------------------------------------------------------------------
# Reading entries
# --------------------------------------------------------------------------------------
def _entries(path: Path, log: ProblemLog) -> Iterator[tuple[str, Any]]:
    """``(entry label, object)`` of each entry of a JSONL file or a JSON list file."""
    if path.suffix.lower() == ".jsonl":
        for lineno, record in iter_jsonl(path, log):
            yield jsonl_entry(lineno), record
        return
    data = read_json(path, what="image-text file")
    if not isinstance(data, list):
        raise DataError(f"a JSON {type(data).__name__} at the top level", file=path, entry="top level",
                        expected="a JSON list of {\"image\": ..., \"caption\": ...} objects (or a .jsonl file)")
    if not data:
        raise DataError("the JSON list is empty", file=path, entry="top level", expected="at least one entry")
    yield from ((json_entry("", i), record) for i, record in enumerate(data))


def _captions(record: Any, *, file: Path, entry: str) -> list[str]:
    """The entry's captions, stripped; a missing, mistyped or empty caption is a :class:`DataError`."""
    if isinstance(record, dict) and "captions" in record:
        texts = require_str_list(record, "captions", file=file, entry=entry)
        key = "captions"
    elif isinstance(record, dict) and "caption" in record:
        value = require(record, "caption", (str, list), file=file, entry=entry)
        texts = [value] if isinstance(value, str) else require_str_list(record, "caption", file=file, entry=entry)
        key = "caption"
    else:
        raise DataError("missing key 'caption' (or 'captions')", file=file, entry=entry, expected=CAPTION_EXPECTED)
    if any(not text.strip() for text in texts):
        raise DataError(f"empty caption in {key!r}", file=file, entry=entry, expected="non-empty caption texts")
    return [text.strip() for text in texts]


class _Numbering:
    """Image ids by image path (first appearance) and caption ids, shared by every split of one load."""

    def __init__(self) -> None:
        self.images: dict[str, int] = {}
        self.captions = 0

    def image(self, path: str) -> int:
        return self.images.setdefault(path, len(self.images))

    def caption_ids(self, count: int) -> list[int]:
        first, self.captions = self.captions, self.captions + count
        return list(range(first, first + count))


def _parse_split(split: str, paths: list[Path], image_root: Path | None, numbers: _Numbering,
                 skip_bad: bool) -> ParsedCaptions:
    log = ProblemLog(split, skip_bad)
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        base = image_root if image_root is not None else path.parent
        for entry, record in _entries(path, log):
            try:
                image = require(record, "image", str, file=path, entry=entry)
                captions = _captions(record, file=path, entry=entry)
                image_path = safe_join(base, image, file=path, entry=entry)
            except DataError as error:
                log.bad(error)
                continue
            row = rows.get(image_path)
            if row is None:
                row = rows[image_path] = {"image_id": numbers.image(image_path), "image_path": image_path,
                                          "captions": [], "caption_ids": [], "_entry": f"{entry} of {path.name}"}
            row["captions"].extend(captions)
            row["caption_ids"].extend(numbers.caption_ids(len(captions)))
    return ParsedCaptions(list(rows.values()), log, paths[0] if len(paths) == 1 else paths[0].parent)


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------
def load_image_text_jsonl(
    root: PathLike | None = None,
    *,
    files: Mapping[str, Any] | Sequence[PathLike] | PathLike | None = None,
    image_root: PathLike | None = None,
    splits: str | Sequence[str] | None = None,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> CaptionData:
    """Image-caption pairs from JSONL / JSON list files (see the module docstring).

    Args:
        root: dataset folder; without ``files`` its ``train.jsonl``, ``val.jsonl`` ... are the splits.
        files: a path, a list of paths (one ``train`` split) or ``{split: path or paths}``;
            relative paths are under ``root`` when it is given.
        image_root: the folder ``image`` paths are relative to (default: each file's folder).
        splits: which splits to return (default all found).
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    base = Path(root) if root is not None else None
    paths = resolve_split_files(files, base)
    wanted = select_splits(list(paths), splits, source=base or paths[next(iter(paths))][0])
    numbers = _Numbering()
    images = Path(image_root) if image_root is not None else None
    parsed = {split: _parse_split(split, paths[split], images, numbers, skip_bad) for split in wanted}
    first = paths[wanted[0]][0]
    return build_caption_data("image-text-jsonl", parsed, image_root=images or first.parent,
                              only_present=only_present, verify_images=verify_images)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
register_dataset("image-text-jsonl")(load_image_text_jsonl)
