"""A ViT's prefix tokens (class / register) are dropped before the bench pools its patch grid, and the log says so."""

from __future__ import annotations

from pathlib import Path

import torch

from fusionzoo.bench.features import grid_note, pool_image_tokens
from fusionzoo.cli import main


def test_prefix_tokens_are_dropped_before_pooling() -> None:
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 3)  # a 4x4 grid
    tokens = torch.cat([torch.full((2, 5, 3), 1e4), patches], dim=1)  # 5 prefix tokens (DINOv2 with registers)
    pooled = pool_image_tokens(tokens, 2, prefix_tokens=5)
    grid = patches.view(2, 4, 4, 3)
    for r in range(2):
        for c in range(2):
            torch.testing.assert_close(pooled[:, 2 * r + c], grid[:, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2].mean(dim=(1, 2)))
    assert torch.equal(pool_image_tokens(tokens, 4, prefix_tokens=5), patches)  # grid kept, prefix still dropped
    assert pool_image_tokens(tokens, 0, prefix_tokens=5) is tokens  # no grid: every token, as before
    note = grid_note("vit_small_patch14_reg4_dinov2", 21, 5, 2)
    assert "5 of them prefix tokens" in note and "4x4 patch grid to 2x2" in note
    assert grid_note("efficientnet-lite0", 49, 0, 7) is None and grid_note("tiny", 17, 1, 0) is None


def test_bench_with_a_vit_pools_its_patches(tmp_path: Path, capsys) -> None:
    """The tiny ViT at 64 px (16 patches and [CLS]) on the easy-VQA suite's 2x2 grid: it stopped before."""
    assert main(["bench", "--suite", "easy-vqa", "--quick", "--no-progress", "--vision", "tiny", "--vision-weights",
                 "random", "--image-size", "64", "--fusions", "early_concat", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert ("image tokens: --vision tiny gives 17, 1 of them prefix tokens (class / register, timm's "
            "num_prefix_tokens) that were dropped; pooled its 4x4 patch grid to 2x2") in printed
    assert "easy-vqa (accuracy" in printed
