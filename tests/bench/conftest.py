"""Bench test helpers: a test that runs the bench several times on the same data reads that data once."""

from __future__ import annotations

import copy

import pytest

from fusionzoo.bench import suites


@pytest.fixture
def tasks_loaded_once(monkeypatch: pytest.MonkeyPatch) -> dict[tuple, int]:
    """For the test's length, each task loader reads a (data folder, split) once; later runs get a copy.

    Sort-of-CLEVR's 40,000 questions take seconds to read, easy-VQA's too: a test comparing several
    runs on the same data paid that each run. Returns the count of real loads by (task, folder, split).
    """
    loads: dict[tuple, int] = {}
    kept: dict[tuple, suites.BenchTask] = {}

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
