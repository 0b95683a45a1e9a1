"""What a report judges: differences against the seeds' spread, the best baseline, the words under a table."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fusionzoo.bench import tables
from fusionzoo.bench.suites import BenchError
from fusionzoo.bench.verdicts import best_baseline, combined_spread, difference_cells, exceeds, verdict_lines
from fusionzoo.commands.bench import DEFAULT_SEEDS, bench_seeds

MAJORITY = {"answer": "yes", "kind": "answer", "metrics": {"accuracy": 52.0}}


def _row(fusion: str, accuracy: float, std: float | None, reference: bool = False) -> dict[str, Any]:
    metrics: dict[str, Any] = {"accuracy": accuracy}
    if std is not None:
        metrics["accuracy_std"] = std
    return {"task": "t", "fusion": fusion, "metrics": metrics, "seeds": [0, 1, 2] if std is not None else [0],
            "params_trainable": 10, "train_seconds": 1.0, "eval_samples_per_second": 1.0, "peak_memory_mb": 1.0,
            "config": {"reference": reference, "model_task": "vqa", "headline_metric": "accuracy", "epochs": 1,
                       "batch_size": 8, "lr": 1e-3, "fusion_kwargs": {"dim": 8}}}


def test_the_spread_rule() -> None:
    assert combined_spread(3.0, 4.0) == 5.0 and combined_spread(None, 1.0) is None
    assert exceeds(5.1, 5.0) and not exceeds(-5.0, 5.0) and exceeds(-5.1, 5.0) and not exceeds(100.0, None)


def test_differences_from_the_best_baseline_and_the_next_fusion() -> None:
    rows = [_row("b", 60.0, 1.0), _row("a", 70.0, 2.0), _row("c", 59.0, 0.5),
            _row("text_only", 55.0, 1.5, reference=True), _row("image_only", 40.0, 1.0, reference=True)]
    baseline = best_baseline(rows, MAJORITY)
    assert (baseline.label, baseline.score, baseline.std) == ("text_only (reference)", 55.0, 1.5)
    cells = difference_cells(rows, baseline)  # in table order: a, b, c, text_only, image_only
    # a: 70 - 55 = 15 > hypot(2, 1.5) = 2.5; next (b): 10 > hypot(2, 1) = 2.24
    # b: 5 > hypot(1, 1.5) = 1.80; next (c): 1 < hypot(1, 0.5) = 1.12 -> unmarked
    # c: 4 > hypot(0.5, 1.5) = 1.58; the last fusion has no next
    assert cells == [("+15.00*", "+10.00*"), ("+5.00*", "+1.00"), ("+4.00*", "-"), ("-", "-"), ("-", "-")]
    words = " ".join(verdict_lines(rows, baseline))
    assert "3 of 3 fusions beat the best baseline, text_only (reference) (55.00 accuracy)" in words
    # the prior is the baseline when it is highest, with spread 0
    prior = best_baseline(rows, {**MAJORITY, "metrics": {"accuracy": 69.0}})
    assert (prior.score, prior.std) == (69.0, 0.0) and prior.label == 'majority prior "yes"'
    assert difference_cells(rows, prior)[0][0] == "+1.00"  # 1 < 2 (a's own spread)
    assert "No fusion beats the best baseline" in " ".join(verdict_lines(rows, prior))
    assert "(1 score above it within the noise)" in " ".join(verdict_lines(rows, prior))


def test_one_seed_is_never_judged_and_the_words_say_so() -> None:
    rows = [_row("a", 50.0, None), _row("b", 45.0, None), _row("text_only", 51.0, None, reference=True)]
    baseline = best_baseline(rows, MAJORITY)
    assert all("*" not in cell for pair in difference_cells(rows, baseline) for cell in pair)
    words = " ".join(verdict_lines(rows, baseline))
    assert words.startswith('No fusion scores above the best baseline, majority prior "yes" (52.00 accuracy)')
    assert "text_only" in " ".join(verdict_lines(rows, best_baseline(rows, None)))
    assert "With one seed there is no spread" in words


def test_every_table_has_the_prior_row_and_the_differences() -> None:
    rows = [_row("a", 50.0, 1.0), _row("text_only", 45.0, 1.0, reference=True)]
    run = {"majority_prior": {"t": MAJORITY}, "tasks": ["t"]}
    table = tables.task_table(rows, MAJORITY)
    assert table[0].startswith("| fusion | accuracy | vs baseline | vs next |")
    assert table[2].startswith("| a | 50.00 ± 1.00 | -2.00* | - |")  # below the prior by more than its spread
    assert table[-1].startswith('| always "yes" (majority prior) | 52.00 | - | - |')
    assert len({line.count("|") for line in table}) == 1  # every line has the header's cells
    printed = tables.results_tables(rows, run)
    assert "No fusion beats the best baseline, majority prior \"yes\" (52.00 accuracy)" in printed
    assert not math.isnan(best_baseline(rows, None).score)  # the references alone


def test_seeds_of_a_run() -> None:
    assert bench_seeds(None, 0, quick=False) == list(range(DEFAULT_SEEDS)) and DEFAULT_SEEDS == 3
    assert bench_seeds(None, 0, quick=True) == [0]
    assert bench_seeds([1], 0, quick=False) == [0] and bench_seeds([3], 10, quick=True) == [10, 11, 12]
    assert bench_seeds([4, 7], 0, quick=False) == [4, 7]
    with pytest.raises(BenchError, match="expected a number of seeds >= 1"):
        bench_seeds([0], 0, quick=False)
    with pytest.raises(BenchError, match="given twice"):
        bench_seeds([2, 2], 0, quick=False)


def test_auto_keeps_bf16_unsafe_fusions_in_float32_and_the_report_says_so() -> None:
    from fusionzoo.bench.settings import row_precision
    from fusionzoo.training.step import BF16_UNSAFE

    assert "albef" in BF16_UNSAFE
    assert row_precision("albef", "bf16", auto=True) == "no"
    assert row_precision("albef", "bf16", auto=False) == "bf16"  # asked for explicitly
    assert row_precision("co_attention", "bf16", auto=True) == "bf16"
    assert row_precision("albef", "no", auto=True) == "no"
    # without its ITC loss ALBEF's bf16 runs agreed with float32: auto keeps bf16 for such a row
    assert row_precision("albef", "bf16", auto=True, fusion_kwargs={"itc_weight": 0.0}) == "bf16"
    assert row_precision("albef", "bf16", auto=True, fusion_kwargs={"itc_weight": 0.1}) == "no"
    rows = [_row("albef", 50.0, None), _row("co_attention", 40.0, None)]
    rows[0]["config"]["precision"], rows[1]["config"]["precision"] = "no", "bf16"
    lines = tables._precision_lines(rows, {"precision": "bf16"})
    assert len(lines) == 1 and lines[0].startswith("- albef trained in float32, not bf16")
    assert BF16_UNSAFE["albef"] in lines[0]
    assert tables._precision_lines(rows[1:], {"precision": "bf16"}) == []


def test_train_auto_precision_keeps_albef_in_float32(monkeypatch) -> None:
    from fusionzoo.training import step

    monkeypatch.setattr(step, "auto_mixed_precision", lambda on_cuda: "bf16")  # a machine where auto picks bf16
    assert step.resolve_precision("auto", "cpu", fusion="albef") == "no"
    assert step.resolve_precision("auto", "cpu", fusion="co_attention") == "bf16"
    assert step.resolve_precision("bf16", "cpu", fusion="albef") == "bf16"
    assert step.resolve_precision("auto", "cpu", fusion="albef", fusion_kwargs={"itc_weight": 0}) == "bf16"
    assert step.resolve_precision("auto", "cpu", fusion="albef", fusion_kwargs={"num_layers": 2}) == "no"
