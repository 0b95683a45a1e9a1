"""The bench and ``fusionzoo train`` take one training step: same features, seed and settings, same losses.

A bench row trains over cached features with :func:`fusionzoo.bench.loop.train_model`; ``fusionzoo
train`` with frozen encoders reads the same feature cache through Accelerate. Both take the step of
:mod:`fusionzoo.training.step`. For one epoch (the first epoch's shuffled order is the same in both:
a permutation drawn from a generator seeded with the run's seed) the two give the same loss at every
step, for fusions with and without attention and with dropout on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusionzoo.bench.loop import FeatureView, as_tensor, train_model
from fusionzoo.features.cache import FeatureCache
from fusionzoo.features.extract import image_features, text_features
from fusionzoo.training.config import load_config
from fusionzoo.training.loop import make_accelerator
from fusionzoo.training.trainer import FinetuneRecipe, train

from fixtures import train_log, write_vqa_jsonl

BATCH, SAMPLES = 8, 28  # 4 steps, the last one a partial batch of 4


def _config(data: Path, out: Path, cache: Path, fusion: str):
    fusion_kwargs = json.dumps({"dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.1})
    return load_config(None, [
        "task=vqa", "data=vqa-jsonl", f"data_dir={data}", f"fusion={fusion}", f"fusion_kwargs={fusion_kwargs}",
        "vision=tiny", "text=tiny", "freeze_encoders=true", "feature_cache=true", f"cache_dir={cache}",
        "max_text_len=12", "epochs=1", f"batch_size={BATCH}", "lr=3e-3", "weight_decay=0.01", "warmup_ratio=0.3",
        "max_grad_norm=1.0", "mixed_precision=no", "seed=5", "log_with=none", "log_every=1",
        "max_eval_samples=0", f"output_dir={out}"])


@pytest.mark.parametrize("fusion", ["merged_transformer", "early_concat"])
def test_a_bench_row_and_fusionzoo_train_log_the_same_losses(tmp_path: Path, fusion: str) -> None:
    data = write_vqa_jsonl(tmp_path / "data", {"train": SAMPLES, "val": 4})
    config = _config(data, tmp_path / "run", tmp_path / "cache", fusion)
    train(config)
    logged = train_log(tmp_path / "run")
    trained = [logged[step]["train/loss"] for step in sorted(logged)]
    assert len(trained) == 4

    # The bench side: the model fusionzoo train builds (same seed, same data), then the cache's features.
    recipe, accelerator = FinetuneRecipe(), make_accelerator(config, with_trackers=False)
    recipe.check(config, accelerator)
    model = recipe.build_model(config, accelerator)
    rows = recipe.data["train"]
    paths = sorted(set(rows["image_path"]))
    questions = sorted(set(rows["question"]))
    cache = FeatureCache(tmp_path / "cache")
    images = image_features(cache, model.vision, paths, model.vision.data_config, progress=False)
    texts = text_features(cache, model.text, questions, max_length=config.max_text_len, progress=False)
    assert images.hit and texts.hit  # what the training run extracted
    labels = torch.zeros(len(rows), len(recipe.data.answers))  # (S, A) soft scores
    for i, (ids, scores) in enumerate(zip(rows["target_ids"], rows["target_scores"])):
        labels[i, ids] = torch.tensor(scores)
    view = FeatureView(
        image_tokens=as_tensor(images["tokens"]),
        image_rows=torch.tensor([paths.index(p) for p in rows["image_path"]]),
        text_states=as_tensor(texts["states"]), text_ids=as_tensor(texts["input_ids"]),
        text_mask=as_tensor(texts["mask"]).bool(),
        text_rows=torch.tensor([questions.index(q) for q in rows["question"]]), labels=labels)
    stats = train_model(model, view, epochs=1, batch_size=BATCH, lr=config.lr, weight_decay=config.weight_decay,
                        warmup_ratio=config.warmup_ratio, precision="no", device=torch.device("cpu"), seed=config.seed,
                        progress=False, max_grad_norm=config.max_grad_norm)
    assert stats.losses == pytest.approx(trained, rel=1e-5)
    assert len(set(round(x, 6) for x in trained)) == 4  # the model learns: no two steps alike
