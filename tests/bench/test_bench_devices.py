"""Rows on several devices at once (one per GPU, in threads) give the rows trained one at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionzoo.features.cache import FeatureCache
from fusionzoo.bench.config import BenchConfig
from fusionzoo.bench.run_features import extract_features
from fusionzoo.bench.settings import settings_for
from fusionzoo.bench.workers import run_rows
from fusionzoo.bench.suites import SUITES, load_tasks
from fusionzoo.encoders import build_text_encoder, build_vision_encoder


@pytest.mark.slow
def test_rows_on_several_devices_equal_rows_one_at_a_time(tmp_path: Path, request, monkeypatch) -> None:
    # The threaded path is what --device cuda takes with several GPUs; two CPU "devices" run
    # the same code here: each device's own encoder copies, models built in turn under their seed.
    # The heads' dropout draws from the device's generator: one per GPU, but one for both CPU
    # "devices", so here it is switched off (a draw of one row would move the other's stream).
    monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: x)
    cpu = torch.device("cpu")
    # One intra-op thread in every row, as the rows on CPU "devices" get their share of it: a
    # matmul split over another number of threads differs in the last bits, which training amplifies.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    suite = SUITES["easy-vqa"]
    tasks = load_tasks(suite, ["easy-vqa"], None, quick=True)
    vision, text = build_vision_encoder("tiny"), build_text_encoder("tiny")
    vision.freeze()
    text.freeze()
    features, _ = extract_features(tasks, vision, text, None, FeatureCache(tmp_path / "cache"), suite.image_size,
                                   cpu, False)  # every token (the tiny ViT has a [CLS])
    encoders = {"vision": vision, "text": text, "causal_text": None}
    config = BenchConfig(suite="easy-vqa", seeds=[0, 1], progress=False)
    work = [(0, fusion, settings_for("easy-vqa", fusion, epochs=1))
            for fusion in ("co_attention", "early_concat", "albef", "text_only")]
    alone = {i: row for i, row, _ in run_rows(work, tasks, features, encoders, config, "no", cpu, jobs=1)}
    shared = {i: row for i, row, _ in run_rows(work, tasks, features, encoders, config, "no", cpu, jobs=2,
                                                devices=[cpu, cpu])}
    assert sorted(shared) == list(range(len(work)))
    for i, (_, fusion, _) in enumerate(work):
        assert shared[i]["fusion"] == alone[i]["fusion"] == fusion
        for name in ("accuracy", "final_train_loss"):
            assert shared[i]["metrics"][name] == pytest.approx(alone[i]["metrics"][name], rel=1e-6, abs=1e-9), (fusion, name)
        assert shared[i]["metrics"]["per_seed"] == alone[i]["metrics"]["per_seed"]
    assert next(encoders["text"].parameters()).device == cpu  # the caller's encoders stay where they were
