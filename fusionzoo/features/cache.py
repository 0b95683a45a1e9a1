"""On-disk cache of frozen-encoder features, memory-mapped and keyed by content: :class:`FeatureCache`.

With frozen encoders, benchmarks and training runs spend most of their time computing
the same encoder outputs again for every fusion, epoch and seed. :class:`FeatureCache`
computes them once and keeps them on disk, for ``fusionzoo bench``, ``fusionzoo train``,
``fusionzoo pretrain`` and ``fusionzoo eval`` alike (:mod:`fusionzoo.features.extract`
fills it; :mod:`fusionzoo.training.features` reads it during training). Its parts:

* **key** -- :mod:`fusionzoo.features.keys`: a digest of the encoder's weights and
  architecture, the preprocessing and the inputs' bytes, so stale features are never read;
* **layout** -- :mod:`fusionzoo.features.layout`: one folder of ``.npy`` files and a
  ``meta.json`` per entry, memory-mapped read-only and checked against ``meta.json``;
* **building** -- :mod:`fusionzoo.features.build`: resumable, block by block, shared by a
  run's processes, published by a rename;
* **listing and clearing** -- :mod:`fusionzoo.features.manage` (``fusionzoo cache``).

This module looks an entry up and, on a miss, has it built. Feature arrays are stored as
float16 (half the disk and page cache of float32): both encoders' outputs are well inside
float16's range (EfficientNet's last stage ends in ReLU6, MiniLM's in a LayerNorm) and the
rounding error (relative ~5e-4) changes no benchmark score measurably; the README's
benchmark section records the measurement. Token ids and masks are stored exactly
(int32 / bool).

Counters (:attr:`FeatureCache.hits`, :attr:`FeatureCache.misses`) tell a run
whether it extracted anything; ``fusionzoo bench`` prints them and writes them to
``run.json``, and so do training runs (``final/run.json``'s ``feature_cache``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .build import Builder, RowBuilder, build_blocks, build_whole
from .layout import META_NAME, CacheEntry, CacheError, canonical, load_entry, touch

if TYPE_CHECKING:  # pragma: no cover
    from ..processes import ProcessView

logger = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """A folder of :class:`~fusionzoo.features.layout.CacheEntry` s, or none at all (``enabled=False``: compute, keep in memory).

    Args:
        root: the cache folder (created on first write).
        enabled: False = every lookup builds afresh and nothing is written (``--no-cache``).
        processes: the processes of a multi-process run, which then look up and build every
            entry together (:mod:`fusionzoo.features.build`); None = this process alone.
    """

    root: Path
    enabled: bool = True
    hits: int = 0
    misses: int = 0
    extraction_seconds: float = 0.0
    entries: list[dict[str, Any]] = field(default_factory=list)
    processes: ProcessView | None = field(default=None, repr=False)

    def get_or_build(self, name: str, key: str, builder: Builder, describe: Mapping[str, Any]) -> CacheEntry:
        """The entry ``name``/``key``: read from disk, or built by ``builder`` (and stored when enabled).

        Args:
            name: a readable prefix of the folder name (``image-efficientnet-lite0``).
            key: from :func:`~fusionzoo.features.keys.cache_key`.
            builder: a :class:`RowBuilder` (resumable, shared by the processes), or a function
                that computes the arrays, handing each to ``write(name, array)``, and
                returns extra information for ``meta.json`` (counts, timings); with
                several processes process 0 runs it and the others wait.
            describe: what was hashed, in readable form, for ``meta.json``.
        """
        folder = Path(self.root) / f"{name}-{key[:20]}"
        processes = self.processes
        if processes is None:
            from ..processes import ProcessView

            processes = ProcessView()
        if self.enabled:
            entry = load_entry(folder, key)
            if not processes.any(entry is None):  # every process found it
                return self._hit(entry, name, key)
        start = time.perf_counter()
        if not self.enabled:
            self.misses += 1
            arrays: dict[str, np.ndarray] = {}
            info = builder(lambda array_name, array: arrays.__setitem__(array_name, np.asarray(array)))
            seconds = time.perf_counter() - start
            self.extraction_seconds += seconds
            meta = {"key": key, "describe": canonical(describe), "info": canonical(info), "seconds": seconds}
            self.entries.append({"name": name, "key": key, "hit": False, "path": None})
            return CacheEntry(folder, arrays, meta, hit=False)

        folder.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(builder, RowBuilder):
            built = build_blocks(folder, name, key, builder, describe, processes, start)
        else:
            build_whole(folder, name, key, builder, describe, processes, start)
            built = True
        entry = load_entry(folder, key)
        if processes.any(entry is None):
            raise CacheError(
                f"feature cache entry {folder} could not be read back after it was built"
                + (f" (process {processes.index} of {processes.count} does not see it: the cache folder must be "
                   "one folder for every process; set cache_dir= to a shared file system, or feature_cache=false)"
                   if processes.count > 1 else ""))
        if not built:  # another run built it while this one waited for it
            return self._hit(entry, name, key)
        self.misses += 1
        self.extraction_seconds += time.perf_counter() - start
        self.entries.append({"name": name, "key": key, "hit": False, "path": str(folder)})
        entry.hit = False
        return entry

    def stats(self) -> dict[str, Any]:
        """Hits, misses, extraction seconds and the entries used, for ``run.json``."""
        return {"enabled": self.enabled, "root": str(self.root), "hits": self.hits, "misses": self.misses,
                "extraction_seconds": round(self.extraction_seconds, 2), "entries": list(self.entries)}

    def _hit(self, entry: CacheEntry, name: str, key: str) -> CacheEntry:
        touch(entry.path / META_NAME)  # the entry's last use, for `fusionzoo cache clear --older-than`
        self.hits += 1
        self.entries.append({"name": name, "key": key, "hit": True, "path": str(entry.path)})
        logger.info("feature cache hit: %s", entry.path)
        return entry
