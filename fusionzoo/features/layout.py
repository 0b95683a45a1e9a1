"""The feature cache on disk: where it lives, what one entry's folder holds, how it is read back.

One folder per entry, ``<cache_dir>/<name>-<key[:20]>/``, with one ``.npy`` file per
array (opened with ``numpy.load(mmap_mode="r")``, so a run pages in only what it reads,
and processes reading one entry share its pages through the page cache) and
``meta.json`` (the full key, shapes, dtypes, what was hashed, how long extraction took,
the rows that could not be computed). A folder becomes an entry only by a rename once
everything in it is written (:mod:`fusionzoo.features.build`), so a crash never leaves an
entry that looks valid; reading an entry (:func:`load_entry`) also checks each array's
shape and dtype against ``meta.json`` (a truncated or replaced file is a miss, and the
entry is built again). ``meta.json``'s modification time is the entry's last use (a hit
touches it); ``fusionzoo cache list`` and ``fusionzoo cache clear --older-than`` read it
(:mod:`fusionzoo.features.manage`).

This module imports no torch: ``fusionzoo cache list`` reads the cache through it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import FusionZooError

#: Bump when the stored layout changes: every old entry then misses (it is part of every key).
CACHE_FORMAT = 1
META_NAME = "meta.json"


class CacheError(FusionZooError, ValueError):
    """A cache folder or a ``fusionzoo cache`` option that cannot be used (names the folder or the value)."""


def default_cache_dir() -> Path:
    """``$FUSIONZOO_CACHE``, else ``$XDG_CACHE_HOME/fusionzoo/features``, else ``~/.cache/fusionzoo/features``."""
    if os.environ.get("FUSIONZOO_CACHE"):
        return Path(os.environ["FUSIONZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusionzoo" / "features"


def canonical(value: Any) -> Any:
    """A JSON-able, order-stable form of configs (tuples -> lists, dict keys sorted by json.dumps)."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


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

    @property
    def bad_rows(self) -> dict[int, str]:
        """Rows that could not be computed (an image that does not decode, with ``skip_bad``) -> why."""
        return {int(row): str(why) for row, why in (self.meta.get("info", {}).get("bad_rows") or {}).items()}


def load_entry(folder: Path, key: str) -> CacheEntry | None:
    """The complete entry in ``folder`` under ``key``, or None (missing, unfinished, another key, damaged)."""
    meta = read_json(folder / META_NAME)
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        return None  # no entry, a prefix collision or an older layout: rebuild
    arrays = {}
    for array_name, spec in (meta.get("arrays") or {}).items():
        array = open_array(folder / f"{array_name}.npy", spec)
        if array is None:
            return None
        arrays[array_name] = array
    return CacheEntry(folder, arrays, meta, hit=True)


def open_array(path: Path, spec: Any, mode: str = "r") -> np.ndarray | None:
    """``path``'s array memory-mapped; None when missing, unreadable, or not of ``spec``'s shape and dtype."""
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except ValueError:  # an empty array cannot be memory-mapped; a truncated file cannot be either
        try:
            array = np.load(path, allow_pickle=False) if mode == "r" else None
        except (OSError, ValueError, EOFError):
            return None
    except OSError:
        return None
    if array is None:
        return None
    if isinstance(spec, Mapping):
        if list(array.shape) != list(spec.get("shape", array.shape)) or str(array.dtype) != str(spec.get("dtype",
                                                                                                        array.dtype)):
            return None
    return array


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename: never half written."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def touch(path: Path) -> None:
    """Set ``path``'s modification time to now, where the cache is writable."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits
        pass
