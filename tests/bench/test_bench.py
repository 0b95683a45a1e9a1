"""``fusionzoo bench``: the feature cache and its key, the references, and ``--quick`` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionzoo.features.cache import FeatureCache
from fusionzoo.features.keys import cache_key, fingerprint_files, fingerprint_module, fingerprint_texts
from fusionzoo.bench.baselines import ImageOnlyReference, TextOnlyReference
from fusionzoo.bench import settings as bench_settings
from fusionzoo.bench.config import resolve_jobs
from fusionzoo.bench.features import image_preprocessing, pool_image_tokens
from fusionzoo.bench.suites import BenchError, easy_vqa_question_type, question_prefix, vqa_answer_type
from fusionzoo.bench.workers import row_devices
from fusionzoo.cli import main
from fusionzoo.encoders import build_vision_encoder
from fusionzoo.layers import KVCache

RESULT_KEYS = {"task", "fusion", "metrics", "params_trainable", "params_total", "train_seconds",
               "eval_samples_per_second", "peak_memory_mb", "seeds", "config"}


# --------------------------------------------------------------------------------------
# Cache keys and entries
# --------------------------------------------------------------------------------------
def test_cache_key_changes_with_weights_preprocessing_and_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vision = build_vision_encoder("tiny", pretrained=False)
    images = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"not decoded by the key" * (i + 1))
        images.append(str(path))
    weights = fingerprint_module(vision)
    config = image_preprocessing(vision, 32)
    inputs = fingerprint_files(images)
    key = cache_key({"weights": weights, "spec": vision.spec}, config, inputs)

    assert key == cache_key({"weights": fingerprint_module(vision), "spec": vision.spec},
                            image_preprocessing(vision, 32), fingerprint_files(images))  # deterministic
    # preprocessing: size, normalisation, crop
    assert key != cache_key({"weights": weights, "spec": vision.spec}, image_preprocessing(vision, 48), inputs)
    assert key != cache_key({"weights": weights, "spec": vision.spec}, {**config, "mean": (0.4, 0.5, 0.5)}, inputs)
    assert key != cache_key({"weights": weights, "spec": vision.spec}, image_preprocessing(vision, 32, crop=True),
                            inputs)
    # encoder: one weight changed, or another architecture
    with torch.no_grad():
        next(vision.parameters()).view(-1)[0] += 1e-3
    assert fingerprint_module(vision) != weights
    assert key != cache_key({"weights": fingerprint_module(vision), "spec": vision.spec}, config, inputs)
    assert key != cache_key({"weights": weights, "spec": {"preset": "other"}}, config, inputs)
    # inputs: another file list, a file rewritten
    assert key != cache_key({"weights": weights, "spec": vision.spec}, config, fingerprint_files(images[:1]))
    Path(images[0]).write_bytes(b"changed content, changed size")
    assert fingerprint_files(images) != inputs
    assert fingerprint_texts(["ab", "c"]) != fingerprint_texts(["a", "bc"])
    # the same files spelt another way (relative, with "..") are the same inputs
    relative = [os.path.relpath(p) for p in images]
    spelt = [str(Path(p).parent / ".." / Path(p).parent.name / Path(p).name) for p in images]
    assert fingerprint_files(relative) == fingerprint_files(spelt) == fingerprint_files(images)


def test_feature_cache_builds_once_then_memory_maps(tmp_path: Path) -> None:
    calls = []

    def build(write):
        calls.append(1)
        write("tokens", np.arange(24, dtype=np.float16).reshape(2, 3, 4))
        return {"images": 2}

    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_build("image-test", "a" * 40, build, {"what": "test"})
    second = FeatureCache(tmp_path / "cache").get_or_build("image-test", "a" * 40, build, {"what": "test"})
    assert len(calls) == 1 and not first.hit and second.hit
    assert isinstance(second["tokens"], np.memmap) and second["tokens"].dtype == np.float16
    np.testing.assert_array_equal(second["tokens"], first["tokens"])
    assert (cache.hits, cache.misses) == (0, 1)

    other = cache.get_or_build("image-test", "b" * 40, build, {"what": "test"})  # another key: rebuilt
    assert len(calls) == 2 and not other.hit
    (first.path / "meta.json").unlink()  # an incomplete entry is never read
    FeatureCache(tmp_path / "cache").get_or_build("image-test", "a" * 40, build, {"what": "test"})
    assert len(calls) == 3

    off = FeatureCache(tmp_path / "off", enabled=False)
    off.get_or_build("image-test", "a" * 40, build, {"what": "test"})
    assert not (tmp_path / "off").exists() and off.misses == 1


# --------------------------------------------------------------------------------------
# References and question types
# --------------------------------------------------------------------------------------
def test_references_read_one_modality_only() -> None:
    torch.manual_seed(0)
    text, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    image = torch.randn(2, 3, 6)
    text_only, image_only = TextOnlyReference(8, 6, dim=4).eval(), ImageOnlyReference(8, 6, dim=4).eval()
    assert torch.equal(text_only(text, mask, image).pooled, text_only(text, mask, image + 1).pooled)
    assert torch.equal(image_only(text, mask, image).pooled, image_only(text + 1, mask, image).pooled)
    # causal decoding with a cache gives the full pass's states, position by position
    for module in (text_only, image_only):
        full = module(text, mask, image, causal=True)
        cache = KVCache()
        steps = [module(text[:, t: t + 1], mask[:, : t + 1], image, causal=True, cache=cache).text_tokens
                 for t in range(5)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full.text_tokens)


def test_question_types() -> None:
    assert easy_vqa_question_type("what shape is in the image?") == "what shape"
    assert easy_vqa_question_type("what is the teal shape?") == "what shape"
    assert easy_vqa_question_type("what is the color of the circle?") == "what color"
    assert easy_vqa_question_type("is there a blue shape in the image?") == "yes/no color"
    assert easy_vqa_question_type("is no triangle present?") == "yes/no shape, negated"
    assert easy_vqa_question_type("does the image not contain a red shape?") == "yes/no color, negated"
    assert vqa_answer_type("Yes") == "yes/no" and vqa_answer_type("two") == "number"
    assert question_prefix("Is this a cat?") == "is this"


def test_question_prior_scores_the_train_answer_of_the_same_question() -> None:
    from fusionzoo.tasks.scoring import question_prior
    from fusionzoo.bench.suites import BenchTask, SplitData

    vocab = ["no", "yes"]
    onehot = lambda answers: torch.tensor([[float(a == v) for v in vocab] for a in answers])  # noqa: E731
    train_q = ["Is this a cat?", "is this a  cat?", "Is this a cat?", "Is it red?", "Is it big?"]
    train_a = ["yes", "yes", "no", "no", "yes"]
    test_q = ["is this a cat?", "Is it red?", "Is it big?", "Is it new?"]  # the last is never asked in train
    test_a = ["no", "yes", "yes", "yes"]
    split = lambda q, a: SplitData(image_paths=[f"{i}.png" for i in range(len(q))], texts=q,  # noqa: E731
                                   labels=onehot(a), answers=[[x] for x in a])
    task = BenchTask(name="t", task="vqa", metric="accuracy", vocabulary=vocab, train=split(train_q, train_a),
                     test=split(test_q, test_a))
    prior = question_prior(task)
    # cat: train says yes (2 of 3), test no -> wrong; red: train no, test yes -> wrong; big: yes, yes -> right.
    assert prior == {"test_questions": 4, "seen_in_train": 3, "train_answer_accuracy": pytest.approx(100 / 3)}
    captioning = BenchTask(name="c", task="captioning", metric="CIDEr", vocabulary=None,
                           train=split(train_q, train_a), test=split(test_q, test_a))
    assert question_prior(captioning) is None


# --------------------------------------------------------------------------------------
# The command, end to end
# --------------------------------------------------------------------------------------
def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_bench_quick_easy_vqa_writes_report_and_reuses_cache(tmp_path: Path, capsys) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["bench", "--suite", "easy-vqa", "--quick", "--no-progress", "--out", str(out), "--cache-dir", str(cache)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "2 misses" in first and "easy-vqa (accuracy" in first  # extracted; one summary line per task
    tail = first.split("\nwrote ")[-1]  # the results table comes last, on lines of its own
    assert "\n## easy-vqa: test accuracy" in tail and "\n| fusion | accuracy |" in tail

    rows = _rows(out)
    assert len(rows) == 8 and all(set(row) == RESULT_KEYS for row in rows)
    assert [r["fusion"] for r in rows[-2:]] == ["text_only", "image_only"]
    assert [r["config"]["reference"] for r in rows] == [False] * 6 + [True] * 2
    for row in rows:
        assert 0 <= row["metrics"]["accuracy"] <= 100 and row["seeds"] == [0]
        assert row["params_trainable"] < row["params_total"] and row["eval_samples_per_second"] > 0
        assert len(row["metrics"]["per_question_type"]) == 6
    for name in ("results.md", "run.json", "score_easy-vqa.png", "per_type_easy-vqa.png", "score_vs_params.png",
                 "score_vs_throughput.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    markdown = (out / "results.md").read_text()
    assert "| fusion | accuracy |" in markdown and "text_only (reference)" in markdown
    assert "epochs x batch, lr, dim" in markdown  # the fusions train on their own schedules
    run = json.loads((out / "run.json").read_text())
    assert run["cache"]["misses"] == 2
    prior = run["question_prior"]["easy-vqa"]  # templated questions: the test split's are asked in train too
    assert 0 < prior["seen_in_train"] <= prior["test_questions"] and "question prior: " in markdown

    # A second run (other fusions, two seeds) finds every feature in the cache.
    # (the first run trained two rows at a time in worker processes, this one in-process)
    assert {r["config"]["jobs"] for r in rows} == {2}
    again = tmp_path / "again"
    assert main([*args[:-4], "--out", str(again), "--cache-dir", str(cache), "--fusions", "late_voting,text_only",
                 "--seeds", "0", "1", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "extraction skipped" in printed and "mean ± sd over 2 seeds" in printed
    assert "_std" not in (again / "results.md").read_text()
    run = json.loads((again / "run.json").read_text())
    assert (run["cache"]["hits"], run["cache"]["misses"]) == (2, 0)
    rows = _rows(again)
    assert [r["fusion"] for r in rows] == ["late_voting", "text_only"]
    assert rows[0]["seeds"] == [0, 1] and "accuracy_std" in rows[0]["metrics"]
    assert rows[0]["config"]["jobs"] == 1


@pytest.mark.slow
def test_bench_quick_coco(tmp_path: Path, coco_mini: Path, capsys) -> None:
    out = tmp_path / "out"
    fusions = "early_concat,late_voting,text_only"
    assert main(["bench", "--suite", "coco", "--data-dir", str(coco_mini), "--quick", "--no-progress",
                 "--tasks", "coco-yesno,coco-captioning,coco-match",  # retrieval: test_bench_retrieval.py
                 "--max-train", "60", "--max-test", "20",  # images: the rows, not the subset size, are tested
                 "--vision", "tiny", "--text", "tiny",  # the rows and the report are tested, not the encoders
                 "--fusions", fusions, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert [(r["task"], r["fusion"]) for r in rows] == [
        (task, fusion) for task in ("coco-yesno", "coco-captioning", "coco-match") for fusion in fusions.split(",")]
    assert all(set(row) == RESULT_KEYS for row in rows)
    for row in rows:
        assert row["task"] in printed
        if row["task"] == "coco-captioning":
            assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(row["metrics"])
    assert (out / "captions.json").is_file() and (out / "score_coco-captioning.png").is_file()


def test_bench_rejects_bad_options(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--fusions", "no_such_fusion", "--out", str(tmp_path)]) == 2
    assert "unknown fusion(s) 'no_such_fusion'" in capsys.readouterr().err
    assert main(["bench", "--suite", "coco", "--out", str(tmp_path)]) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert main(["bench", "--tasks", "coco-match", "--out", str(tmp_path)]) == 2
    assert "has no task(s) 'coco-match'" in capsys.readouterr().err
    assert main(["bench", "--image-grid", "-1", "--out", str(tmp_path)]) == 2
    assert "--image-grid must be >= 0" in capsys.readouterr().err
    assert main(["bench", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Token pooling, per-row settings, workers
# --------------------------------------------------------------------------------------
def test_pool_image_tokens_averages_grid_regions() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 5).half()  # 3 images, a 4x4 grid, 5 channels
    pooled = pool_image_tokens(tokens.numpy(), 2)
    assert pooled.shape == (3, 4, 5) and pooled.dtype == torch.float16
    grid = tokens.float().view(3, 4, 4, 5)  # (U, row, col, D), row-major as the vision encoder flattens
    for r in range(2):
        for c in range(2):
            expected = grid[:, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2].mean(dim=(1, 2))  # (U, D)
            torch.testing.assert_close(pooled[:, 2 * r + c].float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(pool_image_tokens(tokens, 1)[:, 0].float(), tokens.float().mean(dim=1),
                               atol=2e-3, rtol=2e-3)  # grid 1: the global average pool
    assert pool_image_tokens(tokens, None) is tokens and pool_image_tokens(tokens, 0) is tokens
    assert pool_image_tokens(tokens, 4) is tokens  # not smaller than the grid: unchanged
    with pytest.raises(BenchError, match="not a square grid"):
        pool_image_tokens(torch.zeros(1, 17, 4), 2)  # e.g. a ViT's [CLS] + 4x4 patches


def test_row_settings_and_fusion_kwargs_precedence(monkeypatch) -> None:
    monkeypatch.setitem(bench_settings.TASK_SETTINGS, "t", bench_settings.TrainSettings(epochs=4, batch_size=32, lr=1e-3))
    monkeypatch.setitem(bench_settings.FUSION_SETTINGS, "t", {"albef": {"epochs": 6, "lr": 2e-3}})
    assert bench_settings.settings_for("t", "early_concat") == bench_settings.TASK_SETTINGS["t"]
    albef = bench_settings.settings_for("t", "albef")
    assert (albef.epochs, albef.batch_size, albef.lr) == (6, 32, 2e-3)
    assert bench_settings.settings_for("t", "albef", epochs=0.5).epochs == 0.5  # --epochs wins
    assert bench_settings.settings_for("t", "albef", quick=True).epochs == bench_settings.QUICK_EPOCHS

    monkeypatch.setattr(bench_settings, "COMMON_FUSION_KWARGS", {"dim": 128, "num_layers": 1})
    monkeypatch.setitem(bench_settings.TASK_FUSION_KWARGS, "t", {"*": {"dim": 64}, "albef": {"num_layers": 2}})
    monkeypatch.setitem(bench_settings.FUSION_KWARGS, "albef", {"dim": 32})
    assert bench_settings.fusion_kwargs_for("early_concat", "t") == {"dim": 64, "num_layers": 1}
    assert bench_settings.fusion_kwargs_for("albef", "t") == {"dim": 32, "num_layers": 2}
    assert bench_settings.fusion_kwargs_for("early_concat", "other") == {"dim": 128, "num_layers": 1}


def test_sort_of_clevr_albef_row_trains_without_its_itc_loss() -> None:
    # Sort-of-CLEVR's questions cannot pick out their scene, so its ALBEF row drops the ITC term;
    # the other suites keep ALBEF's default weight.
    from fusionzoo.fusions.albef import AlbefFusion

    kwargs = bench_settings.fusion_kwargs_for("albef", "sort-of-clevr")
    assert kwargs["itc_weight"] == 0.0
    fusion = AlbefFusion(text_dim=8, image_dim=6, **{**kwargs, "dim": 16})
    text, image = torch.randn(3, 4, 8), torch.randn(3, 5, 6)
    assert fusion.aux_loss(fusion(text, torch.ones(3, 4, dtype=torch.bool), image)) == {}
    easy = AlbefFusion(text_dim=8, image_dim=6, **{**bench_settings.fusion_kwargs_for("albef", "easy-vqa"), "dim": 16})
    assert set(easy.aux_loss(easy(text, torch.ones(3, 4, dtype=torch.bool), image))) == {"itc"}
    # and so, where auto picks bf16, the Sort-of-CLEVR ALBEF row trains in bf16, easy-VQA's in float32
    assert bench_settings.row_precision("albef", "bf16", True, kwargs) == "bf16"
    assert bench_settings.row_precision("albef", "bf16", True, bench_settings.fusion_kwargs_for("albef", "easy-vqa")) == "no"


def test_resolve_jobs() -> None:
    cpu = torch.device("cpu")
    assert resolve_jobs(3, cpu, rows=2) == 2  # never more workers than rows
    assert 1 <= resolve_jobs(None, cpu, rows=8) <= 2
    with pytest.raises(BenchError, match="--jobs must be >= 1"):
        resolve_jobs(0, cpu, rows=8)
    # CUDA: one row at a time per GPU, every GPU of --device cuda by default, one for cuda:N
    cuda, cuda1 = torch.device("cuda"), torch.device("cuda", 1)
    assert resolve_jobs(None, cuda, rows=8, gpus=4) == 4
    assert resolve_jobs(None, cuda, rows=3, gpus=4) == 3
    assert resolve_jobs(2, cuda, rows=8, gpus=4) == 2
    assert resolve_jobs(None, cuda1, rows=8, gpus=4) == 1
    with pytest.raises(BenchError, match="needs a GPU of its own, and --device cuda gives 2"):
        resolve_jobs(3, cuda, rows=8, gpus=2)
    with pytest.raises(BenchError, match="--device cuda uses every GPU"):
        resolve_jobs(2, cuda1, rows=8, gpus=4)
    assert row_devices(cuda, 3) == [torch.device("cuda", i) for i in range(3)]
    assert row_devices(cuda1, 1) == [cuda1] and row_devices(cpu, 2) == [cpu, cpu]
