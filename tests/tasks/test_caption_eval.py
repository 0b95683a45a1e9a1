"""COCO caption scores: same numbers as pycocoevalcap's scorers, SPICE unavailable, clear errors.

Java-backed tests share one scoring of a small fixture written here (4 images x 5
references) and one METEOR process; they skip where Java is absent.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from fusionzoo.tasks import caption_eval
from fusionzoo.tasks.caption_eval import (
    CAPTION_METRICS,
    JavaNotFoundError,
    score_caption_dicts,
    score_captions,
)
from fusionzoo.tasks.vqa_eval import ScoreInputError

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

REFERENCES: dict[int, list[str]] = {
    11: ["A brown dog runs across a grassy field.", "a dog running on the grass", "The dog is sprinting over a lawn.",
         "A dog plays outside in a green park.", "a happy dog running through the grass"],
    22: ["Two cats sleep on a red sofa.", "two cats sleeping on a couch", "A pair of cats napping on a red couch.",
         "Cats curled up together on a sofa.", "two kittens asleep on the furniture"],
    33: ["A man rides a bicycle down a city street.", "a person riding a bike on the road",
         "A cyclist pedals past parked cars.", "man on a bike in traffic", "A man cycling through town."],
    44: ["A plate of pasta with tomato sauce.", "spaghetti and sauce on a white plate",
         "A bowl of noodles topped with red sauce.", "a pasta dinner on a table", "Pasta with tomatoes and basil."],
}
CANDIDATES: dict[int, str] = {
    11: "A dog running across the grass.",
    22: "two cats sleeping on a red couch",
    33: "a man riding a bike down the street",
    44: "a plate of spaghetti with sauce",
}


def _coco_files(tmp_path: Path) -> tuple[Path, Path]:
    annotations = {
        "info": {}, "licenses": [],
        "images": [{"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"} for image_id in REFERENCES],
        "annotations": [{"id": 1000 * image_id + j, "image_id": image_id, "caption": caption}
                        for image_id, captions in REFERENCES.items() for j, caption in enumerate(captions)],
    }
    results = [{"image_id": image_id, "caption": caption} for image_id, caption in CANDIDATES.items()]
    ann, res = tmp_path / "captions.json", tmp_path / "results.json"
    ann.write_text(json.dumps(annotations))
    res.write_text(json.dumps(results))
    return ann, res


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixture scored once through the files (starts the shared METEOR)."""
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java")
    return score_captions(*_coco_files(tmp_path_factory.mktemp("captions")))


@needs_java
def test_scores_equal_pycocoevalcap_scorers_called_directly(scored: dict[str, Any]) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # tokenise as COCOEvalCap does: references and candidates separately
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in CANDIDATES.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    # METEOR: pycocoevalcap's Meteor.compute_score on the already running scorer (a second
    # Java start would cost ~6 s; the scorer keeps no state between calls)
    meteor, _ = caption_eval._shared_meteor().compute_score(gts, res)
    direct = {**{f"Bleu_{n}": b for n, b in enumerate(bleu, 1)}, "METEOR": meteor,
              "ROUGE_L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}
    assert list(scored) == [*CAPTION_METRICS, "SPICE"]
    for key in CAPTION_METRICS:
        assert scored[key] == pytest.approx(direct[key], abs=1e-6), key
        assert isinstance(scored[key], float)
    assert 0.5 < scored["Bleu_1"] <= 1 and 0 < scored["METEOR"] < 1 and scored["CIDEr"] > 0.5


@needs_java
def test_spice_is_reported_unavailable(scored: dict[str, Any]) -> None:
    assert scored["SPICE"] is None
    assert "SPICE not computed" in caption_eval.SPICE_NOTE


@needs_java
def test_dict_interface_gives_the_same_scores(scored: dict[str, Any]) -> None:
    res = {k: [c] if k % 2 else c for k, c in CANDIDATES.items()}  # a list of one, or the bare string
    assert score_caption_dicts(REFERENCES, res) == pytest.approx(scored)


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH, so no java
    with pytest.raises(JavaNotFoundError) as info:
        score_caption_dicts(REFERENCES, CANDIDATES)
    message = str(info.value)
    assert "no `java` was found on PATH" in message
    assert "apt-get install default-jre-headless" in message and "openjdk" in message


# --------------------------------------------------------------------------------------
# Bad input names the file and the entry (all raised before any Java runs)
# --------------------------------------------------------------------------------------
def _error(tmp_path: Path, edit: Any) -> str:
    ann, res = _coco_files(tmp_path)
    annotations, results = json.loads(ann.read_text()), json.loads(res.read_text())
    edit(annotations, results)
    ann.write_text(json.dumps(annotations))
    res.write_text(json.dumps(results))
    with pytest.raises(ScoreInputError) as info:
        score_captions(ann, res)
    return str(info.value)


def test_result_for_unknown_image(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda a, r: r.append({"image_id": 99, "caption": "a cat"}))
    assert "results.json" in message and "results[4] (image_id=99)" in message and "no reference captions" in message


def test_duplicate_result(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda a, r: r.append({"image_id": 22, "caption": "cats"}))
    assert "results[4] (image_id=22)" in message and "second caption" in message and "results[1]" in message


def test_missing_images_say_how_many(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda a, r: r.pop())
    assert "results.json" in message and "no caption for 1 of 4 images" in message and "44" in message


def test_bad_entries(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda a, r: r[0].pop("caption"))
    assert "results[0] (image_id=11)" in message and "missing key 'caption'" in message
    message = _error(tmp_path, lambda a, r: r[2].update(caption="   "))
    assert "results[2] (image_id=33)" in message and "caption is empty" in message
    message = _error(tmp_path, lambda a, r: a["annotations"][3].update(caption=7))
    assert "captions.json" in message and "annotations[3] (image_id=11)" in message and "'caption'" in message
    message = _error(tmp_path, lambda a, r: a["annotations"][0].update(image_id=5))
    assert "annotations[0] (image_id=5)" in message and "not in 'images'" in message


def test_dict_input_errors() -> None:
    with pytest.raises(ScoreInputError, match=r"<res>, res\[99\]: image 99 has no references"):
        score_caption_dicts(REFERENCES, {**CANDIDATES, 99: "x"})
    with pytest.raises(ScoreInputError, match=r"<res>: no candidate for 1 of 4 images \(44\)"):
        score_caption_dicts(REFERENCES, {k: v for k, v in CANDIDATES.items() if k != 44})
    with pytest.raises(ScoreInputError, match=r"res\[11\]: 2 candidates"):
        score_caption_dicts(REFERENCES, {**CANDIDATES, 11: ["a", "b"]})
    with pytest.raises(ScoreInputError, match=r"<gts>, gts\[11\]: references are list \[\]"):
        score_caption_dicts({**REFERENCES, 11: []}, CANDIDATES)


@needs_java
def test_caption_of_punctuation_only_is_an_input_error() -> None:
    with pytest.raises(ScoreInputError, match=r"res\[22\]: caption has no words after PTB tokenisation"):
        score_caption_dicts(REFERENCES, {**CANDIDATES, 22: "..."})


# --------------------------------------------------------------------------------------
# Real COCO captions, and the evaluate module offline
# --------------------------------------------------------------------------------------
@needs_java
def test_real_coco_captions_scored_against_the_others(coco_mini: Path) -> None:
    data = json.loads((coco_mini / "annotations" / "captions_mini.json").read_text())
    by_image: dict[int, list[str]] = {}
    for record in data["annotations"]:
        by_image.setdefault(record["image_id"], []).append(record["caption"])
    chosen = [image_id for image_id, captions in by_image.items() if len(captions) >= 5][:6]
    # each image's first human caption is the candidate, its other captions the references
    annotations = {"images": [{"id": i} for i in chosen],
                   "annotations": [{"image_id": i, "caption": c} for i in chosen for c in by_image[i][1:]]}
    results = [{"image_id": i, "caption": by_image[i][0]} for i in chosen]
    scores = score_captions(annotations, results)
    assert scores == pytest.approx(score_caption_dicts({i: by_image[i][1:] for i in chosen},
                                                       {i: by_image[i][0] for i in chosen}))
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L"):
        assert 0 < scores[key] < 1, key
    assert scores["Bleu_1"] > 0.4 and scores["CIDEr"] > 0.1  # humans agree with humans


@pytest.fixture
def private_evaluate_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """evaluate copies module scripts under tmp_path (not ~/.cache) and forgets them afterwards."""
    import evaluate.config

    modules = tmp_path / "modules"
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", modules)
    monkeypatch.setattr(sys, "path", list(sys.path))  # evaluate appends the cache folder
    for name in [n for n in sys.modules if n.split(".")[0] == "evaluate_modules"]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    yield modules
    for name in [n for n in sys.modules if n.split(".")[0] == "evaluate_modules"]:
        del sys.modules[name]


@needs_java
def test_evaluate_module_loads_offline_and_matches(scored: dict[str, Any], private_evaluate_modules: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # in this process (a second METEOR start would cost ~6 s); the vqa_accuracy test
    # loads its module in a fresh process with the offline variables set instead
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from fusionzoo.tasks.metrics import load

    module = load("coco_caption", keep_in_memory=True, cache_dir=str(tmp_path / "evaluate"))
    result = module.compute(predictions=list(CANDIDATES.values()), references=list(REFERENCES.values()))
    assert result == pytest.approx(scored, abs=1e-9)
    assert any(private_evaluate_modules.rglob("coco_caption.py"))


@needs_java
def test_bench_scores_a_wordless_caption_as_a_miss_not_an_error() -> None:
    from fusionzoo.tasks.scoring import NO_CAPTION, score_caption_predictions
    from fusionzoo.bench.suites import SplitData

    references = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["a red bus on a street"]}
    split = SplitData(image_paths=["a.jpg", "b.jpg"], texts=None, image_ids=[1, 2], references=references)
    metrics = score_caption_predictions(split, ["a dog runs on the grass", " . ,"])
    assert metrics["wordless_captions"] == 1.0
    # Scored as if image 2 got the placeholder word, which no reference contains.
    same = score_caption_predictions(split, ["a dog runs on the grass", NO_CAPTION])
    assert same["wordless_captions"] == 0.0
    assert {k: v for k, v in metrics.items() if k != "wordless_captions"} == \
        {k: v for k, v in same.items() if k != "wordless_captions"}
    assert 0 < metrics["CIDEr"] < score_caption_predictions(split, ["a dog runs on the grass",
                                                                     "a red bus on a street"])["CIDEr"]
