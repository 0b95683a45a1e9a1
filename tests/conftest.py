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
