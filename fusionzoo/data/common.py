"""Shared pieces of the readers: safe paths, lazy images, the loaded :class:`TaskData`, collate helpers.

Every loader in :mod:`fusionzoo.data` (``vqa``, ``captions``, ``classification``) follows the
same recipe (the checks of step 1 are :mod:`fusionzoo.data.checks`'):

1. read an annotation file and check every entry against its schema; a bad entry
   raises :class:`DataError` naming the file, the entry (``line 12`` for JSONL,
   ``annotations[3] (id=1638)`` for JSON) and what was expected -- or, with
   ``skip_bad=True``, is skipped and counted in a :class:`LoadReport`;
2. turn each entry's image reference into a path under the image root, refusing
   absolute paths and paths that climb out of the root (``..``);
3. check that the images exist with one directory listing per folder (no stat
   per file, no decoding); missing images are an error that says how many and
   which, unless ``only_present=True`` (keep what is on disk) or ``skip_bad``;
   ``verify_images=True`` additionally decodes each image once;
4. store the rows -- image *paths*, never pixels -- in a ``datasets.Dataset`` per
   split, inside a :class:`TaskData` with the split's metadata.

Images are decoded only when an item is read, by :class:`ImageLoader` attached
with ``Dataset.with_transform`` (see :meth:`TaskData.with_image_transform`). A
corrupt file fails there with a :class:`DataError` naming it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import pyarrow as pa
from datasets import Dataset, Value
from PIL import Image
from torch import Tensor

from fusionzoo.losses import IGNORE_INDEX  # noqa: F401  (collates mark ignored targets with it)

from .checks import SHOW_FILES, SHOW_FIRST, DataError, LoadReport, PathLike, ProblemLog, UnknownSplitError

logger = logging.getLogger(__name__)

#: Keys of a collated batch that ``FusionModel.forward`` takes; the others are metadata. ``image_states`` and
#: ``text_states`` come from the feature cache (:mod:`fusionzoo.training.features`) instead of pixels and live text.
MODEL_INPUTS: tuple[str, ...] = ("pixel_values", "image_states", "image_mask", "input_ids", "attention_mask",
                                 "text_states", "labels")

#: Label id of an unlabeled example (a test split without answers or labels).
NO_LABEL: int = -1


#: Split names recognised at the end of a file stem (``yesno_train.jsonl`` -> ``train``).
KNOWN_SPLITS: tuple[str, ...] = ("train", "val", "validation", "dev", "test", "restval", "minival")



# --------------------------------------------------------------------------------------
# Paths under an image root
# --------------------------------------------------------------------------------------
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def safe_join(root: PathLike, relative: str, *, file: PathLike, entry: str) -> str:
    """``root/relative`` as a normalised string path, refusing paths that leave ``root``.

    Raises:
        DataError: ``relative`` is empty, absolute (``/x``, ``C:\\x``, ``\\\\host``) or
            climbs out of ``root`` with ``..``.
    """
    if not relative or not relative.strip():
        raise DataError("empty image path", file=file, entry=entry, expected="a path relative to the image root")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(relative):
        raise DataError(f"absolute image path {relative!r}", file=file, entry=entry,
                        expected=f"a path relative to the image root {root}")
    root_text = os.path.normpath(os.fspath(root))
    joined = os.path.normpath(os.path.join(root_text, relative))
    if os.path.commonpath([root_text, joined]) != root_text or joined == root_text:
        raise DataError(f"image path {relative!r} escapes the image root {root_text}", file=file, entry=entry,
                        expected="a path inside the image root (no '..' that leaves it)")
    return joined


def find_image_dir(candidates: Iterable[Path], sample: str, *, file: PathLike, what: str) -> Path:
    """The first existing folder of ``candidates`` that holds the relative path ``sample``.

    Used when an annotation file does not say where its images live (COCO's
    ``file_name`` is relative to a split folder that the user names or that sits
    next to the annotations). Falls back to the first existing candidate, so
    that the missing-image check reports what is missing.
    """
    candidates = list(dict.fromkeys(Path(c) for c in candidates))
    existing = [c for c in candidates if c.is_dir()]
    for folder in existing:
        if (folder / sample).exists():
            return folder
    if existing:
        return existing[0]
    raise DataError(
        f"no image folder found for {what}; looked in {', '.join(str(c) for c in candidates)}",
        file=file,
        expected="an existing folder; pass image_root=",
    )


def existing_files(paths: Iterable[str]) -> set[str]:
    """The subset of ``paths`` that exist, from one ``os.scandir`` per parent folder (no per-file stat)."""
    by_dir: dict[str, set[str]] = {}
    for path in paths:
        by_dir.setdefault(os.path.dirname(path), set()).add(path)
    found: set[str] = set()
    for folder, wanted in by_dir.items():
        try:
            with os.scandir(folder or ".") as entries:
                names = {entry.name for entry in entries}
        except OSError:
            continue  # a missing or unreadable folder: none of its images are present
        found.update(p for p in wanted if os.path.basename(p) in names)
    return found


def keep_present(
    rows: list[dict[str, Any]],
    log: ProblemLog,
    *,
    source: PathLike,
    only_present: bool,
    describe: Callable[[dict[str, Any]], str],
    path_key: str = "image_path",
) -> list[dict[str, Any]]:
    """Drop rows whose image is not on disk, or raise when that is not allowed.

    Args:
        rows: parsed entries, each with ``row[path_key]`` an image path.
        log: the split's problem log (counts what is dropped).
        source: the annotation file, for messages.
        only_present: keep only rows whose image exists (annotations covering
            more images than were downloaded is then expected).
        describe: ``row -> "line 12"``-style entry label for messages.
    Raises:
        DataError: some images are missing and neither ``only_present`` nor
            ``skip_bad`` is set; the message says how many, the first few, and the flags.
    """
    present = existing_files(row[path_key] for row in rows)
    missing = [row for row in rows if row[path_key] not in present]
    if not missing:
        return rows
    examples = [f"{describe(row)}: {row[path_key]}" for row in missing[:SHOW_FIRST]]
    if not (only_present or log.skip_bad):
        unique = len({row[path_key] for row in missing})
        raise DataError(
            f"{len(missing)} of {len(rows)} entries of split {log.split!r} refer to images that are not on disk "
            f"({unique} distinct files); first: {'; '.join(examples)}",
            file=source,
            expected="every referenced image under the image root",
            hint="Pass only_present=True to use only the images that are present, or fix the image root",
        )
    log.missing(len(missing), examples, list(dict.fromkeys(row[path_key] for row in missing))[:SHOW_FILES])
    return [row for row in rows if row[path_key] in present]


def verify_rows(
    rows: list[dict[str, Any]],
    log: ProblemLog,
    *,
    source: PathLike,
    describe: Callable[[dict[str, Any]], str],
    path_key: str = "image_path",
    opener: Callable[..., Image.Image] | None = None,
) -> list[dict[str, Any]]:
    """Decode each distinct image once; rows with a corrupt image raise or (``skip_bad``) are dropped.

    The error names the image file and the annotation entry (``line 2 of train.jsonl``).
    ``opener``: opens a row's ``path_key`` reference for images stored in a dataset
    (default :func:`open_image` of a file path).
    """
    status: dict[str, DataError | None] = {}
    kept = []
    for row in rows:
        path = row[path_key]
        if path not in status:
            try:
                (opener or open_image)(path, entry=describe(row))
                status[path] = None
            except DataError as error:
                status[path] = error
        error = status[path]
        if error is None:
            kept.append(row)
        else:
            log.bad(DataError(error.problem, file=path, entry=f"{describe(row)} of {source}",
                              expected=error.expected))
    return kept


# --------------------------------------------------------------------------------------
# Images, decoded lazily
# --------------------------------------------------------------------------------------
#: What PIL raises for a file that is not a decodable image (truncated, another format, too large).
IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(path: PathLike, *, entry: str | None = None) -> Image.Image:
    """Open and fully decode an image as RGB.

    Raises:
        DataError: the file is missing, unreadable, or not a decodable image; the
            message names the file and the dataset entry.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the decode, so truncation shows here
    except FileNotFoundError as exc:
        raise DataError("image file not found", file=path, entry=entry, expected="an existing image file") from exc
    except PermissionError as exc:
        raise DataError("image file is not readable (permission denied)", file=path, entry=entry,
                        expected="a readable image file") from exc
    except IMAGE_ERRORS as exc:
        raise DataError(f"cannot decode image ({type(exc).__name__}: {exc})", file=path, entry=entry,
                        expected="a valid JPEG/PNG image") from exc


@dataclass(frozen=True)
class ImageLoader:
    """``Dataset.with_transform`` function: opens each row's image and adds ``pixel_values``.

    Picklable (a plain dataclass) so DataLoader workers can use it.

    Args:
        transform: ``PIL.Image -> Tensor (3, H, W)``, e.g. ``VisionEncoder.transform(train)``.
        id_key: column that identifies a row in error messages (``question_id``, ``id``...).
        path_key: column holding the image path.
        skip_bad: an undecodable image gives ``pixel_values=None`` and its error under
            ``bad_image`` instead of raising (:class:`SkipBadImages` then leaves the row out).
        images: opens the image a row names (``images(reference, entry=...)``) when the images
            are stored inside a dataset rather than in files (see :attr:`TaskData.images`);
            None: ``path_key`` is a file path, opened with :func:`open_image`.
    """

    transform: Callable[[Image.Image], Tensor]
    id_key: str
    path_key: str = "image_path"
    skip_bad: bool = False
    images: Callable[..., Image.Image] | None = None

    def _pixels(self, path: str, ident: Any) -> tuple[Tensor | None, str | None]:
        opener = open_image if self.images is None else self.images
        try:
            return self.transform(opener(path, entry=f"{self.id_key}={ident}")), None  # (3, H, W)
        except DataError as error:
            if not self.skip_bad:
                raise DataError(error.problem, file=error.file, entry=error.entry, expected=error.expected,
                                hint="Pass skip_bad=true to leave out unreadable images") from error
            return None, str(error)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = batch.get(self.id_key, [None] * len(batch[self.path_key]))
        decoded = [self._pixels(path, ident) for path, ident in zip(batch[self.path_key], ids)]
        out = {**batch, "pixel_values": [pixels for pixels, _ in decoded]}
        if self.skip_bad:
            out["bad_image"] = [problem for _, problem in decoded]
        return out


class BadImageLog:
    """Counts rows whose image could not be decoded (``skip_bad=true``) and names the first few in a WARNING."""

    def __init__(self) -> None:
        self.skipped = 0

    def note(self, bad: list[dict[str, Any]]) -> None:
        """Count the rows of ``bad`` (items with ``pixel_values`` None and their ``bad_image`` message)."""
        for item in bad:
            self.skipped += 1
            if self.skipped <= SHOW_FIRST:
                logger.warning("skip_bad=true: left out an unreadable image (%d so far): %s", self.skipped,
                               item.get("bad_image"))


class SkipBadImages:
    """A collate wrapper that leaves out rows whose image could not be decoded (``skip_bad=true``).

    Training batches keep their size (every process of a multi-process run must take the same
    number of steps): a bad row is replaced by a copy of a good row of the same batch. Evaluation
    batches keep the bad row's place, with a good row's pixels and ``valid`` False, so that
    metrics leave it out while every process still gathers tensors of one shape.
    The bad images are counted and the first few named (:class:`BadImageLog`).

    Args:
        collate: the task's batch function.
        training: training batches (replace) or evaluation batches (mark).
    """

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], training: bool) -> None:
        self.collate, self.training = collate, training
        self.log = BadImageLog()

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [item for item in items if item.get("pixel_values") is not None]
        bad = [item for item in items if item.get("pixel_values") is None]
        self.log.note(bad)
        if bad and not good:
            raise DataError(f"every image of a batch of {len(items)} is unreadable (first: {bad[0].get('bad_image')})",
                            expected="at least one decodable image per batch")
        clean = [{k: v for k, v in item.items() if k != "bad_image"} for item in items]
        if not bad:
            return self.collate(clean)
        if self.training:
            fill = [item for item in clean if item.get("pixel_values") is not None]
            return self.collate(fill + [fill[i % len(fill)] for i in range(len(bad))])
        stand_in = good[0]["pixel_values"]
        batch = self.collate([item if item.get("pixel_values") is not None else {**item, "pixel_values": stand_in}
                              for item in clean])
        batch["valid"] = torch.tensor([item.get("pixel_values") is not None for item in items])  # (B,)
        return batch


# --------------------------------------------------------------------------------------
# The loaded dataset
# --------------------------------------------------------------------------------------
class SplitsByName:
    """``data[split]``, ``split in data`` and ``data.split_names`` over a ``splits`` dict and a ``name``."""

    splits: dict[str, Any]
    name: str

    def __getitem__(self, split: str) -> Any:
        if split not in self.splits:
            raise UnknownSplitError(
                f"dataset {self.name!r} has no split {split!r}; it has {', '.join(self.splits) or '(none)'}"
            )
        return self.splits[split]

    def __contains__(self, split: object) -> bool:
        return split in self.splits

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)


@dataclass(kw_only=True)
class TaskData(SplitsByName):
    """Splits of one dataset with the metadata a model, trainer and benchmark need.

    Attributes:
        name: registry name of the loader (``easy-vqa``, ``coco-captions``, ...).
        task: the task it serves (``vqa``, ``captioning``, ``classification``).
        splits: split name -> ``datasets.Dataset`` of rows holding image paths.
        image_root: folder the image paths are under.
        metric: the task's headline metric name.
        reports: split name -> :class:`LoadReport` (what was skipped).
        id_key: the column that identifies a row.
        images: None when ``image_path`` holds file paths (the usual case); for images stored
            inside a dataset (a ``datasets`` Image column), the picklable callable
            ``images(reference, entry=...) -> PIL.Image`` that opens the image a row's
            ``image_path`` names.
    """

    name: str
    task: str
    splits: dict[str, Dataset]
    image_root: Path
    metric: str
    reports: dict[str, LoadReport] = field(default_factory=dict)
    id_key: str = "id"
    images: Callable[..., Image.Image] | None = field(default=None, repr=False)

    @property
    def skipped(self) -> dict[str, int]:
        """Split -> number of entries dropped (bad entries and missing images)."""
        return {split: report.skipped for split, report in self.reports.items()}

    def with_image_transform(
        self,
        transform: Callable[[Image.Image], Tensor],
        train_transform: Callable[[Image.Image], Tensor] | None = None,
        train_splits: Sequence[str] = ("train",),
        skip_bad: bool = False,
    ) -> "TaskData":
        """A copy whose splits decode images lazily and add ``pixel_values`` (3, H, W) to each item.

        Args:
            transform: image transform of evaluation splits (``encoder.transform(train=False)``).
            train_transform: transform of the ``train_splits`` (augmentation); default ``transform``.
            skip_bad: an undecodable image gives ``pixel_values=None`` instead of an error
                (see :class:`SkipBadImages`).
        """
        splits = {}
        for split, dataset in self.splits.items():
            chosen = train_transform if (train_transform is not None and split in train_splits) else transform
            splits[split] = dataset.with_transform(ImageLoader(chosen, self.id_key, skip_bad=skip_bad,
                                                               images=self.images))
        return replace(self, splits=splits)

    def describe(self) -> str:
        sizes = ", ".join(f"{split}={len(ds):,}" for split, ds in self.splits.items())
        return f"{self.name} ({self.task}, metric={self.metric}): {sizes}; images under {self.image_root}"


def select_splits(available: Sequence[str], wanted: str | Sequence[str] | None, *, source: PathLike) -> list[str]:
    """The requested split names in order (all ``available`` ones for ``None``); unknown ones fail."""
    if wanted is None:
        return list(available)
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise UnknownSplitError(
            f"{source}: no split {', '.join(repr(s) for s in unknown)}; available: {', '.join(available) or '(none)'}"
        )
    return wanted


def split_order(name: str) -> tuple[int, str]:
    """Sort key that lists ``train`` first, then validation-like splits, then the rest by name."""
    if name == "train":
        return (0, name)
    if name in ("val", "validation", "dev", "minival") or name.startswith(("val", "dev")):
        return (1, name)
    return (2, name)


def split_from_stem(stem: str) -> str:
    """Split name from a file stem: the last ``_``/``-`` part if it is a known split, else the stem.

    ``yesno_train`` -> ``train``, ``dev_seen`` -> ``dev_seen``, ``test`` -> ``test``.
    """
    last = re.split(r"[_\-]", stem)[-1]
    return last if last in KNOWN_SPLITS else stem


def discover_files(folders: Sequence[Path], pattern: str, *, what: str) -> dict[str, Path]:
    """Split name -> file for ``pattern`` in the first of ``folders`` that has matches."""
    for folder in folders:
        matches = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if matches:
            files: dict[str, Path] = {}
            for path in matches:
                split = split_from_stem(path.stem)
                if split in files:
                    raise DataError(f"two {what} files map to split {split!r}: {files[split].name}, {path.name}",
                                    file=folder, expected="one file per split; pass files={split: path}")
                files[split] = path
            return dict(sorted(files.items(), key=lambda item: split_order(item[0])))
    raise DataError(
        f"no {what} files ({pattern}) found in {', '.join(str(f) for f in folders)}",
        expected=f"{pattern} files, or files={{split: path}}",
    )


def resolve_files(
    files: Mapping[str, PathLike] | PathLike | None, default: Callable[[], dict[str, Path]]
) -> dict[str, Path]:
    """Normalise a ``files`` argument: mapping, a single file (split from its stem), or discovery."""
    if files is None:
        return default()
    if isinstance(files, (str, os.PathLike)):
        path = Path(files)
        return {split_from_stem(path.stem): path}
    return {str(split): Path(path) for split, path in files.items()}


# --------------------------------------------------------------------------------------
# Collate helpers
# --------------------------------------------------------------------------------------
Tokenize = Callable[..., Mapping[str, Tensor]]


def stack_pixels(items: Sequence[Mapping[str, Any]]) -> Tensor | None:
    """Stack the items' ``pixel_values`` (3, H, W) into (B, 3, H, W); None when items have none."""
    if "pixel_values" not in items[0]:
        return None
    pixels = [item["pixel_values"] for item in items]
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) != 1:
        raise ValueError(f"images of one batch must share a shape after the transform, got {sorted(shapes)}")
    return torch.stack(pixels)  # (B, 3, H, W)


def tokenize_texts(tokenize: Tokenize, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Run a ``TextEncoder.tokenize``-like callable; returns ``input_ids``/``attention_mask`` (B, T)."""
    tokens = tokenize(list(texts), max_length=max_length)
    missing = {"input_ids", "attention_mask"} - set(tokens)
    if missing:
        raise ValueError(f"the tokenize callable must return input_ids and attention_mask; missing {sorted(missing)}")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a collated batch that ``FusionModel.forward(**inputs)`` takes."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def _arrow_native(feature: Any) -> bool:
    """True for a ``Value`` or a list of them: a feature whose Python values Arrow takes as they are."""
    inner = getattr(feature, "feature", None)
    return isinstance(feature, Value) or (inner is not None and _arrow_native(inner))


def rows_to_dataset(rows: list[dict[str, Any]], features: Any) -> Dataset:
    """A ``datasets.Dataset`` from parsed rows with fixed, explicit features (deterministic schema).

    Columns of plain values (the parsers' rows, already checked) go to Arrow arrays directly,
    skipping ``datasets``' per-value encoding (Python code run for every value), a large share
    of the time of loading a set of Sort-of-CLEVR's size. Any other feature (an ``Image``,
    say) is encoded by ``datasets``.
    """
    if all(_arrow_native(feature) for feature in features.values()):
        schema = features.arrow_schema
        columns = {name: pa.array([row[name] for row in rows], type=schema.field(name).type) for name in features}
    else:
        columns = {name: [row[name] for row in rows] for name in features}
    return Dataset.from_dict(columns, features=features)
