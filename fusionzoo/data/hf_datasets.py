"""Image-caption data through the ``datasets`` library: a hub dataset or a local folder, mapped or streamed.

``hf-datasets`` reads what ``datasets.load_dataset`` reads -- a hub name such as
``nlphuji/flickr30k`` (from the local cache when ``HF_DATASETS_OFFLINE=1``), a local folder of
parquet / JSON / CSV / image files, or ``files=`` (``data_files=``) -- and a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``).

Two columns are used:

* the image column (``image_column=``; default the first of ``image``, ``img``, ``jpg``,
  ``png``, ``webp``, ``image_path``, ``file_name``, ``filepath``, ``path``): a ``datasets``
  ``Image`` feature, encoded bytes, a PIL image, or a path (relative to ``image_root``, else
  the dataset folder);
* the caption column (``caption_column=``; default the first of ``caption``, ``captions``,
  ``text``, ``sentences``, ``sentence``, ``txt``, ``raw``): a string, a list of strings, or a
  list of ``{"raw": text}`` objects (Karpathy's ``sentences``).

``streaming=False`` gives :class:`~fusionzoo.data.captions.CaptionData`, like every map-style
caption loader: with path images, rows naming one image are one image row with all
their captions; with images stored in the dataset, each row is an image, its
``image_path`` a reference ``hf://<split>/<row>`` that :class:`DatasetImages` opens when the
row is read (nothing is copied). ``streaming=True`` gives
:class:`~fusionzoo.data.streaming.StreamData`: the dataset's shards are the stream's shards
(a ``save_to_disk`` folder is cut into shards of about 1,000 rows), read with
``IterableDataset.iter`` so that the stream, not ``datasets``, splits them over processes
and workers. A row without a usable image or caption is skipped and counted there, and is
an error (or skipped with ``skip_bad``) in the mapped form.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fusionzoo.registry import register_dataset

from .captions import CaptionData, ParsedCaptions, build_caption_data
from .checks import DataError, MissingRootError, PathLike, ProblemLog
from .common import safe_join, select_splits, split_order
from .streaming import BadSample, ImageTextStream, RawSample, StreamData, StreamOptions, StreamSource, decode_image

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "image_path", "file_name", "filepath", "path")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence", "txt", "raw")
REFERENCE = "hf://"
#: Rows per shard when a ``save_to_disk`` folder is streamed.
ROWS_PER_SHARD = 1000
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow",
             ".txt": "text", ".jpg": "imagefolder", ".jpeg": "imagefolder", ".png": "imagefolder",
             ".webp": "imagefolder"}


# --------------------------------------------------------------------------------------
# Loading with datasets
# --------------------------------------------------------------------------------------
def _builder_for(files: Any) -> str:
    first = files
    while not isinstance(first, (str, os.PathLike)):
        values = list(first.values()) if isinstance(first, dict) else list(first)
        if not values:
            break
        first = values[0]
    suffix = Path(os.fspath(first)).suffix.lower() if isinstance(first, (str, os.PathLike)) else ""
    if suffix not in _BUILDERS:
        raise DataError(f"cannot tell the file format of data_files {files!r}", expected=
                        f"files ending in {', '.join(sorted(_BUILDERS))}, or data_dir=<a dataset folder or hub name>")
    return _BUILDERS[suffix]


def _load(root: str | None, files: Any, name: str | None, streaming: bool) -> dict[str, Any]:
    """Split -> ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``)."""
    import datasets

    local = root is not None and Path(root).is_dir()
    saved = local and any((Path(root) / marker).is_file() for marker in ("dataset_dict.json", "state.json"))
    where = root or str(files)
    try:
        if saved:
            loaded = datasets.load_from_disk(root)
            parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            if streaming:
                parts = {split: ds.to_iterable_dataset(num_shards=max(1, min(len(ds) // ROWS_PER_SHARD, 1024)))
                         for split, ds in parts.items()}
        else:
            path = root if root is not None else _builder_for(files)
            loaded = datasets.load_dataset(path, name, data_files=files, streaming=streaming)
            parts = dict(loaded)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ValueError ...)
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")
        raise DataError(f"datasets could not load it ({type(exc).__name__}: {exc})", file=where,
                        expected="a local dataset folder, data files, or a hub dataset name",
                        hint="With HF_DATASETS_OFFLINE=1 only local folders and cached datasets load"
                        if offline else None) from exc
    return dict(sorted(parts.items(), key=lambda item: split_order(item[0])))


def _column(columns: Sequence[str], given: str | None, defaults: Sequence[str], what: str, where: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"no {what} column {given!r}", file=where, expected=f"one of the columns {list(columns)}")
        return given
    found = next((c for c in defaults if c in columns), None)
    if found is None:
        raise DataError(f"no {what} column among {list(columns)}", file=where,
                        expected=f"a column named one of {', '.join(defaults)}, or {what}_column=<name>")
    return found


def _captions(value: Any) -> tuple[list[str], str | None]:
    """The captions of a caption cell, or ``([], problem)``."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, (list, tuple)):
        texts = [t.get("raw") if isinstance(t, dict) else t for t in texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        return [], f"caption is {type(value).__name__} {str(value)[:40]!r}; expected a string or a list of strings"
    texts = [t.strip() for t in texts]
    if not all(texts):
        return [], "empty caption"
    return texts, None


def _image_value(value: Any, base: Path | None, *, where: str, entry: str) -> bytes | Image.Image | str:
    """Bytes, a PIL image or a file path from an image cell (an Image feature's ``{"bytes", "path"}`` too)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if isinstance(value, str) and os.path.isabs(value):
            return value  # a path the dataset builder stored (imagefolder), not one a user wrote
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str) and value.strip():
        if base is None:
            raise DataError(f"relative image path {value!r} with no folder to resolve it", file=where, entry=entry,
                            expected="image_root=<the images' folder>")
        return safe_join(base, value, file=where, entry=entry)
    raise DataError(f"image is {type(value).__name__} {str(value)[:40]!r}", file=where, entry=entry,
                    expected="an Image feature, image bytes, a PIL image or a path")


def _image_kind(feature: Any) -> str:
    """``embedded`` (the dataset holds the image) or ``path``/``unknown`` from the column's feature."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "embedded"
    if isinstance(feature, datasets.Value):
        return {"binary": "embedded", "large_binary": "embedded", "string": "path", "large_string": "path"}.get(
            feature.dtype, "unknown")
    return "unknown"


def _without_decoding(dataset: Any, column: str) -> Any:
    """``dataset`` whose Image column gives ``{"bytes", "path"}`` (decoded by the loader, so errors are named)."""
    import datasets

    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


# --------------------------------------------------------------------------------------
# Mapped: CaptionData
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetImages:
    """Opens the images of a ``datasets`` column: ``images("hf://train/17")`` decodes row 17 of ``train``.

    Picklable (the datasets are memory-mapped files), so DataLoader workers open their own rows.
    """

    datasets: dict[str, Any]
    column: str
    source: str
    base: Path | None = None

    def _value(self, reference: str) -> tuple[bytes | Image.Image | str, str]:
        """The stored image of ``reference`` (bytes, a PIL image or a file path) and where it is."""
        split, _, row = reference.removeprefix(REFERENCE).rpartition("/")
        if split not in self.datasets or not row.isdigit() or int(row) >= len(self.datasets[split]):
            raise DataError(f"no stored image {reference!r}", file=self.source,
                            expected=f"{REFERENCE}<split>/<row> of splits {', '.join(self.datasets)}")
        value = self.datasets[split][int(row)][self.column]
        image = _image_value(value, self.base, where=self.source, entry=f"split {split!r}, row {row}")
        return image, f"{self.source} [{split}] row {row}"

    def __call__(self, reference: str, *, entry: str | None = None) -> Image.Image:
        image, where = self._value(reference)
        return decode_image(image, shard=where, key=entry or reference)

    def read_bytes(self, reference: str) -> bytes:
        """What the feature cache keys the image by: its stored bytes (a path's file; a PIL image's pixels)."""
        image, _ = self._value(reference)
        if isinstance(image, bytes):
            return image
        if isinstance(image, str):
            return Path(image).read_bytes()
        return f"{image.mode} {image.size}\n".encode() + image.tobytes()


def _mapped(name: str, parts: dict[str, Any], image_column: str, caption_column: str, base: Path | None,
            skip_bad: bool, only_present: bool, verify_images: bool) -> CaptionData:
    first = next(iter(parts.values()))
    kind = _image_kind(first.features[image_column])
    if kind == "unknown":  # python objects: look at the first value
        sample = first[0][image_column] if len(first) else ""
        kind = "path" if isinstance(sample, str) else "embedded"
    parsed: dict[str, ParsedCaptions] = {}
    stored: dict[str, Any] = {}
    ids: dict[str, int] = {}
    caption_ids = 0
    for split, dataset in parts.items():
        log = ProblemLog(split, skip_bad)
        captions = dataset[caption_column]
        paths = dataset[image_column] if kind == "path" else None
        rows: dict[str, dict[str, Any]] = {}
        for i, cell in enumerate(captions):
            entry = f"split {split!r}, row {i}"
            texts, problem = _captions(cell)
            try:
                if problem is not None:
                    raise DataError(problem, file=name, entry=entry, expected=f"captions in column {caption_column!r}")
                if paths is not None:
                    image_path = _image_value(paths[i], base, where=name, entry=entry)
                else:
                    image_path = f"{REFERENCE}{split}/{i}"
            except DataError as error:
                log.bad(error)
                continue
            row = rows.get(image_path)
            if row is None:
                row = rows[image_path] = {"image_id": ids.setdefault(image_path, len(ids)), "image_path": image_path,
                                          "captions": [], "caption_ids": [], "_entry": entry}
            row["captions"].extend(texts)
            row["caption_ids"].extend(range(caption_ids, caption_ids + len(texts)))
            caption_ids += len(texts)
        parsed[split] = ParsedCaptions(list(rows.values()), log, Path(name))
        if kind == "embedded":
            stored[split] = _without_decoding(dataset.select_columns([image_column]), image_column)
    images = DatasetImages(stored, image_column, name, base) if kind == "embedded" else None
    return build_caption_data("hf-datasets", parsed, image_root=base or Path(name), only_present=only_present,
                              verify_images=verify_images, images=images)


# --------------------------------------------------------------------------------------
# Streamed: StreamData
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetShard:
    """One shard of a streamed ``datasets.IterableDataset``, as a stream :class:`~fusionzoo.data.streaming.Shard`."""

    dataset: Any
    name: str
    image_column: str
    caption_column: str
    base: Path | None = None
    batch_size: int = 64

    def read(self) -> Iterator[RawSample | BadSample]:
        row = 0
        # iter() reads in this process: the stream, not datasets, splits shards over workers
        for batch in self.dataset.iter(batch_size=self.batch_size):
            for image, caption in zip(batch[self.image_column], batch[self.caption_column]):
                key = f"row {row}"
                row += 1
                texts, problem = _captions(caption)
                if problem is not None:
                    yield BadSample(self.name, key, problem)
                    continue
                try:
                    value = _image_value(image, self.base, where=self.name, entry=key)
                except DataError as error:
                    yield BadSample(self.name, key, error.problem)
                    continue
                yield RawSample(self.name, key, value, tuple(texts))


def _streamed(name: str, parts: dict[str, Any], image_column: str, caption_column: str, base: Path | None,
              options: StreamOptions) -> StreamData:
    streams = {}
    for split, dataset in parts.items():
        dataset = _without_decoding(dataset.select_columns([image_column, caption_column]), image_column)
        count = max(1, dataset.num_shards)
        shards = tuple(DatasetShard(dataset.shard(num_shards=count, index=k) if count > 1 else dataset,
                                    f"{name}/{split}#{k}", image_column, caption_column, base)
                       for k in range(count))
        streams[split] = ImageTextStream([StreamSource(f"{name}/{split}", shards)], split=split, options=options)
    return StreamData(name="hf-datasets", splits=streams, image_root=base)


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------
def load_hf_datasets(
    root: PathLike | None = None,
    *,
    files: Any = None,
    name: str | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_root: PathLike | None = None,
    splits: str | Sequence[str] | None = None,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float = 0.1,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> CaptionData | StreamData:
    """Image-caption data read by ``datasets`` (see the module docstring).

    Args:
        root: a local dataset folder (``data_dir=``) or a hub dataset name.
        files: ``data_files`` of ``load_dataset`` (paths, globs, ``{split: ...}``), relative to ``root``.
        name: the dataset's configuration name (``load_dataset``'s ``name``).
        streaming: stream the splits (:class:`StreamData`) instead of mapping them (:class:`CaptionData`).
        image_column, caption_column: the columns to read (default: found by name).
        image_root: folder of relative image paths (default: ``root`` when it is a folder).
        splits: which splits to return (default all).
        shuffle_buffer, max_bad_fraction: for streamed splits (see :mod:`fusionzoo.data.streaming`).
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.
    """
    if root is None and files is None:
        raise MissingRootError("hf-datasets needs root= (data_dir=, a folder or hub name) or files= (data_files=)",
                               expected="root or files")
    source = os.fspath(root) if root is not None else str(files)
    parts = _load(None if root is None else os.fspath(root), files, name, streaming)
    wanted = select_splits(list(parts), splits, source=source)
    parts = {split: parts[split] for split in wanted}
    columns = list(next(iter(parts.values())).column_names or [])
    image_col = _column(columns, image_column, IMAGE_COLUMNS, "image", source)
    caption_col = _column(columns, caption_column, CAPTION_COLUMNS, "caption", source)
    base = Path(image_root) if image_root is not None else (Path(root) if root is not None and Path(root).is_dir()
                                                            else None)
    if streaming:
        options = StreamOptions(shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction)
        return _streamed(source, parts, image_col, caption_col, base, options)
    return _mapped(source, parts, image_col, caption_col, base, skip_bad, only_present, verify_images)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
register_dataset("hf-datasets")(load_hf_datasets)
