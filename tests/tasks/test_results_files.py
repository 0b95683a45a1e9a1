"""``fusionzoo eval results= references=``: files in the official formats that ``fusionzoo score`` accepts
and scores to the numbers eval printed; the predictions in them are those the model's own inference API
gives; unlabeled splits are predicted and written, not scored. Tiny encoders, a few training steps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusionzoo.cli import main
from fusionzoo.data.vqa_answers import normalize_answer
from fusionzoo.model import load_model
from fusionzoo.tasks.vqa_eval import vqa_accuracy
from fusionzoo.training.config import load_config
from fusionzoo.training.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from fixtures import COLOURS, write_classification_jsonl, write_karpathy_captions, write_vqa_jsonl  # noqa: E402

TINY = ["vision=tiny", "text=tiny", "fusion=early_concat", "fusion_kwargs.dim=32", "lr=1e-3", "log_with=none",
        "seed=1", "max_eval_samples=0"]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, str]:
    """``fusionzoo ARGS`` in this process: exit status, the last stdout line as JSON (if any), stderr."""
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 and lines else None, err


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- VQA with ten human answers and types: the official accuracy ------------------------------------------
@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A VQA JSONL folder whose test questions have ten human answers that disagree, with answer and
    question types, and an unlabeled split; a model trained on it for a few steps."""
    root = write_vqa_jsonl(tmp_path_factory.mktemp("vqa"), {"train": 24, "test": 12, "unlabeled": 4})
    names = list(COLOURS)
    test = _jsonl(root / "test.jsonl")
    for k, record in enumerate(test):
        colour = record["answers"][0]
        if k % 3 == 0:  # a yes/no question about the square
            record.update(question=f"is the square {names[k % 4]}?", answer_type="yes/no", question_type="is the",
                          answers=["yes" if names[k % 4] == colour else "no"] * 7 + ["maybe"] * 3)
        else:  # k % 3 of the ten name another colour: 10, 7 or 4 agree with the image
            record.update(answer_type="other", question_type="what colour is the",
                          answers=[colour] * (10 - 3 * (k % 3)) + [names[(k + 1) % 4]] * (3 * (k % 3)))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    unlabeled = [{key: value for key, value in r.items() if key != "answers"} for r in _jsonl(root / "unlabeled.jsonl")]
    (root / "unlabeled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unlabeled))
    out = root.parent / "run"
    train(load_config(None, ["task=vqa", "data=vqa-jsonl", f"data_dir={root}", *TINY, "batch_size=8", "max_steps=4",
                             f"output_dir={out}"]))
    return root, out


def test_vqa_results_score_to_the_printed_official_numbers(vqa_run, tmp_path: Path, capsys) -> None:
    root, run = vqa_run
    results, references = tmp_path / "results.json", tmp_path / "references.json"
    code, printed, err = _run(["eval", str(run), "split=test", f"results={results}", f"references={references}"],
                              capsys)
    assert code == 0, err
    assert f"wrote results to {results}" in err
    code, scored, err = _run(["score", "vqa", "--questions", str(references), "--annotations", str(references),
                              "--results", str(results), "--indent", "0"], capsys)
    assert code == 0, err
    assert scored["overall"] == printed["accuracy"]
    assert scored["perAnswerType"] == printed["per_answer_type"] and set(scored["perAnswerType"]) == {"yes/no", "other"}
    assert scored["perQuestionType"] == printed["per_question_type"]

    # the answers are the model's own, and the accuracy is the official one of those answers
    rows = _jsonl(root / "test.jsonl")
    written = json.loads(results.read_text())
    assert [r["question_id"] for r in written] == [r["question_id"] for r in rows]
    model = load_model(run / "final")
    images = [Image.open(root / "images" / r["image"]) for r in rows]
    assert [r["answer"] for r in written] == model.predict(images, [r["question"] for r in rows])
    accuracy = [vqa_accuracy(w["answer"], r["answers"]) for w, r in zip(written, rows)]
    assert printed["accuracy"] == round(100 * sum(accuracy) / len(accuracy), 2)
    assert 0 < printed["accuracy"] < 100  # partial credit: the numbers compared are not trivially equal


def test_vqa_unlabeled_split_is_written_not_scored(vqa_run, tmp_path: Path, capsys) -> None:
    root, run = vqa_run
    results = tmp_path / "test-dev.json"
    code, printed, err = _run(["eval", str(run), "split=unlabeled", f"results={results}"], capsys)
    assert code == 0, err
    assert printed == {"num_samples": 4.0}  # no accuracy, no loss: nothing to score against
    rows = _jsonl(root / "unlabeled.jsonl")
    model = load_model(run / "final")
    answers = model.predict([Image.open(root / "images" / r["image"]) for r in rows], [r["question"] for r in rows])
    assert json.loads(results.read_text()) == [{"question_id": r["question_id"], "answer": a}
                                               for r, a in zip(rows, answers)]
    code, _, err = _run(["eval", str(run), "split=unlabeled", f"references={tmp_path / 'r.json'}"], capsys)
    assert code == 2 and "key 'references': split 'unlabeled' of 'vqa-jsonl' has no answers to write" in err


# -- easy-VQA: one answer a question, scored by exact match ------------------------------------------------
def test_easy_vqa_results_score_to_the_printed_accuracy(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(load_config(None, ["task=vqa", "data=easy-vqa", *TINY, "batch_size=16", "max_train_samples=160",
                             "max_steps=3", f"output_dir={run}"]))
    results, references = tmp_path / "results.json", tmp_path / "references.json"
    code, printed, err = _run(["eval", str(run), "split=test", "max_eval_samples=240", f"results={results}",
                               f"references={references}"], capsys)
    assert code == 0, err
    code, scored, err = _run(["score", "vqa", "--questions", str(references), "--annotations", str(references),
                              "--results", str(results), "--indent", "0"], capsys)
    assert code == 0, err
    assert scored["overall"] == round(printed["accuracy"], 2)  # the official report's two decimals
    assert printed["num_samples"] == 240 and 0 < printed["accuracy"] < 100
    from fusionzoo.data.vqa import load_easy_vqa

    test = load_easy_vqa(splits=["test"])["test"]
    gold = dict(zip(test["question_id"], test["answers"]))
    written = json.loads(references.read_text())
    assert all([a["answer"] for a in ann["answers"]] == [normalize_answer(gold[ann["question_id"]][0])] * 10
               for ann in written["annotations"])
    answers = {r["question_id"]: r["answer"] for r in json.loads(results.read_text())}
    exact = [normalize_answer(a) == normalize_answer(gold[q][0]) for q, a in answers.items()]
    assert printed["accuracy"] == pytest.approx(100 * sum(exact) / len(exact))


# -- captioning ---------------------------------------------------------------------------------------------
@needs_java
def test_caption_results_score_to_the_printed_numbers_with_decoding_options(tmp_path: Path, capsys) -> None:
    root = write_karpathy_captions(tmp_path / "data", {"train": 8, "test": 5})
    run = tmp_path / "run"
    train(load_config(None, ["task=captioning", "data=karpathy-captions", f"data_dir={root}", *TINY, "batch_size=4",
                             "max_steps=4", "max_text_len=16", f"output_dir={run}"]))
    results, references = tmp_path / "captions.json", tmp_path / "references.json"
    decoding = {"num_beams": 2, "max_new_tokens": 6, "no_repeat_ngram_size": 1, "length_penalty": 0.5}
    code, printed, err = _run(["eval", str(run), "split=test", f"results={results}", f"references={references}",
                               *(f"{k}={v}" for k, v in decoding.items())], capsys)
    assert code == 0, err
    code, scored, err = _run(["score", "captions", "--annotations", str(references), "--results", str(results),
                              "--indent", "0"], capsys)
    assert code == 0, err
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert scored[key] == pytest.approx(printed[key], abs=1e-12), key
    dataset = json.loads((root / "dataset_coco.json").read_text())["images"]
    tests = [image for image in dataset if image["split"] == "test"]
    written = {r["image_id"]: r["caption"] for r in json.loads(results.read_text())}
    assert sorted(written) == sorted(image["cocoid"] for image in tests)
    model = load_model(run / "final")
    pictures = [Image.open(root / image["filepath"] / image["filename"]) for image in tests]
    expected = [c if any(ch.isalnum() for ch in c) else "nocaption" for c in model.generate(pictures, **decoding)]
    assert [written[image["cocoid"]] for image in tests] == expected
    assert printed["wordless_captions"] == expected.count("nocaption")
    gold = json.loads(references.read_text())
    assert sorted((a["image_id"], a["caption"]) for a in gold["annotations"]) == sorted(
        (image["cocoid"], s["raw"]) for image in tests for s in image["sentences"])


# -- classification -----------------------------------------------------------------------------------------
def test_classification_results_jsonl_and_an_unlabeled_split(tmp_path: Path, capsys) -> None:
    root = write_classification_jsonl(tmp_path / "data", {"train": 16, "test": 8, "unseen": 6})
    unseen = [{k: v for k, v in r.items() if k != "label"} for r in _jsonl(root / "unseen.jsonl")]
    (root / "unseen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unseen))
    run = tmp_path / "run"
    train(load_config(None, ["task=classification", "data=classification-jsonl", f"data_dir={root}", *TINY,
                             "batch_size=8", "max_steps=3", f"output_dir={run}"]))
    model = load_model(run / "final")
    for split in ("test", "unseen"):
        results = tmp_path / f"{split}.jsonl"
        code, printed, err = _run(["eval", str(run), f"split={split}", f"results={results}"], capsys)
        assert code == 0, err
        rows, written = _jsonl(root / f"{split}.jsonl"), _jsonl(results)
        assert [w["id"] for w in written] == [r["id"] for r in rows]
        logits = model.choice_logits([Image.open(root / r["img"]) for r in rows], [r["text"] for r in rows])
        expected = logits.softmax(-1)
        for line, probabilities in zip(written, expected.tolist()):
            assert list(line["probabilities"]) == model.output_names
            # float32 batches of another size and composition: a few units in the sixth decimal
            assert list(line["probabilities"].values()) == pytest.approx(probabilities, abs=1e-5)
            assert line["label"] == model.output_names[max(range(2), key=probabilities.__getitem__)]
        if split == "unseen":
            assert printed == {"num_samples": 6.0}
        else:
            correct = [w["label"] == r["label"] for w, r in zip(written, rows)]
            assert printed["accuracy"] == pytest.approx(100 * sum(correct) / len(correct))
    code, _, err = _run(["eval", str(run), "split=test", f"references={tmp_path / 'r.json'}"], capsys)
    assert code == 2 and "key 'references': classification results are scored by `fusionzoo eval` itself" in err
