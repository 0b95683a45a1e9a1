"""On-disk cache of frozen-encoder features, memory-mapped and keyed by content.

With frozen encoders a benchmark spends most of its time computing the same
encoder outputs again for every fusion, epoch and seed. :class:`FeatureCache`
computes them once and keeps them on disk:

* **key** -- :func:`cache_key` hashes (blake2b) three things: the encoder's
  *weights* (:func:`fingerprint_module`: every tensor of its state dict, bytes
  included) and architecture description, the *preprocessing* (the image data
  config -- size, interpolation, mean, std, crop -- or the tokenizer's
  vocabulary, lowercasing and maximum length, the causal flag), and the *inputs*
  (the bytes of each image file, in order, or the text strings themselves).
  Changing any of them gives a new key, so stale features are never read. Where
  things are installed is not part of the key: the same encoder and images in
  another checkout or virtual environment find the same entries.
* **layout** -- one folder per entry, ``<cache_dir>/<name>-<key[:20]>/``, with
  one ``.npy`` file per array (opened with ``numpy.load(mmap_mode="r")``, so a
  run pages in only what it reads) and ``meta.json`` (the full key, shapes,
  dtypes, what was hashed, how long extraction took). The arrays are written into
  a temporary folder that is renamed into place once complete, so a crash never
  leaves an entry that looks valid. ``meta.json``'s modification time is the
  entry's last use (a hit touches it); ``fusionzoo cache list`` and ``fusionzoo
  cache clear --older-than`` read it (:func:`stored_entries`, :func:`remove_entries`).
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
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import FusionZooError

if TYPE_CHECKING:  # torch is imported where a module is hashed: listing the cache needs none
    from torch import nn

logger = logging.getLogger(__name__)

#: Bump when the stored layout changes: every old entry then misses.
CACHE_FORMAT = 1
META_NAME = "meta.json"
#: Fields of an encoder description that say where its files were read from, not what they
#: hold: a transformers config's ``_name_or_path`` is the folder of the weights (inside the
#: virtual environment for an installed preset). The weights digest identifies the files'
#: contents, so these fields are left out of the key.
LOCATION_FIELDS = frozenset({"_name_or_path", "name_or_path"})


class CacheError(FusionZooError, ValueError):
    """A cache folder or a ``fusionzoo cache`` option that cannot be used (names the folder or the value)."""


def default_cache_dir() -> Path:
    """``$FUSIONZOO_CACHE``, else ``$XDG_CACHE_HOME/fusionzoo/features``, else ``~/.cache/fusionzoo/features``."""
    if os.environ.get("FUSIONZOO_CACHE"):
        return Path(os.environ["FUSIONZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusionzoo" / "features"


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
    import torch

    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str]) -> str:
    """Hex digest of the files' contents, in order; not of their paths or modification times.

    Where a file lies does not matter, so the same images in another checkout, virtual
    environment or data folder give the same key (easy-VQA's images live inside its
    installed package, and pip stamps every installed file with the install time). A file
    rewritten with other bytes gets a new digest. Reading the bytes costs a small fraction
    of decoding the images, which a miss does anyway.
    """
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        file_digest = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(file_digest.digest())  # fixed width: one file's bytes never run into the next
    return digest.hexdigest()


def fingerprint_texts(texts: Iterable[str]) -> str:
    """Hex digest of an ordered list of strings."""
    digest = hashlib.blake2b(digest_size=20)
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        digest.update(encoded)
    return digest.hexdigest()


def _without_locations(value: Any) -> Any:
    """``value`` without :data:`LOCATION_FIELDS`, also inside a JSON object held as text (a config's JSON)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return _without_locations(parsed) if isinstance(parsed, dict) else value
    if isinstance(value, Mapping):
        return {k: _without_locations(v) for k, v in value.items() if k not in LOCATION_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_without_locations(v) for v in value]
    return value


def cache_key(encoder: Mapping[str, Any], preprocessing: Mapping[str, Any], inputs: str) -> str:
    """The cache key: a hex digest over the encoder, the preprocessing and the inputs.

    Args:
        encoder: what identifies the encoder: at least ``weights`` (a
            :func:`fingerprint_module` digest) and its ``spec``; fields that
            name the folder it was loaded from (:data:`LOCATION_FIELDS`) are ignored.
        preprocessing: everything that turns an input into the encoder's input
            (image data config; tokenizer settings; causal flag; stored dtype).
        inputs: a digest of the inputs (:func:`fingerprint_files` / :func:`fingerprint_texts`).
    Returns:
        40 hex characters; equal only when all three parts are equal.
    """
    payload = json.dumps(
        {"format": CACHE_FORMAT, "encoder": _canonical(_without_locations(encoder)),
         "preprocessing": _canonical(_without_locations(preprocessing)), "inputs": inputs},
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
                _touch(folder / META_NAME)  # the entry's last use, for `fusionzoo cache clear --older-than`
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


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits
        pass


# --------------------------------------------------------------------------------------
# Listing and clearing (``fusionzoo cache list`` / ``clear``)
# --------------------------------------------------------------------------------------
#: A complete entry's folder name (``get_or_build``) and an unfinished build's (its staging folder).
_ENTRY_FOLDER = re.compile(r"(?P<name>.+)-(?P<key>[0-9a-f]{20})")
_BUILD_FOLDER = re.compile(r"\.(?P<name>.+)-(?P<key>[0-9a-f]{20})\.building-[A-Za-z0-9_]+")
#: An unfinished build touched more recently than this may still be running: never removed.
BUILD_GRACE_SECONDS = 3600.0
_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


@dataclass(frozen=True)
class StoredEntry:
    """One folder of a cache, as ``fusionzoo cache list`` shows it.

    Attributes:
        path: the folder.
        name: its readable prefix (``image-efficientnet-lite0-128px``).
        size: bytes of its files.
        last_used: when it was last written or read (seconds since the epoch).
        meta: its ``meta.json`` (empty for an unfinished build).
        complete: False for the staging folder of a build that was interrupted or is running.
    """

    path: Path
    name: str
    size: int
    last_used: float
    meta: dict[str, Any]
    complete: bool = True


def _folder_files(folder: Path) -> list[os.stat_result]:
    stats = []
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            try:
                stats.append(os.lstat(os.path.join(dirpath, filename)))
            except OSError:
                pass
    return stats


def stored_entries(root: Path) -> list[StoredEntry]:
    """The cache entries under ``root``, least recently used first; nothing else in the folder counts.

    An entry is a folder named ``<name>-<20 hex digits>`` whose ``meta.json`` holds that
    name and a key starting with those digits, or the staging folder of a build
    (``.<name>-<key>.building-*``). Other files and folders are not entries.

    Raises:
        CacheError: ``root`` exists and is not a folder.
    """
    root = Path(root)
    if not root.exists():
        return []
    if not root.is_dir():
        raise CacheError(f"feature cache {root} is not a folder")
    entries = []
    for item in os.scandir(root):
        if not item.is_dir(follow_symlinks=False):
            continue
        path = Path(item.path)
        if (match := _ENTRY_FOLDER.fullmatch(item.name)) is not None:
            try:
                meta = json.loads((path / META_NAME).read_text())
                used = (path / META_NAME).stat().st_mtime
            except (OSError, ValueError):
                continue
            if (not isinstance(meta, dict) or meta.get("name") != match["name"]
                    or not str(meta.get("key", "")).startswith(match["key"])):
                continue
            entries.append(StoredEntry(path, match["name"], sum(s.st_size for s in _folder_files(path)), used, meta))
        elif (match := _BUILD_FOLDER.fullmatch(item.name)) is not None:
            stats = _folder_files(path)
            used = max([item.stat(follow_symlinks=False).st_mtime, *(s.st_mtime for s in stats)])
            entries.append(StoredEntry(path, match["name"], sum(s.st_size for s in stats), used, {}, complete=False))
    return sorted(entries, key=lambda e: (e.last_used, e.path.name))


def parse_age(text: str) -> float:
    """Seconds in an age such as ``30m``, ``12h``, ``7d`` or ``2w`` (``s``: seconds).

    Raises:
        CacheError: not a number followed by one of those units.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text).lower())
    if match is None:
        raise CacheError(f"--older-than takes a number and a unit (s, m, h, d, w), such as 30m, 12h or 7d; "
                         f"got {text!r}")
    return float(match[1]) * _AGE_UNITS[match[2]]


def entries_to_remove(entries: Sequence[StoredEntry], older_than: float | None = None,
                      now: float | None = None) -> list[StoredEntry]:
    """The entries ``clear`` removes: every one, or those unused for ``older_than`` seconds.

    An unfinished build is removed only once untouched for :data:`BUILD_GRACE_SECONDS`
    as well (a bench may be writing it).
    """
    now = time.time() if now is None else now
    cutoff = now - older_than if older_than is not None else math.inf
    return [e for e in entries
            if e.last_used < cutoff and (e.complete or e.last_used < now - BUILD_GRACE_SECONDS)]


def remove_entries(entries: Iterable[StoredEntry]) -> int:
    """Delete the entries' folders; returns the bytes freed."""
    freed = 0
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():
            freed += entry.size
    return freed
