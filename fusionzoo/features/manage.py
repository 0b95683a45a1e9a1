"""Listing and clearing the feature cache: what ``fusionzoo cache list`` and ``fusionzoo cache clear`` do.

:func:`stored_entries` finds the entries of a cache folder (and the staging folders of
unfinished builds), nothing else in it; :func:`entries_to_remove` picks what ``clear``
removes (by last use, ``--older-than`` read by :func:`parse_age`), and
:func:`remove_entries` deletes them. An entry's last use is its ``meta.json``'s
modification time (:mod:`fusionzoo.features.layout`). Imports no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .layout import META_NAME, CacheError

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
