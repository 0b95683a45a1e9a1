"""Frozen-encoder features, computed once and kept on disk: the one cache that benchmarks and training share.

* :mod:`~fusionzoo.features.cache` -- :class:`FeatureCache`: memory-mapped float16 arrays,
  looked up and, on a miss, built;
* :mod:`~fusionzoo.features.keys` -- :func:`cache_key` and the fingerprints of weights and
  inputs it hashes;
* :mod:`~fusionzoo.features.layout` -- an entry's folder on disk (:class:`CacheEntry`),
  :func:`default_cache_dir`, :class:`CacheError`;
* :mod:`~fusionzoo.features.build` -- :class:`RowBuilder`: resumable builds shared by a
  run's processes, published by a rename;
* :mod:`~fusionzoo.features.manage` -- ``fusionzoo cache list`` / ``clear`` (imports no torch);
* :mod:`~fusionzoo.features.extract` -- :func:`image_features` and :func:`text_features`,
  which fill it.

``fusionzoo bench`` reads it through :mod:`fusionzoo.bench.features`, training runs through
:mod:`fusionzoo.training.features`.
"""

import importlib
from typing import Any

# Names imported on first use (PEP 562): listing the cache needs no torch.
_LAZY = {
    "CacheEntry": "layout", "CacheError": "layout", "FeatureCache": "cache", "RowBuilder": "build",
    "cache_key": "keys", "default_cache_dir": "layout", "fingerprint_files": "keys",
    "fingerprint_module": "keys", "fingerprint_texts": "keys",
    "image_features": "extract", "image_preprocessing": "extract", "text_features": "extract",
    "text_preprocessing": "extract",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
