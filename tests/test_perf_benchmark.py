"""Smoke test of benchmarks/perf.py: a --quick --vs-vilt run in a subprocess.

Checks the shape of what it reports (the last stdout line, the JSON file), never
wall-clock figures: those depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PERF = REPO_ROOT / "benchmarks" / "perf.py"


def _positive_float(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    pytest.importorskip("psutil")
    out = tmp_path_factory.mktemp("perf") / "perf.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(PERF), "--quick", "--vs-vilt", "--device", "cpu",
         "--fusions", "merged_transformer", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=180, cwd=str(REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last_line = proc.stdout.strip().splitlines()[-1]
    return json.loads(last_line), json.loads(out.read_text()), proc.stdout


def test_last_line_has_the_ratios(quick_run: tuple[dict, dict, str]) -> None:
    summary, _, _ = quick_run
    for key in ("vilt_ratio_bf16", "vilt_ratio_fp32", "mfu_bf16", "mfu_fp32", "kv_cache_speedup",
                "peak_gflops_fp32", "peak_gflops_bf16"):
        assert _positive_float(summary[key]), (key, summary[key])
    assert isinstance(summary["loadavg_start"], list) and len(summary["loadavg_start"]) == 3
    assert summary["params_ours"] > 0 and summary["params_vilt"] > 0


def test_json_file_has_every_measurement(quick_run: tuple[dict, dict, str]) -> None:
    _, full, _ = quick_run
    assert full["summary"]["vilt_ratio_fp32"] == quick_run[0]["vilt_ratio_fp32"]
    assert [r["fusion"] for r in full["fusions"]] == ["merged_transformer"]
    for row in full["fusions"]:
        for precision in ("fp32", "bf16"):
            assert _positive_float(row["train_ms"][precision])
            assert _positive_float(row["mfu"][precision])
            assert _positive_float(row["infer_samples_per_s"][precision])
        assert _positive_float(row["caption_tokens_per_s"]["kv_cache"])
        assert _positive_float(row["caption_tokens_per_s"]["no_cache"])
        assert _positive_float(row["kv_cache_speedup"])
        memory = full["memory"][row["fusion"]]
        assert memory["fp32"] >= 0 and memory["bf16"] >= 0
    assert full["memory"]["vilt"]["fp32"] >= 0
    assert full["vilt"]["params_ratio"] == pytest.approx(1.0, abs=0.05)  # equal configurations
    assert "loadavg_start" in full["machine"] and full["memory_method"]
    assert full["vilt"]["compiled"] == {"ours": False, "vilt": False} and full["summary"]["compile_vilt"] is False


def test_report_prints_both_parameter_counts(quick_run: tuple[dict, dict, str]) -> None:
    _, full, stdout = quick_run
    assert f"{full['vilt']['params_ours']:,}" in stdout and f"{full['vilt']['params_vilt']:,}" in stdout
    assert "load average" in stdout


def test_compile_vilt_needs_the_compiled_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    perf = _load_perf()
    assert perf.parse_args(["--vs-vilt", "--compile", "--compile-vilt"]).compile_vilt
    for argv in (["--compile-vilt"], ["--vs-vilt", "--compile-vilt"], ["--compile", "--compile-vilt"]):
        with pytest.raises(SystemExit):
            perf.parse_args(argv)
        assert "--compile-vilt compiles ViLT" in capsys.readouterr().err


def _load_perf():
    spec = importlib.util.spec_from_file_location("perf", PERF)
    perf = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("perf", perf)  # its dataclasses look their module up there
    spec.loader.exec_module(perf)
    return perf


def test_first_calls_are_kept_out_of_the_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step's first call (its compilation) is stored apart, not taken as the only sample."""
    perf = _load_perf()
    seconds = iter([30.0, 0.5, 0.2, 0.1, 0.3, 0.4, 0.2])  # what timed() reports, call by call
    calls: list[str] = []
    monkeypatch.setattr(perf, "timed", lambda fn, device: (fn(), next(seconds))[1])
    cfg = perf.PerfConfig(warmup=1, repeats=5, budget_s=1e9, slow_s=20.0)
    first: dict[str, float] = {}
    timing = perf.time_interleaved({"step": lambda: calls.append("step")}, "cpu", cfg, first)["step"]
    assert first == {"step": 30.0}
    assert timing.samples == [0.2, 0.1, 0.3, 0.4, 0.2] and timing.median_s == 0.2 and not timing.first_counted
    assert len(calls) == 7  # the first call, one warmup, five rounds
    # without first_calls the same 30 s call is a slow warmup: the only sample, as before
    seconds = iter([30.0])
    timing = perf.time_interleaved({"step": lambda: None}, "cpu", cfg)["step"]
    assert timing.samples == [30.0] and timing.first_counted
