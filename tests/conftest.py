"""Test-wide settings: offline hubs, temporary caches, deterministic threads."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Frozen-encoder training extracts into the feature cache: one temporary folder per test session
# (set before the test modules are imported, so the environments they hand to subprocesses have it),
# never the user's ~/.cache. Tests that count extractions use a cache_dir of their own.
_FEATURE_CACHE = tempfile.mkdtemp(prefix="fusionzoo-test-features-")
os.environ["FUSIONZOO_CACHE"] = _FEATURE_CACHE
atexit.register(shutil.rmtree, _FEATURE_CACHE, True)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
#: Test modules whose module-scoped fixtures take seconds to build (a training launch, a trained model,
#: a METEOR process). Under ``pytest -n 2`` each runs on one worker: split over both, each worker would
#: build them again.
SHARED_FIXTURE_MODULES = frozenset({
    "tests/training/test_distributed.py",
    "tests/training/test_feature_cache_training.py",
    "tests/training/test_pretrain.py",
    "tests/training/test_interrupt.py",
    "tests/training/test_compile.py",
    "tests/test_perf_benchmark.py",
    "tests/test_bench_profile.py",
    "tests/tasks/test_caption_eval.py",
    "tests/tasks/test_retrieval.py",
    "tests/commands/test_retrieve.py",
    "tests/bench/test_bench_train_encoders.py",
    "tests/test_explain.py",
})


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``-n N``'s test-by-test load balancing, each module of :data:`SHARED_FIXTURE_MODULES` one unit.

    (xdist's own ``--dist loadgroup`` marks tests by rewriting their node ids, which pytest 9 ignores.)
    The units with the most tests, these modules, are handed out first.
    """
    if config.getvalue("dist") != "load":
        return None  # --dist loadfile, each, ...: as asked
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_FIXTURE_MODULES else nodeid

    return SharedFixtureScheduling(config, log)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> None:
    """Tiny tensors run fastest on one thread; the suite runs two workers (pytest -n 2) on 2 cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _temporary_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the datasets cache at a temporary folder (never the user's ~/.cache)."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache)


@pytest.fixture
def coco_mini() -> Path:
    """The shared real-COCO slice; tests that need it skip cleanly without it."""
    root = SHARED_DATA / "coco-vqa-mini"
    if not root.is_dir():
        pytest.skip(f"{root} not present (only in the project's CI and dev machines)")
    return root


@pytest.fixture
def tasks_loaded_once(monkeypatch: pytest.MonkeyPatch) -> dict[tuple, int]:
    """For the test's length, each bench task loader reads a (data folder, split) once; later runs get a copy.

    Sort-of-CLEVR's 40,000 questions take seconds to read, easy-VQA's too: a test comparing several
    bench runs on the same data paid that each run. Returns the count of real loads by (task, folder, split).
    """
    import copy

    from fusionzoo.bench import suites

    loads: dict[tuple, int] = {}
    kept: dict[tuple, object] = {}

    def once(name: str, loader):
        def load(data_dir, eval_split: str = "test"):
            key = (name, str(data_dir), eval_split)
            if key not in kept:
                kept[key] = loader(data_dir, eval_split)
                loads[key] = loads.get(key, 0) + 1
            return copy.deepcopy(kept[key])  # what a run does to its task never reaches the next run
        return load

    for name, loader in list(suites.TASK_LOADERS.items()):
        monkeypatch.setitem(suites.TASK_LOADERS, name, once(name, loader))
    return loads
