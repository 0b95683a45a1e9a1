"""benchmarks/bench_profile.py: a --quick run in this process, and its FLOP counts on known cases.

Checks that the figures add up (categories and phases to the profiled step, utilisation to
achieved over peak), never wall-clock values: those depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_profile.py"


@pytest.fixture(scope="module")
def bench_profile() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_profile"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(bench_profile: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    threads = torch.get_num_threads()
    try:
        bench_profile.main(["--quick", "--device", "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_categories_and_phases_add_up_to_the_profiled_step(quick: dict, bench_profile: ModuleType) -> None:
    step = quick["profiled_step_ms"]
    assert step > 0
    assert list(quick["categories"]) == list(bench_profile.CATEGORIES)
    for table in ("categories", "phases"):
        entries = quick[table].values()
        assert sum(e["ms"] for e in entries) == pytest.approx(step, rel=1e-6), table
        assert sum(e["percent"] for e in entries) == pytest.approx(100.0, rel=1e-6), table
        assert all(e["ms"] >= -1e-9 for e in entries), table
    categories = quick["categories"]
    assert categories["matmul / linear / bmm"]["ms"] > 0 and categories["optimizer"]["ms"] > 0
    assert categories["data gathering / indexing"]["ms"] > 0
    assert 0 <= quick["other_between_ops_ms"] <= categories["other"]["ms"] + 1e-9
    assert 0 < len(quick["top_ops"]) <= 15
    assert any(op["category"] == "matmul / linear / bmm" for op in quick["top_ops"])


def test_flops_and_utilisation(quick: dict) -> None:
    assert quick["flops_per_step"] > 0 and quick["peak_tflops"] > 0
    assert quick["step_ms"] == pytest.approx(sorted(quick["step_samples_ms"])[len(quick["step_samples_ms"]) // 2],
                                             abs=1e-3)
    assert quick["achieved_tflops"] == pytest.approx(quick["flops_per_step"] / (quick["step_ms"] / 1e3) / 1e12)
    assert quick["utilisation"] == pytest.approx(quick["achieved_tflops"] / quick["peak_tflops"])
    assert quick["peak_tflops"] == max(quick["peak_tflops_start_end"])  # the better of the two measurements
    # the precision the bench's auto picks for this row on this CPU, and the peak measured at it
    from fusionzoo.bench.loop import resolve_precision
    from fusionzoo.bench.settings import row_precision

    expected = row_precision("merged_transformer", resolve_precision("auto", torch.device("cpu")), auto=True)
    assert quick["row"]["precision"] == expected
    assert quick["peak_kind"] == ("fp32" if expected == "no" else "bf16")
    assert quick["peak_memory_mib"] is None  # CUDA only


def test_the_row_is_the_bench_row(quick: dict) -> None:
    from fusionzoo.bench.settings import fusion_kwargs_for, settings_for

    row = quick["row"]
    assert (row["suite"], row["fusion"]) == ("sort-of-clevr", "merged_transformer")
    settings = settings_for("sort-of-clevr", "merged_transformer")
    assert (row["batch_size"], row["lr"], row["epochs"]) == (settings.batch_size, settings.lr, settings.epochs)
    assert row["fusion_kwargs"] == fusion_kwargs_for("merged_transformer", "sort-of-clevr")
    assert quick["machine"]["cpu"] and quick["steps"]["profiled"] >= 1


class LinearLoss(nn.Module):
    """One nn.Linear; ``.loss`` is the sum of its output (the contract perf.train_flops reads)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.linear(x).sum())


def test_a_linear_layer_counts_two_flops_per_multiply_add_three_times(bench_profile: ModuleType) -> None:
    b, d_in, d_out = 8, 16, 12
    x = torch.randn(b, d_in, requires_grad=True)  # the input's gradient is a third product
    assert bench_profile.step_flops(LinearLoss(d_in, d_out), {"x": x}) == 2 * b * d_in * d_out * 3


class AttentionLoss(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> SimpleNamespace:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the CPU flash kernel, FlopCounterMode has no formula of its own
            return SimpleNamespace(loss=F.scaled_dot_product_attention(q, k, v).sum())


def test_cpu_flash_attention_is_counted(bench_profile: ModuleType) -> None:
    b, h, length, e = 2, 2, 8, 4
    q, k, v = (torch.randn(b, h, length, e, requires_grad=True) for _ in range(3))
    # forward: scores and the weighted sum (2 products); backward: recomputed scores and 4 more
    assert bench_profile.step_flops(AttentionLoss(), {"q": q, "k": k, "v": v}) == 2 * b * h * length * length * e * 7
