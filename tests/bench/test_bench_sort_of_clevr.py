"""The sort-of-clevr suite: intermediate-stage image tokens, 2-D position channels, validation scoring, ``--quick``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fusionzoo.bench.features import add_position_channels
from fusionzoo.bench.suites import SUITES, BenchError, load_tasks
from fusionzoo.cli import main
from fusionzoo.encoders import build_vision_encoder

TEMPLATES = {"shape", "horizontal", "vertical", "closest_shape", "furthest_shape", "count_same_shape"}


def test_position_channels_are_sinusoids_of_each_token_centre() -> None:
    tokens = torch.randn(2, 9, 5)
    out = add_position_channels(tokens, 2)
    assert out.shape == (2, 9, 5 + 8)
    assert torch.equal(out[..., :5], tokens)  # the features are kept as they were
    assert torch.equal(out[0, :, 5:], out[1, :, 5:])  # the same grid for every image
    for index in range(9):  # row-major: token index = row * 3 + column
        row, column = divmod(index, 3)
        x, y = (column + 0.5) / 3, (row + 0.5) / 3
        expected = []
        for values in ((x, math.sin), (x, math.cos), (y, math.sin), (y, math.cos)):
            coordinate, function = values
            expected += [function(2 ** k * math.pi * coordinate) for k in range(2)]
        assert torch.allclose(out[0, index, 5:], torch.tensor(expected), atol=1e-6), index
    # the lowest cosine orders columns left to right, rows top to bottom
    grid = out[0, :, 5:].reshape(3, 3, 8)
    assert bool((grid[:, 1:, 2] < grid[:, :-1, 2]).all()) and bool((grid[1:, :, 6] < grid[:-1, :, 6]).all())
    assert add_position_channels(tokens, 0) is tokens
    with pytest.raises(BenchError, match="not a square grid"):
        add_position_channels(torch.randn(1, 5, 3), 2)


@pytest.mark.slow
def test_stage_tokens_are_the_intermediate_map_row_major() -> None:
    vision = build_vision_encoder("efficientnet-lite0")
    vision.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vision.stage_tokens(pixels, 2)  # (2, 8*8, 40): stride 8
        x = vision.model.bn1(vision.model.conv_stem(pixels))  # computed here block by block
        for block in vision.model.blocks[:3]:
            x = block(x)  # (2, 40, 8, 8) after the third stage
    assert tokens.shape == (2, 64, 40)
    assert torch.allclose(tokens[:, 8 * 3 + 5], x[:, :, 3, 5], atol=1e-5)  # row 3, column 5
    assert torch.allclose(tokens, x.flatten(2).transpose(1, 2), atol=1e-5)
    assert vision.stage_tokens(pixels, -1).shape == (2, 4, 320)  # the last stage, stride 32
    with pytest.raises(ValueError, match="no stage 5; its stages"):
        vision.stage_tokens(pixels, 5)


def test_eval_split_must_be_test_or_val() -> None:
    # every task has a validation split (tests/bench/test_bench_suites_data.py)
    with pytest.raises(BenchError, match="must be test or val"):
        load_tasks(SUITES["easy-vqa"], ["easy-vqa"], None, quick=True, eval_split="dev")


@pytest.mark.slow
def test_bench_quick_sort_of_clevr_reports_types_and_scores_val(tmp_path: Path, tasks_loaded_once,
                                                             capsys) -> None:
    data, cache = tmp_path / "scenes", tmp_path / "features"
    fusions = "early_concat,merged_transformer,late_voting,text_only,image_only"
    args = ["bench", "--suite", "sort-of-clevr", "--quick", "--no-progress", "--data-dir", str(data),
            "--cache-dir", str(cache), "--fusions", fusions, "--jobs", "1"]
    assert main([*args, "--out", str(tmp_path / "test")]) == 0
    assert "sort-of-clevr (accuracy" in capsys.readouterr().out
    rows = json.loads((tmp_path / "test" / "results.json").read_text())
    assert [r["fusion"] for r in rows] == fusions.split(",")
    for row in rows:
        metrics = row["metrics"]
        assert set(metrics["per_answer_type"]) == {"non-relational", "relational"}
        assert set(metrics["per_question_type"]) == TEMPLATES
        assert row["config"]["image_stage"] == 2 and row["config"]["eval_split"] == "test"
        assert row["config"]["test_samples"] > 0 and row["config"]["train_samples"] > row["config"]["test_samples"]
    run = json.loads((tmp_path / "test" / "run.json").read_text())
    # stage 2 of EfficientNet-Lite0 at 128 px: 16x16 x 40, pooled to 4x4, plus 2 x 4 position channels
    assert run["features"]["encoder_tokens"] == [256, 40] and run["features"]["image_tokens"] == [16, 48]
    markdown = (tmp_path / "test" / "results.md").read_text()
    assert "| fusion | non-relational | relational |" in markdown and "(16 tokens of 48: stage 2 map, 8 of them" in markdown
    assert (tmp_path / "test" / "per_type_sort-of-clevr.png").stat().st_size > 0

    # Scoring the validation split: other scenes, the same cached generation and train features.
    assert main([*args, "--out", str(tmp_path / "val"), "--eval-split", "val", "--fusions", "late_voting"]) == 0
    printed = capsys.readouterr().out
    assert "sort-of-clevr (accuracy" in printed
    val_rows = json.loads((tmp_path / "val" / "results.json").read_text())
    assert val_rows[0]["config"]["eval_split"] == "val"
    val_run = json.loads((tmp_path / "val" / "run.json").read_text())
    assert "val accuracy" in val_run["task_descriptions"]["sort-of-clevr"]
    val_markdown = (tmp_path / "val" / "results.md").read_text()
    assert "val samples" in val_markdown and "test samples" not in val_markdown.split("## sort-of-clevr")[1]
    assert len(list(data.iterdir())) == 1  # one generated set, reused

    # Other encoders (--vision / --text): the random tiny presets. The tiny ViT's stage-2 map at the
    # suite's 128 px is 8x8 tokens of 64 (its [CLS] left out), pooled to 4x4; the same generated set.
    assert main([*args, "--out", str(tmp_path / "tiny"), "--vision", "tiny", "--text", "tiny",
                 "--fusions", "early_concat,text_only", "--cache-dir", str(tmp_path / "tiny-cache")]) == 0
    capsys.readouterr()
    tiny_rows = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert [(r["config"]["vision"], r["config"]["text"]) for r in tiny_rows] == [("tiny", "tiny")] * 2
    tiny_run = json.loads((tmp_path / "tiny" / "run.json").read_text())
    assert tiny_run["features"]["encoder_tokens"] == [64, 64] and tiny_run["features"]["image_tokens"] == [16, 72]
    assert "- encoders (frozen): tiny at 128 px" in (tmp_path / "tiny" / "results.md").read_text()
    assert len(list(data.iterdir())) == 1


def test_bench_encoder_options_fail_clearly(tmp_path: Path, capsys) -> None:
    common = ["bench", "--suite", "easy-vqa", "--quick", "--out", str(tmp_path / "out"),
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--vision", "no_such_model_xyz"]) == 2
    err = capsys.readouterr().err
    assert "--vision no_such_model_xyz:" in err and "efficientnet-lite0" in err  # names the presets
    assert main([*common, "--vision", "test_efficientnet"]) == 2  # a timm name: weights from the hub, offline here
    assert "--vision test_efficientnet: could not get pretrained weights" in capsys.readouterr().err
    assert main([*common, "--text", str(tmp_path / "no-such-folder")]) == 2
    assert "--text " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the encoders were built
