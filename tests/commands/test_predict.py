"""``fusionzoo predict --images``: one JSON line per input, the model's own predictions and scores, resumed
by skipping what the output holds, unreadable images named and skipped. Saved tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.cli import main
from fusionzoo.factory import create_model

ANSWERS = ["yes", "no", "red", "blue"]
QUESTIONS = ["is it red?", "what colour is it?"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five images in a folder and a subfolder (PNG and JPEG), a text file beside them."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k, name in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/d.JPEG", "e.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + k, 30, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def _saved(tmp_path: Path, task: str, **kwargs) -> tuple[Path, object]:
    torch.manual_seed(0)
    model = create_model(task, "early_concat", "tiny", "tiny", pretrained=False, fusion_kwargs={"dim": 32},
                         **kwargs).eval()
    return model.save_pretrained(tmp_path / task), model


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vqa_over_a_folder_every_question_resumed(photos: Path, tmp_path: Path, capsys) -> None:
    folder, model = _saved(tmp_path, "vqa", answers=ANSWERS)
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n\n")
    out = tmp_path / "answers.jsonl"
    args = ["predict", str(folder), "--images", str(photos), "--questions", str(questions), "--out", str(out),
            "--batch-size", "3"]
    assert main(args) == 0
    lines = _lines(out)
    images = sorted(str(p) for p in photos.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert len(images) == 5
    assert [(line["path"], line["question"]) for line in lines] == [(i, q) for i in images for q in QUESTIONS]
    pictures = [Image.open(line["path"]).convert("RGB") for line in lines]
    texts = [line["question"] for line in lines]
    assert [line["answer"] for line in lines] == model.predict(pictures, texts)
    soft = model.choice_logits(pictures, texts).sigmoid().max(dim=-1).values  # each answer's soft score
    assert [line["score"] for line in lines] == pytest.approx(soft.tolist(), abs=1e-5)
    assert "wrote 10 lines" in capsys.readouterr().err

    # resume: lose the last three lines and cut the one before in half, as a killed run leaves it
    complete = out.read_text()
    kept = complete.splitlines(keepends=True)
    out.write_text("".join(kept[:6]) + kept[6][:15])
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "wrote 4 lines to" in err and "6 inputs already there" in err
    resumed = _lines(out)
    assert [(r["path"], r["question"], r["answer"]) for r in resumed] == [
        (r["path"], r["question"], r["answer"]) for r in lines]
    assert main(args) == 0
    assert len(_lines(out)) == 10  # nothing left to do


def test_unreadable_images_are_named_and_skipped(photos: Path, tmp_path: Path, capsys) -> None:
    folder, model = _saved(tmp_path, "classification", labels=["no", "yes"])
    broken = tmp_path / "mixed"
    broken.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(broken / "good.png")
    (broken / "broken.png").write_bytes(b"\x89PNG but not really")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red square\n")
    out = tmp_path / "labels.jsonl"
    capsys.readouterr()
    assert main(["predict", str(folder), "--images", f"{broken}/*.png", "--texts", str(texts), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipped unreadable image {broken / 'broken.png'}" in err and "1 skipped for unreadable images" in err
    lines = _lines(out)
    assert [(line["path"], line["text"]) for line in lines] == [(str(broken / "good.png"), "a red square")]
    probabilities = model.choice_logits([Image.open(broken / "good.png")], ["a red square"]).softmax(-1)[0]
    assert lines[0]["label"] == model.output_names[int(probabilities.argmax())]
    assert lines[0]["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_captions_one_line_per_image_with_decoding_keys(photos: Path, tmp_path: Path) -> None:
    folder, model = _saved(tmp_path, "captioning")
    out = tmp_path / "captions.jsonl"
    assert main(["predict", str(folder), "num_beams=2", "max_new_tokens=5", "no_repeat_ngram_size=1",
                 "--images", str(photos), "--out", str(out)]) == 0
    lines = _lines(out)
    assert len(lines) == 5 and all(set(line) == {"path", "caption", "score"} for line in lines)
    pictures = [Image.open(line["path"]).convert("RGB") for line in lines]
    assert [line["caption"] for line in lines] == model.generate(pictures, num_beams=2, max_new_tokens=5,
                                                                 no_repeat_ngram_size=1)
    decoded = model.decode(model.vision.preprocess(pictures), num_beams=2, max_new_tokens=5, no_repeat_ngram_size=1)
    assert [line["score"] for line in lines] == pytest.approx(decoded.scores.tolist(), abs=1e-6)


def test_the_progress_bar_reaches_a_log_file(photos: Path, tmp_path: Path, capsys) -> None:
    """stderr redirected to a file (not a terminal, as under nohup or a scheduler) still gets the bar."""
    folder, _ = _saved(tmp_path, "captioning")
    capsys.readouterr()
    assert main(["predict", str(folder), "max_new_tokens=2", "--images", str(photos),
                 "--out", str(tmp_path / "c.jsonl"), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "predict: 100%" in err and "5/5" in err


@pytest.mark.parametrize("extra, message", [
    (["--images", "nowhere/*.png", "--out", "o.jsonl"], "--images: nowhere/*.png is neither a folder nor a glob"),
    (["--images", "{photos}"], "--images writes JSON Lines: give --out FILE"),
    (["beams=2", "--images", "{photos}", "--out", "o.jsonl"], "fusionzoo predict takes the decoding keys"),
    (["num_beams=0", "--images", "{photos}", "--out", "o.jsonl"], "key 'num_beams' must be an integer >= 1, got 0"),
    (["--images", "{photos}", "--out", "o.jsonl", "--question", "why?"], "a captioning model takes no text"),
])
def test_bad_input_is_one_line_naming_it(photos: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    folder, _ = _saved(tmp_path, "captioning")
    capsys.readouterr()
    args = [a.format(photos=photos) for a in extra]
    assert main(["predict", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_output_that_is_not_predict_lines_is_refused(photos: Path, tmp_path: Path, capsys) -> None:
    folder, _ = _saved(tmp_path, "captioning")
    out = tmp_path / "other.jsonl"
    out.write_text('{"path": "x.png", "caption": "a"}\nnot json\n')
    capsys.readouterr()
    assert main(["predict", str(folder), "--images", str(photos), "--out", str(out)]) == 2
    assert f"--out {out}, line 2: not JSON" in capsys.readouterr().err
