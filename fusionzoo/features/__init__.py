"""Frozen-encoder features, computed once and kept on disk: the one cache that benchmarks and training share.

* :mod:`~fusionzoo.features.cache` -- :class:`FeatureCache`: memory-mapped float16 arrays
  keyed by encoder weights, preprocessing and inputs; resumable builds shared by a run's
  processes; ``fusionzoo cache list`` / ``clear`` (imports no torch);
* :mod:`~fusionzoo.features.extract` -- :func:`image_features` and :func:`text_features`,
  which fill it.

``fusionzoo bench`` reads it through :mod:`fusionzoo.bench.features`, training runs through
:mod:`fusionzoo.training.features`.
"""

import importlib
from typing import Any

# Names imported on first use (PEP 562): listing the cache needs no torch.
_LAZY = {
    "CacheEntry": "cache", "CacheError": "cache", "FeatureCache": "cache", "RowBuilder": "cache",
    "cache_key": "cache", "default_cache_dir": "cache", "fingerprint_files": "cache",
    "fingerprint_module": "cache", "fingerprint_texts": "cache",
    "image_features": "extract", "image_preprocessing": "extract", "text_features": "extract",
    "text_preprocessing": "extract",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
