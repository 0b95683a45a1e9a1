"""``--robustness`` and modality dropout: the corruptions against independent computations, a quick bench
writing the robustness table and plot, and ``modality_dropout`` on a batch and in the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionzoo.bench.loop import FeatureView
from fusionzoo.bench.robustness import (CORRUPTIONS, ROBUSTNESS_SEED, corrupt_image_tokens, corrupted_view,
                                        drop_words, relative_drops, shuffle_words)
from fusionzoo.bench.run_features import Features
from fusionzoo.bench.standardize import channel_stats
from fusionzoo.cli import main
from fusionzoo.data.streaming import derive_seed
from fusionzoo.errors import ConfigError
from fusionzoo.training.config import load_config
from fusionzoo.training.modality_dropout import NO_IMAGE, NO_TEXT, EmptyText, drop_modalities, modality_drops
from fusionzoo.training.trainer import FinetuneRecipe

BY_NAME = {c.name: c for c in CORRUPTIONS}
TINY = ["--vision", "tiny", "--text", "tiny", "--image-grid", "0"]


# --------------------------------------------------------------------------------------
# Image corruptions
# --------------------------------------------------------------------------------------
def _features(images: int = 600, tokens: int = 4, channels: int = 6, positions: int = 1) -> Features:
    """Image tokens with ``4 * positions`` trailing position channels (the same for every image)."""
    generator = torch.Generator().manual_seed(0)
    encoder = 3.0 + 2.0 * torch.randn(images, tokens, channels, generator=generator)
    fixed = torch.linspace(-1, 1, tokens * 4 * positions).view(1, tokens, 4 * positions).expand(images, -1, -1)
    return Features(image_tokens=torch.cat([encoder, fixed], dim=2).half(), image_row={}, texts={},
                    image_positions=positions)


def test_image_corruptions_against_numpy() -> None:
    features = _features()
    c = 6  # encoder channels; the last 4 are position channels
    tokens = features.image_tokens.float().numpy()
    train = torch.arange(0, 400)
    mean, std = channel_stats(features.image_tokens, train)
    np.testing.assert_allclose(mean.numpy(), tokens[:400].reshape(-1, 10).mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(std.numpy(), tokens[:400].reshape(-1, 10).std(axis=0), rtol=1e-3, atol=1e-4)
    stats = {"image_mean": mean, "image_std": std}
    test_rows = torch.tensor([450, 400, 599, 450] * 50)  # 3 distinct images, each asked several times
    view = FeatureView(image_tokens=features.image_tokens, image_rows=test_rows)

    def seen(name: str) -> np.ndarray:  # (S, N, D): what each test sample's model input is
        corrupted = corrupted_view(view, None, BY_NAME[name], features, stats)
        return corrupted.image_tokens[corrupted.image_rows].float().numpy()

    clean = tokens[test_rows.numpy()]
    zeros, means = seen("image zeros"), seen("image mean")
    assert np.all(zeros[..., :c] == 0) and np.array_equal(zeros[..., c:], clean[..., c:])
    train_mean = tokens[:400].reshape(-1, 10).mean(axis=0)
    np.testing.assert_allclose(means[..., :c], np.broadcast_to(train_mean[:c], means[..., :c].shape), atol=2e-3)
    assert np.array_equal(means[..., c:], clean[..., c:])
    noisy = seen("noise 1 sd")
    assert np.array_equal(noisy[0], noisy[3]) and not np.array_equal(noisy[0], noisy[1])  # one copy per image
    assert np.array_equal(noisy, seen("noise 1 sd"))  # seeded

    # The noise on many images: mean 0 and the stated multiple of each channel's training sd.
    many = features.image_tokens[:600]
    for level in (0.5, 1.0, 2.0):
        out = corrupt_image_tokens(many, BY_NAME[f"noise {level:g} sd"], mean, std, c).numpy()
        noise = (out - many.float().numpy())[..., :c].reshape(-1, c) / std[:c].numpy()
        np.testing.assert_allclose(noise.std(axis=0), level, rtol=0.06)
        np.testing.assert_allclose(noise.mean(axis=0), 0.0, atol=0.1 * level)
        assert np.array_equal(out[..., c:], many.float().numpy()[..., c:])


def test_relative_drops() -> None:
    scores = {"clean": 80.0, "image zeros": 40.0, "noise 1 sd": 60.0, "empty question": 80.0}
    drops = relative_drops(scores)
    assert drops == {"image drop %": pytest.approx((50.0 + 25.0) / 2), "text drop %": 0.0}
    assert relative_drops({"clean": 0.0, "image zeros": 10.0}) == {"image drop %": 0.0}


# --------------------------------------------------------------------------------------
# Word corruptions
# --------------------------------------------------------------------------------------
QUESTIONS = [f"is there a w{i} shape of colour c{i % 7} in the image number {i}?" for i in range(1500)]


def test_word_dropout_removes_the_drawn_words() -> None:
    for p in (0.25, 0.5):
        dropped = kept = 0
        for question in QUESTIONS:
            words = question.split()
            out = drop_words(question, p)
            assert out == drop_words(question, p)  # a function of the question alone
            # the documented draw: word i goes when uniform i of the question's generator is below p
            draws = torch.rand(len(words), generator=torch.Generator().manual_seed(
                derive_seed(ROBUSTNESS_SEED, "dropout", p, question))).numpy()
            assert out.split() == [w for w, u in zip(words, draws) if u >= p]
            dropped += len(words) - len(out.split())
            kept += len(out.split())
        assert dropped / (dropped + kept) == pytest.approx(p, abs=0.02)
    assert drop_words("what colour is it?", 1.0) == ""  # the empty question


def test_word_shuffle_is_a_permutation() -> None:
    first_positions = []
    for question in QUESTIONS[:600]:
        out = shuffle_words(question)
        assert sorted(out.split()) == sorted(question.split()) and out == shuffle_words(question)
        first_positions.append(question.split().index(out.split()[0]))
    counts = np.bincount(first_positions, minlength=12)  # 12 words: each first about 1/12 of the time
    assert counts.min() > 20 and counts.max() < 80


# --------------------------------------------------------------------------------------
# Modality dropout
# --------------------------------------------------------------------------------------
def test_modality_drops_per_global_row() -> None:
    one = modality_drops(3, 7, 0, 0, 16, 0.5)
    two = torch.cat([modality_drops(3, 7, 0, 0, 8, 0.5), modality_drops(3, 7, 0, 8, 8, 0.5)])
    assert torch.equal(one, two)  # 2 processes at batch 8 draw what 1 process at batch 16 draws
    many = torch.cat([modality_drops(0, step, 0, 0, 50, 0.4) for step in range(60)])  # 3,000 rows
    assert (many != 0).float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert (many == NO_IMAGE).sum().item() == pytest.approx((many == NO_TEXT).sum().item(), rel=0.15)
    assert torch.equal(modality_drops(0, 1, 0, 0, 50, 0.0), torch.zeros(50, dtype=torch.long))


def test_drop_modalities_on_a_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    batch = {"image_states": torch.randn(4, 3, 5, generator=generator) + 1,
             "input_ids": torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0], [101, 5, 6, 102], [101, 4, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]),
             "text_states": torch.randn(4, 4, 6, generator=generator), "labels": torch.arange(4)}
    empty = EmptyText(input_ids=torch.tensor([101, 102]), states=torch.full((2, 6), 0.5))
    out = drop_modalities(batch, torch.tensor([0, NO_IMAGE, NO_TEXT, 0]), empty)
    assert torch.all(out["image_states"][1] == 0)
    for row in (0, 2, 3):
        assert torch.equal(out["image_states"][row], batch["image_states"][row])
    assert out["input_ids"][2].tolist() == [101, 102, 0, 0] and out["attention_mask"][2].tolist() == [1, 1, 0, 0]
    assert torch.all(out["text_states"][2, :2] == 0.5) and torch.all(out["text_states"][2, 2:] == 0)
    for key in ("input_ids", "attention_mask", "text_states"):
        for row in (0, 1, 3):
            assert torch.equal(out[key][row], batch[key][row]), (key, row)
    assert out["labels"] is batch["labels"]
    pixels = drop_modalities({"pixel_values": torch.ones(2, 3, 4, 4), **{k: batch[k][:2] for k in
                                                                           ("input_ids", "attention_mask")}},
                             torch.tensor([NO_IMAGE, 0]), EmptyText(torch.tensor([101, 102])))
    assert torch.all(pixels["pixel_values"][0] == 0) and torch.all(pixels["pixel_values"][1] == 1)


def test_empty_text_is_the_encoders_empty_question() -> None:
    from fusionzoo.encoders import build_text_encoder

    torch.manual_seed(0)
    text = build_text_encoder("tiny")
    text.train()
    frozen = next(m for m in text.modules() if m is not text)
    frozen.eval()  # a part kept in eval mode stays there
    empty = EmptyText.of(text, with_states=True)
    tokens = text.tokenizer([""], return_tensors="pt")
    assert empty.input_ids.tolist() == tokens["input_ids"][0].tolist() and len(empty.input_ids) == 2
    assert text.training and not frozen.training
    text.eval()
    with torch.no_grad():
        expected = text(tokens["input_ids"], tokens["attention_mask"]).states[0]
    torch.testing.assert_close(empty.states, expected)


def test_modality_dropout_config_is_checked() -> None:
    assert load_config(None, ["modality_dropout=0.3"]).modality_dropout == 0.3
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match="key 'modality_dropout' must be a probability in \\[0, 1\\)"):
            load_config(None, [f"modality_dropout={bad}"])
    with pytest.raises(ConfigError, match="key 'modality_dropout': task=captioning reads its text as the target"):
        FinetuneRecipe().check(load_config(None, ["task=captioning", "modality_dropout=0.2"]), None)


# --------------------------------------------------------------------------------------
# A quick bench with --robustness
# --------------------------------------------------------------------------------------
def test_quick_bench_writes_the_robustness_table_and_plot(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["bench", "--suite", "easy-vqa", "--quick", *TINY, "--no-progress", "--mixed-precision", "no",
                 "--fusions", "early_concat,text_only,image_only", "--jobs", "1", "--robustness",
                 "--modality-dropout", "0.3", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    names = [c.name for c in CORRUPTIONS]
    header = "| fusion | clean | " + " | ".join(names) + " | image drop % | text drop % |"
    assert header in printed.split("\nwrote ")[-1]  # in the tables printed at the end
    assert header in (out / "results.md").read_text() and "trained with modality dropout 0.3" in printed
    assert (out / "robustness_easy-vqa.png").stat().st_size > 0
    run = json.loads((out / "run.json").read_text())
    assert run["robustness"] == names and "robustness_easy-vqa.png" in run["files"]
    rows = {r["fusion"]: r for r in json.loads((out / "results.json").read_text())}
    for row in rows.values():
        scores = row["metrics"]["robustness"]
        assert set(scores) == {"clean", *names, "image drop %", "text drop %"}
        assert scores["clean"] == row["metrics"]["accuracy"] and row["config"]["modality_dropout"] == 0.3
    # a reference that never reads a modality scores the same when that modality is corrupted
    text_only, image_only = rows["text_only"]["metrics"]["robustness"], rows["image_only"]["metrics"]["robustness"]
    assert all(text_only[c.name] == text_only["clean"] for c in CORRUPTIONS if c.family == "image")
    assert all(image_only[c.name] == image_only["clean"] for c in CORRUPTIONS if c.family == "text")


def test_bench_refuses_bad_robustness_options(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--modality-dropout", "1", "--out", str(tmp_path)]) == 2
    assert "--modality-dropout must be a probability in [0, 1)" in capsys.readouterr().err
    assert main(["bench", "--suite", "easy-vqa", "--robustness", "--train-encoders", "1", "--out", str(tmp_path)]) == 2
    assert "leave --train-encoders out" in capsys.readouterr().err
