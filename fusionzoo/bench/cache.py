"""On-disk cache of frozen-encoder features, memory-mapped and keyed by content.

With frozen encoders a benchmark spends most of its time computing the same
encoder outputs again for every fusion, epoch and seed. :class:`FeatureCache`
computes them once and keeps them on disk:

* **key** -- :func:`cache_key` hashes (blake2b) three things: the encoder's
  *weights* (:func:`fingerprint_module`: every tensor of its state dict, bytes
  included) and architecture description, the *preprocessing* (the image data
  config -- size, interpolation, mean, std, crop -- or the tokenizer's
  vocabulary, lowercasing and maximum length, the causal flag), and the *inputs*
  (image paths with their size and modification time, or the text strings
  themselves). Changing any of them gives a new key, so stale features are never
  read; an old entry just stays on disk until the folder is removed.
* **layout** -- one folder per entry, ``<cache_dir>/<name>-<key[:20]>/``, with
  one ``.npy`` file per array (opened with ``numpy.load(mmap_mode="r")``, so a
  run pages in only what it reads) and ``meta.json`` (the full key, shapes,
  dtypes, what was hashed, how long extraction took). The arrays are written into
  a temporary folder that is renamed into place once complete, so a crash never
  leaves an entry that looks valid.
* **precision** -- feature arrays are stored as float16 (half the disk and page
  cache of float32). Both encoders' outputs are well inside float16's range
  (EfficientNet's last stage ends in ReLU6, MiniLM's in a LayerNorm) and the
  rounding error (relative ~5e-4) changes no benchmark score measurably; the
  README's benchmark section records the measurement. Token ids and masks are
  stored exactly (int32 / bool).

Counters (:attr:`FeatureCache.hits`, :attr:`FeatureCache.misses`) tell a run
whether it extracted anything; ``fusionzoo bench`` prints them and writes them to
``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Bump when the stored layout changes: every old entry then misses.
CACHE_FORMAT = 1
META_NAME = "meta.json"


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------
def _canonical(value: Any) -> Any:
    """A JSON-able, order-stable form of configs (tuples -> lists, dict keys sorted by json.dumps)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def fingerprint_module(module: nn.Module) -> str:
    """Hex digest of every tensor (name, dtype, shape, bytes) in ``module.state_dict()``.

    Buffers count too (BatchNorm running statistics change the outputs). Takes a
    fraction of a second for EfficientNet-Lite0 + MiniLM (~110 MB of weights).
    """
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str]) -> str:
    """Hex digest of image paths with their size and modification time (as ``make`` does).

    A file replaced in place gets a new mtime and so a new key; content is not
    read, which keeps the check cheap for thousands of images. Paths are hashed
    resolved (absolute, links followed), so ``../shared/x.jpg`` from one folder and
    ``/work/shared/x.jpg`` name the same entry.
    """
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fingerprint_texts(texts: Iterable[str]) -> str:
    """Hex digest of an ordered list of strings."""
    digest = hashlib.blake2b(digest_size=20)
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        digest.update(encoded)
    return digest.hexdigest()


def cache_key(encoder: Mapping[str, Any], preprocessing: Mapping[str, Any], inputs: str) -> str:
    """The cache key: a hex digest over the encoder, the preprocessing and the inputs.

    Args:
        encoder: what identifies the encoder: at least ``weights`` (a
            :func:`fingerprint_module` digest) and its ``spec``.
        preprocessing: everything that turns an input into the encoder's input
            (image data config; tokenizer settings; causal flag; stored dtype).
        inputs: a digest of the inputs (:func:`fingerprint_files` / :func:`fingerprint_texts`).
    Returns:
        40 hex characters; equal only when all three parts are equal.
    """
    payload = json.dumps(
        {"format": CACHE_FORMAT, "encoder": _canonical(encoder), "preprocessing": _canonical(preprocessing),
         "inputs": inputs},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


# --------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------
@dataclass
class CacheEntry:
    """One cached set of arrays, memory-mapped read-only.

    Attributes:
        path: the entry's folder.
        arrays: name -> array (``numpy.memmap``-backed; slice it, do not write to it).
        meta: the contents of ``meta.json``.
        hit: True when the entry was found on disk, False when it was just built.
    """

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    hit: bool

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"cache entry {self.path.name} has arrays {sorted(self.arrays)}, not {name!r}")
        return self.arrays[name]


#: ``builder(write) -> info``: computes the arrays and stores each with ``write(name, array)``.
Builder = Callable[[Callable[[str, np.ndarray], None]], Mapping[str, Any]]


@dataclass
class FeatureCache:
    """A folder of :class:`CacheEntry` s, or none at all (``enabled=False``: compute, keep in memory).

    Args:
        root: the cache folder (created on first write).
        enabled: False = every lookup builds afresh and nothing is written (``--no-cache``).
    """

    root: Path
    enabled: bool = True
    hits: int = 0
    misses: int = 0
    extraction_seconds: float = 0.0
    entries: list[dict[str, Any]] = field(default_factory=list)

    def get_or_build(self, name: str, key: str, builder: Builder, describe: Mapping[str, Any]) -> CacheEntry:
        """The entry ``name``/``key``: read from disk, or built by ``builder`` (and stored when enabled).

        Args:
            name: a readable prefix of the folder name (``image-efficientnet-lite0``).
            key: from :func:`cache_key`.
            builder: computes the arrays, handing each to ``write(name, array)``;
                returns extra information for ``meta.json`` (counts, timings).
            describe: what was hashed, in readable form, for ``meta.json``.
        """
        folder = Path(self.root) / f"{name}-{key[:20]}"
        if self.enabled:
            entry = self._load(folder, key)
            if entry is not None:
                self.hits += 1
                self.entries.append({"name": name, "key": key, "hit": True, "path": str(folder)})
                logger.info("feature cache hit: %s", folder)
                return entry
        self.misses += 1
        start = time.perf_counter()
        if not self.enabled:
            arrays: dict[str, np.ndarray] = {}
            info = builder(lambda array_name, array: arrays.__setitem__(array_name, np.asarray(array)))
            seconds = time.perf_counter() - start
            self.extraction_seconds += seconds
            meta = {"key": key, "describe": _canonical(describe), "info": _canonical(info), "seconds": seconds}
            self.entries.append({"name": name, "key": key, "hit": False, "path": None})
            return CacheEntry(folder, arrays, meta, hit=False)

        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        try:
            shapes: dict[str, Any] = {}

            def write(array_name: str, array: np.ndarray) -> None:
                array = np.ascontiguousarray(array)
                np.save(staging / f"{array_name}.npy", array, allow_pickle=False)
                shapes[array_name] = {"shape": list(array.shape), "dtype": str(array.dtype)}

            info = builder(write)
            seconds = time.perf_counter() - start
            self.extraction_seconds += seconds
            meta = {"format": CACHE_FORMAT, "key": key, "name": name, "arrays": shapes,
                    "describe": _canonical(describe), "info": _canonical(info), "seconds": round(seconds, 3),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (staging / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            if folder.exists():  # an incomplete or foreign folder under our name: replace it
                shutil.rmtree(folder)
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.entries.append({"name": name, "key": key, "hit": False, "path": str(folder)})
        entry = self._load(folder, key)
        if entry is None:  # pragma: no cover - we just wrote it
            raise RuntimeError(f"feature cache entry {folder} could not be read back after writing it")
        entry.hit = False
        return entry

    def stats(self) -> dict[str, Any]:
        """Hits, misses, extraction seconds and the entries used, for ``run.json``."""
        return {"enabled": self.enabled, "root": str(self.root), "hits": self.hits, "misses": self.misses,
                "extraction_seconds": round(self.extraction_seconds, 2), "entries": list(self.entries)}

    @staticmethod
    def _load(folder: Path, key: str) -> CacheEntry | None:
        meta_path = folder / META_NAME
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None  # a prefix collision or an older layout: rebuild
        arrays = {}
        for array_name in meta.get("arrays", {}):
            path = folder / f"{array_name}.npy"
            if not path.is_file():
                return None
            arrays[array_name] = np.load(path, mmap_mode="r", allow_pickle=False)
        return CacheEntry(folder, arrays, meta, hit=True)
