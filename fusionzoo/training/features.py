"""Frozen-encoder features in training and evaluation runs, read from the feature cache the bench fills.

With ``freeze_encoders=true`` (and ``feature_cache`` not false), a run extracts once, into
:class:`~fusionzoo.features.cache.FeatureCache` (``cache_dir=``, by default the bench's
folder), what its frozen encoders would compute in every step, and its batches read that:

* **images** -- per split, the tokens of the distinct image files the run reads (sorted by
  path), preprocessed with the encoder's own evaluation transform (``vision.data_config``,
  what ``vision.transform(train=False)`` applies; training takes no augmentation), as
  :func:`~fusionzoo.features.extract.image_features` stores them for the bench.
* **texts** -- where the text encoder is frozen too and the task's collate says which text
  it tokenizes (its ``text_key``: a VQA question, a classification text, a caption), the
  states of the split's distinct texts at ``max_text_len``
  (:func:`~fusionzoo.features.extract.text_features`). Pretraining reads the clean captions'
  states from the cache (ITC and ITM use them) and encodes the masked copy live: MLM draws
  new masks in every step, so those states cannot be computed before training. Captioning
  evaluation generates with the live text encoder, and retrieval evaluation embeds its
  captions live (once per evaluation); both read their image tokens from the cache.
* **batches** -- each row of a split carries the cache rows of its image and text
  (:class:`FeatureRows`); :class:`CachedFeatureCollate` runs the task's own collate on the
  rows, which have no pixels, then adds ``image_states`` (B, N, Di) and ``text_states``
  (B, T, Dt): float32 copies of the batch's own rows of the memory-mapped float16 arrays.
  Nothing else is held per process: the arrays' pages are shared by every process and
  DataLoader worker through the page cache. From the second epoch on (and in a second run)
  nothing is decoded or encoded.
* **several processes** -- the run's processes extract together, each process its share
  of the blocks (:class:`~fusionzoo.processes.ProcessView`), then all memory-map the same files.
* **bad images** -- with ``skip_bad=true`` an image that does not decode is found during
  extraction, and the rows that use it are left out of training and evaluation (a warning
  names the first few); without it, extraction stops there with the data error.
* **images that are not files** -- rows whose ``image_path`` is a reference the data's
  ``images`` opener reads (an image stored in a ``datasets`` table, a member of an indexed tar
  shard) are keyed by the bytes ``images.read_bytes`` gives and decoded by the opener.
* **not cached** -- streamed sources (their images cannot be listed before training),
  images opened by an opener that cannot give their bytes (no ``read_bytes``), trainable
  encoders, and tasks that do not say they read cached features
  (``Task.reads_cached_features``; the built-in tasks do). There every step encodes; with
  ``feature_cache=true`` each of these is an error that says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..features.cache import FeatureCache
from ..features.layout import default_cache_dir
from ..features.extract import image_features, text_features
from ..data.checks import SHOW_FIRST, DataError
from .config import ConfigError, TrainConfig
from ..processes import ProcessView

logger = logging.getLogger(__name__)

#: Keys a :class:`FeatureRows` item carries for :class:`CachedFeatureCollate` (removed before the task's collate).
IMAGE_ROW, TEXT_ROW = "_image_row", "_text_row"


def run_cache(config: TrainConfig, accelerator: Any) -> FeatureCache:
    """The feature cache of a run: ``cache_dir`` (default the bench's folder), shared by its processes."""
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return FeatureCache(root, processes=ProcessView.from_accelerator(accelerator))


def why_not_cached(config: TrainConfig, model: Any, data: Any, task: Any = None) -> str | None:
    """Why this run cannot read cached features (None when it can); ``feature_cache=false`` is not asked."""
    if getattr(data, "iterable", False):
        return f"data={config.data!r} is streamed: its images cannot be listed before training"
    if not getattr(model.vision, "frozen", False):
        return "the vision encoder trains (freeze_encoders=false)"
    images = getattr(data, "images", None)
    if images is not None and not callable(getattr(images, "read_bytes", None)):
        return (f"the images of data={config.data!r} are opened by {type(images).__name__}, which cannot give "
                "their bytes (read_bytes); the cache keys images by their bytes")
    if task is not None and not getattr(task, "reads_cached_features", False):
        return (f"task {task.name!r} does not say it reads cached image tokens (Task.reads_cached_features: its "
                "collate must take rows without pixels and its evaluation read image_states)")
    return None


# --------------------------------------------------------------------------------------
# Rows and batches
# --------------------------------------------------------------------------------------
class CachedArray:
    """One ``.npy`` array of a cache entry, memory-mapped read-only on first use in each process.

    Pickles as its path (a DataLoader worker started by ``spawn`` maps the file itself
    instead of receiving a copy of the array).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._array = state["path"], None


class FeatureRows(Dataset):
    """The rows of a split, each with the cache row of its image and, optionally, of its text.

    Args:
        rows: a ``datasets.Dataset`` of the task's rows (without pixels).
        image_rows: (len(rows),) the cache row of each row's image.
        text_rows: (len(rows),) the cache row of each row's text, or None.
    """

    def __init__(self, rows: Any, image_rows: np.ndarray, text_rows: np.ndarray | None = None) -> None:
        self.rows, self.image_rows, self.text_rows = rows, image_rows, text_rows

    def __len__(self) -> int:
        return len(self.rows)

    def _with_rows(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        item[IMAGE_ROW] = int(self.image_rows[index])
        if self.text_rows is not None:
            item[TEXT_ROW] = int(self.text_rows[index])
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._with_rows(dict(self.rows[int(index)]), int(index))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        return [self._with_rows(dict(item), i) for item, i in zip(self.rows.__getitems__(indices), indices)]


@dataclass
class CachedFeatureCollate:
    """A task's collate whose batches get ``image_states`` (and ``text_states``) from cache rows.

    Args:
        collate: the task's batch function; it sees the rows without pixels.
        images: the image tokens (U, N, Di) float16.
        texts: the text states (U', T, Dt) float16 and their token ids (U', T) int32, or None.
    """

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    images: CachedArray
    texts: tuple[CachedArray, CachedArray] | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        image_rows = np.asarray([item[IMAGE_ROW] for item in items])
        text_rows = np.asarray([item[TEXT_ROW] for item in items]) if items and TEXT_ROW in items[0] else None
        batch = self.collate([{k: v for k, v in item.items() if k not in (IMAGE_ROW, TEXT_ROW)} for item in items])
        batch["image_states"] = torch.from_numpy(self.images.array[image_rows].astype(np.float32))  # (B, N, Di)
        if self.texts is not None and text_rows is not None:
            states, ids = self.texts
            width = int(batch["input_ids"].shape[1])
            cached_ids = ids.array[text_rows, :width]  # (B, T)
            if cached_ids.shape[1] != width or not np.array_equal(cached_ids, batch["input_ids"].numpy()):
                raise RuntimeError("the cached token ids of a batch differ from those its collate made: the text "
                                   f"cache entry {ids.path.parent.name} was not made with this tokenizer and length")
            batch["text_states"] = torch.from_numpy(states.array[text_rows, :width].astype(np.float32))  # (B, T, Dt)
        return batch


# --------------------------------------------------------------------------------------
# What a run reads from the cache
# --------------------------------------------------------------------------------------
@dataclass
class _Lookup:
    """One cache entry and the row of each of its inputs (an image path, a text)."""

    folder: Path
    row: dict[str, int]
    bad: dict[str, str] = field(default_factory=dict)


class FrozenFeatures:
    """What a run reads from the feature cache instead of running its frozen encoders (see the module docstring).

    Args:
        cache: the run's cache (:func:`run_cache`).
        vision, text: the model's frozen encoders (``text`` None: texts are encoded live).
        config: the run's configuration (``max_text_len``, ``skip_bad``, ``num_workers``,
            ``effective_eval_batch_size``).
        device: where extraction runs.
        images: the data's opener of images that are not files (None: ``image_path`` is a file).
    """

    def __init__(self, cache: FeatureCache, vision: Any, text: Any | None, config: TrainConfig,
                 device: torch.device | str, images: Any = None) -> None:
        self.cache, self.vision, self.text, self.config, self.device = cache, vision, text, config, device
        self.images = images
        self._images: dict[str, _Lookup] = {}
        self._texts: dict[str, _Lookup] = {}

    @classmethod
    def for_run(cls, config: TrainConfig, model: Any, accelerator: Any, data: Any,
                task: Any = None) -> "FrozenFeatures | None":
        """The run's cached features, or None when ``feature_cache=false`` or the run cannot use them.

        Raises:
            ConfigError: ``feature_cache=true`` where it cannot be used (the message says why).
        """
        if config.feature_cache is False:
            return None
        reason = why_not_cached(config, model, data, task)
        if reason is not None:
            if config.feature_cache:
                raise ConfigError(f"key 'feature_cache': feature_cache=true, but {reason}; set feature_cache=false "
                                  "(or leave it unset) to encode in every step")
            return None
        text = model.text if getattr(model.text, "frozen", False) else None
        return cls(run_cache(config, accelerator), model.vision, text, config, accelerator.device,
                   getattr(data, "images", None))

    def wrap(self, rows: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], split: str,
             texts: bool = True) -> tuple[FeatureRows, CachedFeatureCollate]:
        """``rows`` (a split's rows, without pixels) and ``collate`` made to read this cache.

        Extracts what is not in the cache yet (every process of the run together). Rows whose
        image could not be decoded (``skip_bad=true``) are left out.

        Args:
            rows: the rows a loader reads (a ``datasets.Dataset`` with ``image_path``).
            collate: the task's batch function for them.
            split: the split they come from (one cache entry per split and encoder).
            texts: also read the texts' states (when the text encoder is frozen and the
                collate names its ``text_key``).
        """
        columns = rows.with_format(None)
        paths = list(columns["image_path"])
        images = self._lookup(self._images, split, paths, self._extract_images)
        if images.bad:
            rows, paths = self._drop_bad(rows, paths, images.bad, split)
            columns = rows.with_format(None)
        image_rows = np.asarray([images.row[p] for p in paths], dtype=np.int64)
        text_key = getattr(collate, "text_key", None)
        text_rows, text_arrays = None, None
        if texts and self.text is not None and text_key is not None and text_key in rows.column_names and len(rows):
            values = list(columns[text_key])
            lookup = self._lookup(self._texts, split, values, self._extract_texts)
            text_rows = np.asarray([lookup.row[t] for t in values], dtype=np.int64)
            text_arrays = (CachedArray(lookup.folder / "states.npy"), CachedArray(lookup.folder / "input_ids.npy"))
        return (FeatureRows(rows, image_rows, text_rows),
                CachedFeatureCollate(collate, CachedArray(images.folder / "tokens.npy"), text_arrays))

    def stats(self) -> dict[str, Any]:
        """The cache's hits, misses and entries, for ``final/run.json``."""
        return {**self.cache.stats(), "texts_cached": self.text is not None}

    def note(self) -> str:
        """One line for the run's output: what comes from the cache, and whether anything was extracted."""
        images = len({p for lookup in self._images.values() for p in lookup.row})
        texts = len({t for lookup in self._texts.values() for t in lookup.row})
        what = f"tokens of {images} images" + (f" and states of {texts} texts" if texts else "")
        cache = self.cache
        extracted = (f"extracted {cache.misses} entr{'y' if cache.misses == 1 else 'ies'} in "
                     f"{cache.extraction_seconds:.1f} s" if cache.misses else "nothing extracted")
        return f"feature cache {cache.root}: {what} from {cache.hits + cache.misses} entries ({extracted})"

    # -- internals ------------------------------------------------------------------
    def _lookup(self, lookups: dict[str, _Lookup], split: str, inputs: list[str],
                extract: Callable[[list[str]], _Lookup]) -> _Lookup:
        """The split's entry covering ``inputs``: the one made before if it covers them, else a new one."""
        known = lookups.get(split)
        wanted = set(inputs)
        if known is not None and wanted <= known.row.keys():
            return known
        if known is not None:
            wanted |= known.row.keys()
        lookups[split] = extract(sorted(wanted))
        return lookups[split]

    def _extract_images(self, paths: list[str]) -> _Lookup:
        entry = image_features(self.cache, self.vision, paths, dict(self.vision.data_config),
                               batch_size=self.config.effective_eval_batch_size, device=self.device,
                               workers=self.config.num_workers, skip_bad=self.config.skip_bad, images=self.images)
        return _Lookup(entry.path, {p: i for i, p in enumerate(paths)},
                       {paths[row]: why for row, why in entry.bad_rows.items()})

    def _extract_texts(self, texts: list[str]) -> _Lookup:
        entry = text_features(self.cache, self.text, texts, max_length=self.config.max_text_len,
                              batch_size=max(self.config.effective_eval_batch_size, 64), device=self.device)
        return _Lookup(entry.path, {t: i for i, t in enumerate(texts)})

    def _drop_bad(self, rows: Any, paths: list[str], bad: dict[str, str], split: str) -> tuple[Any, list[str]]:
        """``rows`` without those whose image did not decode (``skip_bad``), or a DataError naming the first."""
        dropped = sorted({p for p in paths if p in bad})
        if not dropped:
            return rows, paths
        if not self.config.skip_bad:
            raise DataError(f"{len(dropped)} images of split {split!r} did not decode when their features were "
                            f"extracted (by a run with skip_bad=true); first: {bad[dropped[0]]}",
                            hint="Pass skip_bad=true to leave them out")
        keep = [i for i, p in enumerate(paths) if p not in bad]
        logger.warning("skip_bad=true: left out %d rows of split %r whose %d images did not decode; first: %s",
                       len(paths) - len(keep), split, len(dropped), "; ".join(bad[p] for p in dropped[:SHOW_FIRST]))
        return rows.select(keep), [paths[i] for i in keep]
