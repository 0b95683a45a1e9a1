"""The benchmark's feature cache: :mod:`fusionzoo.features.cache`, which training runs share.

Kept under this name so that code written against ``fusionzoo.bench.cache`` keeps working.
"""

from ..features.cache import (  # noqa: F401
    BUILD_GRACE_SECONDS,
    CACHE_FORMAT,
    LOCATION_FIELDS,
    META_NAME,
    Builder,
    CacheEntry,
    CacheError,
    FeatureCache,
    OneProcess,
    Processes,
    RowBuilder,
    StoredEntry,
    cache_key,
    default_cache_dir,
    entries_to_remove,
    fingerprint_files,
    fingerprint_module,
    fingerprint_texts,
    parse_age,
    remove_entries,
    stored_entries,
)
