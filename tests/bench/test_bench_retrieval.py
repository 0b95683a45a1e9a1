"""``fusionzoo bench``'s ``coco-retrieval`` task: the dual-encoder row, fusion rows reranking, the report's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionzoo.bench import settings as bench_settings
from fusionzoo.bench.retrieval import ITC_ROW, StandardizedAlignment, row_names
from fusionzoo.bench.standardize import StandardizedAligningFusion
from fusionzoo.cli import main
from fusionzoo.registry import FUSIONS
from fusionzoo.tasks.retrieval_eval import load_scores, recall_at_k, score_retrieval

RESULT_KEYS = {"task", "fusion", "metrics", "params_trainable", "params_total", "train_seconds",
               "eval_samples_per_second", "peak_memory_mb", "seeds", "config"}
RECALLS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
COLORS = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange")
SHAPES = ("square", "circle", "stripe")


def _tiny_karpathy(root: Path, train: int = 18, val: int = 3, test: int = 9) -> Path:
    """A Karpathy-schema split file with drawn images (a coloured shape on grey) and three captions each."""
    from PIL import Image, ImageDraw

    folder = root / "images" / "tiny"
    folder.mkdir(parents=True)
    images, sentid = [], 0
    for i in range(train + val + test):
        color, shape = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        picture = Image.new("RGB", (64, 64), (128, 128, 128))
        draw = ImageDraw.Draw(picture)
        box = (8 + i % 5, 8 + i % 7, 56 - i % 3, 56 - i % 4)
        getattr(draw, {"square": "rectangle", "circle": "ellipse", "stripe": "rectangle"}[shape])(
            box if shape != "stripe" else (0, 24, 64, 40), fill=color)
        picture.save(folder / f"{i:03d}.png")
        raws = [f"a {color} {shape} on a grey background", f"the {shape} is {color}",
                f"picture number {i} shows a {color} {shape}"]
        sentences = [{"raw": raw, "sentid": sentid + k} for k, raw in enumerate(raws)]
        sentid += len(raws)
        split = "train" if i < train else "val" if i < train + val else "test"
        images.append({"filepath": "tiny", "filename": f"{i:03d}.png", "split": split, "cocoid": 1000 + i,
                       "sentences": sentences})
    (root / "annotations").mkdir()
    path = root / "annotations" / "karpathy_tiny.json"
    path.write_text(json.dumps({"images": images, "dataset": "tiny"}))
    return path


def test_row_names_put_the_dual_encoder_last_and_drop_one_modality_references() -> None:
    assert row_names(["early_concat", "text_only", "albef", "image_only"]) == ["early_concat", "albef", ITC_ROW]
    assert row_names(["text_only"]) == [ITC_ROW]


def test_standardized_alignment_and_aligning_fusion_embed_standardized_inputs() -> None:
    torch.manual_seed(0)
    text, mask, image = torch.randn(3, 5, 8) * 4 + 2, torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 4, 6) + 1
    mask[0, 3:] = False
    stats = {"text_mean": torch.full((8,), 2.0), "text_std": torch.full((8,), 4.0),
             "image_mean": torch.ones(6), "image_std": torch.ones(6)}
    align = StandardizedAlignment(8, 6, embed_dim=4, **stats)
    plain = StandardizedAlignment(8, 6, embed_dim=4)
    plain.load_state_dict({k: v for k, v in align.state_dict().items() if not k.endswith(("_shift", "_scale"))},
                          strict=False)
    scale = lambda x, m, s: (x - m) / (s + 0.01)  # noqa: E731
    torch.testing.assert_close(align.embed_texts(text, mask), plain.embed_texts(scale(text, 2.0, 4.0), mask))
    torch.testing.assert_close(align.embed_images(image), plain.embed_images(scale(image, 1.0, 1.0)))
    # albef through the wrapper: the gallery embeddings are the aux of its forward pass
    albef = StandardizedAligningFusion(FUSIONS.get("albef")(8, 6, dim=16, num_layers=1, dropout=0.0), **stats).eval()
    aux = albef(text, mask, image).aux
    torch.testing.assert_close(albef.embed_texts(text, mask), aux["text_embed"])
    torch.testing.assert_close(albef.embed_images(image), aux["image_embed"])
    assert albef.aligns and float(albef.itc_temperature().detach()) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="does not align"):
        StandardizedAligningFusion(FUSIONS.get("early_concat")(8, 6, dim=16))


def test_retrieval_settings_are_the_tasks_and_the_dual_encoder_trains_itc_alone() -> None:
    settings = bench_settings.settings_for("coco-retrieval", "early_concat")
    assert isinstance(settings, bench_settings.RetrievalSettings) and settings.itm_weight > 0 and settings.rerank_k == 16
    assert bench_settings.settings_for("coco-retrieval", ITC_ROW).itm_weight == 0
    assert bench_settings.settings_for("coco-retrieval", ITC_ROW, quick=True).epochs <= bench_settings.QUICK_EPOCHS


@pytest.mark.slow
def test_bench_quick_retrieval(tmp_path: Path, capsys) -> None:
    annotations = _tiny_karpathy(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["bench", "--suite", "coco", "--tasks", "coco-retrieval", "--data-dir", str(tmp_path / "data"),
                 "--quick", "--no-progress", "--fusions", "early_concat,albef,text_only", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "coco-retrieval (r_mean" in printed and "\n## coco-retrieval: test r_mean" in printed

    rows = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["fusion"]) for r in rows] == [("coco-retrieval", f) for f in ("early_concat", "albef", "itc")]
    assert all(set(row) == RESULT_KEYS for row in rows)
    assert [r["config"]["reference"] for r in rows] == [False, False, True]
    itc = rows[-1]
    assert itc["config"]["itm_weight"] == 0 and itc["config"]["align"]["embed_dim"] > 0
    assert rows[1]["config"]["align"] is None  # albef aligns its own streams
    for row in rows:
        m = row["metrics"]
        assert (m["num_images"], m["num_captions"]) == (9, 27)
        for prefix in ("", "itc_") + (("all_",) if row["fusion"] != ITC_ROW else ()):
            values = [m[f"{prefix}{name}"] for name in RECALLS]
            assert all(0 <= v <= 100 for v in values), (row["fusion"], prefix, values)
            assert m[f"{prefix}r_mean"] == pytest.approx(np.mean(values))
        assert m["seconds_per_query"] > 0 and row["eval_samples_per_second"] > 0
        assert 0 < row["params_trainable"] < row["params_total"]
        # the row's numbers are recall_at_k of the score file it wrote, and the annotations agree
        path = out / f"scores_coco-retrieval_{row['fusion']}_seed0.npz"
        arrays = np.load(path)
        for prefix in ("", "itc_") + (("all_",) if row["fusion"] != ITC_ROW else ()):
            key = prefix or ""
            again = recall_at_k(arrays[f"{key}i2t"], arrays[f"{key}t2i"], arrays["owner"])
            assert {k: m[f"{prefix}{k}"] for k in again} == pytest.approx(again)
        assert score_retrieval(annotations, load_scores(path)) == pytest.approx(
            {k: m[k] for k in (*RECALLS, "r_mean")})
    assert itc["metrics"]["r_mean"] == itc["metrics"]["itc_r_mean"] and itc["metrics"]["rerank_seconds_per_query"] == 0
    for row in rows[:2]:
        m = row["metrics"]
        assert m["rerank_k"] == 16 and m["rerank_seconds_per_query"] > 0 and m["all_rerank_seconds_per_query"] > 0
        assert m["rerank_cost_ratio"] == pytest.approx(m["rerank_seconds_per_query"] / m["all_rerank_seconds_per_query"])
    # the dual encoder counts only what it trains: the alignment's two projections and temperature
    align = itc["config"]["align"]["embed_dim"] * (384 + 1280 + 2) + 1
    assert itc["params_trainable"] == align

    markdown = (out / "results.md").read_text()
    assert "## coco-retrieval" in markdown and "| fusion | txt_r1 |" in markdown and "itc (reference)" in markdown
    assert "scored on 9 test images x 27 captions" in markdown
    for name in ("score_coco-retrieval.png", "score_vs_seconds_coco-retrieval.png", "score_vs_params.png"):
        assert (out / name).stat().st_size > 0, name
    listed = json.loads((out / "run.json").read_text())["files"]
    assert "scores_coco-retrieval_itc_seed0.npz" in listed
