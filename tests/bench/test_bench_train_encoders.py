"""``fusionzoo bench --train-encoders N``: the encoders' last blocks trained per row on cached tail inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fusionzoo.bench import row as bench_row, runner, workers
from fusionzoo.features.cache import FeatureCache
from fusionzoo.features.keys import fingerprint_module
from fusionzoo.bench.row import build_bench_model
from fusionzoo.bench.run_features import extract_features
from fusionzoo.bench.settings import fusion_kwargs_for
from fusionzoo.bench.suites import SUITES, load_tasks
from fusionzoo.bench.tails import EncoderTailsModel, with_encoder_tails
from fusionzoo.cli import main
from fusionzoo.encoders import build_text_encoder, build_vision_encoder

CPU = torch.device("cpu")
RUN = ["bench", "--suite", "easy-vqa", "--quick", "--vision", "tiny", "--text", "tiny", "--image-grid", "0",
       "--fusions", "early_concat,text_only", "--epochs", "1", "--no-progress", "--jobs", "1"]
#: Rows of a batch checked against the frozen encoders' features.
CHECKED = torch.arange(8)
#: Both sides are computed from float16 arrays (tail inputs / final features): their rounding, no more.
FLOAT16 = dict(atol=5e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def easy_vqa_tasks() -> list:
    return load_tasks(SUITES["easy-vqa"], ["easy-vqa"], None, quick=True)


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch, easy_vqa_tasks: list) -> list:
    """``run_bench`` given the module's one load of the quick easy-VQA tasks (loading takes seconds)."""
    def load(suite, names, data_dir, quick, **kwargs):
        assert (suite.name, list(names), quick, kwargs.get("eval_split")) == ("easy-vqa", ["easy-vqa"], True, "test")
        return easy_vqa_tasks

    monkeypatch.setattr(runner, "load_tasks", load)
    return easy_vqa_tasks


def _rows(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "results.json").read_text())


def _tail_weights(model: EncoderTailsModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith(model.ENCODER_PREFIXES)}


def test_train_encoders_run_trains_a_copy_of_the_tails_per_row(tmp_path: Path, loaded: list, monkeypatch,
                                                               capsys) -> None:
    seen: dict[str, Any] = {"models": []}
    real_run_row, real_train = workers.run_row, bench_row.train_model

    def run_row(task, fusion, settings, features, encoders, *args):
        if "encoders" not in seen:  # the run's shared objects, before any row trains
            seen.update(encoders=encoders, features=features, task=task,
                        fingerprints={k: fingerprint_module(encoders[k]) for k in ("vision", "text")})
        return real_run_row(task, fusion, settings, features, encoders, *args)

    def train_model(model, view, **kwargs):
        assert isinstance(model, EncoderTailsModel) and view.image_input == "image_tail_inputs"
        batch = view.batch(CHECKED, CPU)
        model.eval()
        with torch.no_grad():  # the untrained tails' states, for the independent check below
            states = (model.image_states(batch["image_tail_inputs"]),
                      model.text_states(batch["text_tail_inputs"], batch["attention_mask"]))
        before = _tail_weights(model)
        stats = real_train(model, view, **kwargs)
        seen["models"].append((model, before, states))
        return stats

    monkeypatch.setattr(workers, "run_row", run_row)
    monkeypatch.setattr(bench_row, "train_model", train_model)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main([*RUN, "--train-encoders", "1", "--out", str(out), "--cache-dir", str(cache)]) == 0
    rows = _rows(out)
    assert [r["fusion"] for r in rows] == ["early_concat", "text_only"]
    assert all(r["config"]["train_encoders"] == 1 and not r["config"]["frozen_encoders"] for r in rows)
    assert "- encoders (last 1 block trained): tiny at 128 px" in (out / "results.md").read_text()
    assert json.loads((out / "run.json").read_text())["config"]["train_encoders"] == 1
    names = sorted(path.name for path in cache.iterdir())  # tail inputs, under names and keys of their own
    assert len(names) == 2 and all("-tail1-inputs-" in name for name in names)

    # Every row trained its own copies: they moved, the run's encoders did not.
    encoders = seen["encoders"]
    assert len(seen["models"]) == 2
    for model, before, _ in seen["models"]:
        after = _tail_weights(model)
        assert sorted(after) == sorted(before) and any(not torch.equal(before[k], after[k]) for k in after)
        shared = {id(p) for k in ("vision", "text") for p in encoders[k].parameters()}
        own = {id(p) for tail in (model.vision_tail, model.text_tail) for p in tail.parameters()}
        assert own and not own & shared and all(p.requires_grad for name, p in model.named_parameters()
                                                if name.startswith(model.ENCODER_PREFIXES))
    assert seen["models"][0][0].vision_tail is not seen["models"][1][0].vision_tail
    assert {k: fingerprint_module(encoders[k]) for k in ("vision", "text")} == seen["fingerprints"]

    # The tails' weights are the only extra trainable parameters; the totals are a frozen run's.
    tails = sum(p.numel() for k in ("vision_tail", "text_tail") for p in encoders[k].parameters())
    vit_block = sum(p.numel() for p in encoders["vision"].model.blocks[-1].parameters())
    vit_norm = sum(p.numel() for p in encoders["vision"].model.norm.parameters())
    bert_layer = sum(p.numel() for p in encoders["text"].model.encoder.layer[-1].parameters())
    assert tails == vit_block + vit_norm + bert_layer
    monkeypatch.setattr(workers, "run_row", real_run_row)
    monkeypatch.setattr(bench_row, "train_model", real_train)
    frozen_out = tmp_path / "frozen"  # one step per row is enough: training does not change parameter counts
    frozen_run = [*RUN[: RUN.index("--epochs")], "--epochs", "0.01", *RUN[RUN.index("--epochs") + 2:]]
    assert main([*frozen_run, "--out", str(frozen_out), "--cache-dir", str(cache)]) == 0
    frozen_rows = _rows(frozen_out)
    assert "- encoders (frozen): tiny" in (frozen_out / "results.md").read_text()
    for row, frozen in zip(rows, frozen_rows, strict=True):
        assert row["fusion"] == frozen["fusion"] and frozen["config"]["train_encoders"] == 0
        assert row["params_trainable"] == frozen["params_trainable"] + tails
        assert row["params_total"] == frozen["params_total"]

    # Independent check of the forward: before training, the tails gave the frozen encoders' features.
    task = seen["task"]
    features, _ = extract_features([task], encoders["vision"], encoders["text"], None, FeatureCache(cache), 128,
                                   CPU, False, image_grid=0)
    expected = features.view(task.train, False).batch(CHECKED, CPU)
    for model, _, (image, text) in seen["models"]:
        torch.testing.assert_close(image, expected["image_states"], **FLOAT16)
        torch.testing.assert_close(text, expected["text_states"], **FLOAT16)


def test_train_encoders_lora_trains_adapters_on_the_tails_only(tmp_path: Path, loaded: list, monkeypatch) -> None:
    seen: list[tuple[EncoderTailsModel, dict[str, torch.Tensor]]] = []
    real_train = bench_row.train_model

    def train_model(model, view, **kwargs):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        stats = real_train(model, view, **kwargs)
        seen.append((model, before))
        return stats

    monkeypatch.setattr(bench_row, "train_model", train_model)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = [*RUN[: RUN.index("--fusions")], "--fusions", "early_concat", *RUN[RUN.index("--fusions") + 2:]]
    assert main([*run, "--train-encoders", "lora:1", "--lora-r", "2", "--out", str(out), "--cache-dir", str(cache)]) == 0
    (row,) = _rows(out)
    assert row["config"]["train_encoders"] == 1 and row["config"]["encoder_lora"] == 2
    assert "- encoders (last 1 block through LoRA adapters of rank 2): tiny" in (out / "results.md").read_text()
    (model, before), = seen
    adapters, base = {}, {}
    for name, p in model.named_parameters():
        if name.startswith(model.ENCODER_PREFIXES):
            (adapters if ".lora_" in name else base)[name] = p
    # one A (r x in) and one B (out x r) per Linear of the tails (the tiny ViT block's qkv, proj, fc1, fc2, and
    # the BERT layer's six projections), counted from the tails themselves
    linears = [m for tail in (model.vision_tail, model.text_tail) for m in tail.modules()
               if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear)]
    assert len(linears) == 4 + 6
    assert sum(p.numel() for p in adapters.values()) == sum(2 * (m.base_layer.in_features + m.base_layer.out_features)
                                                            for m in linears)
    assert all(p.requires_grad for p in adapters.values()) and not any(p.requires_grad for p in base.values())
    assert all(torch.equal(p, before[name]) for name, p in base.items())  # the blocks' own weights did not move
    assert any(not torch.equal(p, before[name]) for name, p in adapters.items() if "lora_B" in name)
    model.train()  # the tails' own dropout (BERT's) stays off in training; lora dropout 0 is an Identity
    dropouts = [m for tail in (model.vision_tail, model.text_tail) for m in tail.modules()
                if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)


@pytest.mark.slow
def test_pooled_tail_tokens_are_the_frozen_encoders_features(tmp_path: Path, easy_vqa_tasks: list) -> None:
    """EfficientNet-Lite0's last two blocks: tail inputs -> tails -> 2x2 grid + position channels = frozen features."""
    task = easy_vqa_tasks[0]
    task = replace(task, train=task.train.subset(range(12)), test=task.test.subset(range(4)))
    vision, text = build_vision_encoder("efficientnet-lite0"), build_text_encoder("tiny")
    vision.freeze()
    text.freeze()
    cache = FeatureCache(tmp_path / "cache")
    kwargs = dict(image_grid=2, image_positions=2)
    frozen, _ = extract_features([task], vision, text, None, cache, 128, CPU, False, **kwargs)
    tails, info = extract_features([task], vision, text, None, cache, 128, CPU, False, train_encoders=2, **kwargs)
    assert info["tail_inputs"]["image"][0] == vision.model.blocks[-1][0].conv_pw.in_channels  # a (C, h, w) map
    assert frozen.image_tokens.shape == tails.image_tokens.shape == (len(tails.image_row), 4, 1280 + 8)
    stats, frozen_stats = tails.stats(task.train, False), frozen.stats(task.train, False)
    for name in stats:  # the standardisation comes from the untrained tails' outputs: the frozen statistics
        torch.testing.assert_close(stats[name], frozen_stats[name], atol=5e-3, rtol=5e-3)

    torch.manual_seed(0)
    inner = build_bench_model(task, "early_concat", vision, text, fusion_kwargs_for("early_concat", task.name), 32,
                              stats, image_dim=tails.image_dim)
    model = with_encoder_tails(inner, vision.tail(2), text.tail(2), 2, 2).eval()
    batch = tails.view(task.train, False).batch(CHECKED, CPU)
    expected = frozen.view(task.train, False).batch(CHECKED, CPU)
    with torch.no_grad():
        image = model.image_states(batch["image_tail_inputs"])
        text_states = model.text_states(batch["text_tail_inputs"], batch["attention_mask"])
        torch.testing.assert_close(image, expected["image_states"], **FLOAT16)
        torch.testing.assert_close(text_states, expected["text_states"], **FLOAT16)
        torch.testing.assert_close(model(**batch).logits, inner(**expected).logits, **FLOAT16)
    # train mode keeps the image tail's BatchNorm statistics
    model.train()
    assert model.vision_tail.training and not any(
        m.training for m in model.vision_tail.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_train_encoders_errors_come_before_any_data_is_read(tmp_path: Path, monkeypatch, capsys) -> None:
    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(runner, "load_tasks", no_data)
    out = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    tiny = ["--vision", "tiny", "--text", "tiny", "--no-progress", *out]

    def error(*args: str) -> str:
        assert main(["bench", *args, *tiny]) == 2
        return capsys.readouterr().err

    assert "the 'sort-of-clevr' suite feeds the fusions stage 2" in error("--suite", "sort-of-clevr",
                                                                          "--train-encoders", "1")
    coco = ["--suite", "coco", "--data-dir", str(tmp_path), "--train-encoders", "1"]
    message = error(*coco)  # every coco task: captioning and retrieval are refused
    assert "VQA and classification tasks only" in message
    assert "coco-captioning (captioning), coco-retrieval (retrieval)" in message
    assert "coco-captioning (captioning); leave them out" in error(*coco, "--tasks", "coco-match,coco-captioning")
    assert "coco-retrieval (retrieval)" in error(*coco, "--tasks", "coco-retrieval")
    assert "--text tiny has only 2 blocks (choose 1..2)" in error("--suite", "easy-vqa", "--train-encoders", "3")
    assert "--vision tiny has only 6 blocks" in error("--suite", "easy-vqa", "--train-encoders", "7")
    assert "number of last blocks >= 0, got -1" in error("--suite", "easy-vqa", "--train-encoders", "-1")
    assert "or lora:N" in error("--suite", "easy-vqa", "--train-encoders", "lora:x")
    assert "N >= 1 blocks" in error("--suite", "easy-vqa", "--train-encoders", "lora:0")
    assert "--lora-r takes a rank >= 1" in error("--suite", "easy-vqa", "--train-encoders", "lora:1", "--lora-r", "0")
    assert main(["bench", "--suite", "easy-vqa", "--vision", "test_resnet", "--vision-weights", "random",
                 "--text", "tiny", "--train-encoders", "1", *out]) == 2
    assert "--train-encoders with --vision test_resnet" in capsys.readouterr().err
