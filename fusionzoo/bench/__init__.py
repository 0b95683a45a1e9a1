"""``fusionzoo bench``: every fusion trained and scored on the same tasks, on cached frozen-encoder features.

::

    from fusionzoo.bench import BenchConfig, run_bench
    rows = run_bench(BenchConfig(suite="easy-vqa", quick=True, out="bench-results"))

Modules, in the order a run uses them:

* :mod:`~fusionzoo.bench.config` -- :class:`BenchConfig` (the command's options) and their checks;
* :mod:`~fusionzoo.bench.suites` -- the suites (``sort-of-clevr``, ``easy-vqa``, ``coco``, ``vqav2``,
  ``flickr30k``), their tasks and data layouts;
* :mod:`~fusionzoo.bench.settings` -- how each row trains: per-task settings, each fusion's
  changes, the fusions' widths;
* :mod:`fusionzoo.features` / :mod:`~fusionzoo.bench.features` -- the feature cache
  and the extraction it avoids (:mod:`fusionzoo.features`, which training runs share), and
  what the bench does to the cached tokens (pooling, position channels);
  :mod:`~fusionzoo.bench.run_features` -- the run's features as tensors, got once;
* :mod:`~fusionzoo.bench.tails` -- ``--train-encoders``: the encoders' last blocks trained per row;
* :mod:`~fusionzoo.bench.baselines` -- the text-only and image-only reference rows;
* :mod:`~fusionzoo.bench.loop` -- the training / inference loop over cached features;
* :mod:`~fusionzoo.bench.row` -- one row: build, train, score, the results row;
  :mod:`~fusionzoo.bench.retrieval` -- a retrieval task's rows;
* :mod:`~fusionzoo.tasks.scoring` -- metrics and per-type breakdowns;
* :mod:`~fusionzoo.bench.workers` -- the run's rows, one at a time, in worker processes or on several GPUs;
* :mod:`~fusionzoo.bench.tune` -- ``--tune``: each row's settings chosen on validation;
* :mod:`~fusionzoo.bench.runner` -- :func:`run_bench`, which ties them together;
* :mod:`~fusionzoo.bench.report` -- writes results.json, results.md, run.json and the plots:
  :mod:`~fusionzoo.bench.tables` (results.md), :mod:`~fusionzoo.bench.plots` (the PNGs),
  :mod:`~fusionzoo.bench.priors` (majority and question priors) and
  :mod:`~fusionzoo.bench.formatting` (names, order and digits of the rows, for both).
"""

import importlib
from typing import Any

# Names imported on first use (PEP 562): `fusionzoo cache list` reads the cache without torch.
_LAZY = {
    "REFERENCES": "baselines", "ImageOnlyReference": "baselines", "TextOnlyReference": "baselines",
    "FeatureCache": "..features.cache", "cache_key": "..features.keys", "fingerprint_files": "..features.keys",
    "fingerprint_module": "..features.keys", "fingerprint_texts": "..features.keys",
    "BenchConfig": "config", "run_bench": "runner", "SUITES": "suites",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = _LAZY[name]
        where = importlib.import_module(module, __name__) if module.startswith(".") else \
            importlib.import_module(f"{__name__}.{module}")
        return getattr(where, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REFERENCES",
    "SUITES",
    "BenchConfig",
    "FeatureCache",
    "ImageOnlyReference",
    "TextOnlyReference",
    "cache_key",
    "fingerprint_files",
    "fingerprint_module",
    "fingerprint_texts",
    "run_bench",
]
