"""Sharing a model: its card (README.md with YAML metadata), loading a Hub repo id from the Hub's cache
offline, uploading through a patched upload function. Nothing here contacts a server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image

import fusionzoo
from fusionzoo.errors import MissingModelFileError
from fusionzoo.model_card import parse_card, write_model_card

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[fusionzoo.FusionModel, Path]:
    torch.manual_seed(0)
    model = fusionzoo.create_model("vqa", "co_attention", pretrained=False, answers=["red", "blue", "green"],
                                   fusion_kwargs={"dim": 32}).eval()
    return model, model.save_pretrained(tmp_path_factory.mktemp("share") / "model")


def as_hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """``cache`` laid out as huggingface_hub lays out a downloaded model repo: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_saved_folder_has_a_model_card(saved) -> None:
    model, folder = saved
    meta = parse_card((folder / "README.md").read_text())
    assert meta["library_name"] == "fusionzoo"
    assert meta["task"] == "vqa" and meta["fusion"] == "co_attention"
    assert meta["encoders"] == {"vision": "tiny", "text": "tiny"}
    assert meta["pipeline_tag"] == "visual-question-answering"
    assert "metrics" not in meta and "datasets" not in meta  # no run.json: no evaluation to report
    assert "fusionzoo.load_model(" in (folder / "README.md").read_text()


def test_card_reports_the_last_evaluation(saved, tmp_path) -> None:
    _, folder = saved
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    run = {"config": {"data": "easy-vqa", "split": "test"}, "metrics": {"step": 2000, "epoch": 1, "accuracy": 61.25,
                                                                        "loss": 1.5, "num_samples": 400.0}}
    (copy / "run.json").write_text(json.dumps(run))
    text = write_model_card(copy, "me/vqa").read_text()
    meta = parse_card(text)
    assert meta["datasets"] == ["easy-vqa"]
    assert meta["metrics"] == run["metrics"]
    results = meta["model-index"][0]["results"][0]
    # the Hub's evaluation results hold the scores, not when or on how much they were measured
    assert {m["type"]: m["value"] for m in results["metrics"]} == {"accuracy": 61.25, "loss": 1.5}
    assert results["dataset"]["split"] == "test"
    assert "fusionzoo.load_model('me/vqa')" in text and "| accuracy | 61.25 |" in text


def test_training_writes_the_final_metrics_into_the_card(tmp_path) -> None:
    from fusionzoo.training.config import load_config
    from fusionzoo.training.trainer import train

    out = tmp_path / "run"
    final = train(load_config(None, ["task=vqa", "data=easy-vqa", "fusion=early_concat", "vision=tiny", "text=tiny",
                                     "batch_size=8", "max_train_samples=16", "max_steps=2", "max_eval_samples=16",
                                     "log_with=none", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}"]))
    meta = parse_card((out / "final" / "README.md").read_text())
    assert meta["datasets"] == ["easy-vqa"]
    assert meta["metrics"]["accuracy"] == pytest.approx(final["accuracy"])


def test_load_model_from_the_hub_cache_offline(saved, offline_cache) -> None:
    model, folder = saved
    as_hub_cache(folder, offline_cache, "someone/vqa-coattn")
    loaded = fusionzoo.load_model("someone/vqa-coattn")
    image, question = Image.new("RGB", (40, 40), (200, 30, 30)), "what color is it?"
    assert loaded.predict([image], [question]) == model.predict([image], [question])
    batch = model.text.tokenize([question])
    pixels = model.vision.preprocess([image])
    with torch.no_grad():
        a = model(pixel_values=pixels, **batch).logits
        b = loaded(pixel_values=pixels, **batch).logits
    assert torch.equal(a, b)
    pinned = fusionzoo.load_model(f"someone/vqa-coattn@{COMMIT}")  # a revision, read from the same cache
    assert pinned.config == loaded.config


def test_hub_id_not_in_the_cache_offline_is_a_clear_error(offline_cache) -> None:
    with pytest.raises(MissingModelFileError, match="not in the Hub cache.*HF_HUB_OFFLINE"):
        fusionzoo.load_model("someone/never-downloaded")


def test_commands_take_a_hub_repo_id(saved, offline_cache, tmp_path, capsys) -> None:
    from PIL import Image

    from fusionzoo.cli import main as fusionzoo_cli

    model, folder = saved
    as_hub_cache(folder, offline_cache, "someone/vqa-coattn")
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    assert fusionzoo_cli(["predict", "someone/vqa-coattn", "--image", str(image), "--question", "what colour?"]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert answer == model.predict([Image.open(image).convert("RGB")], ["what colour?"])[0]
    assert fusionzoo_cli(["predict", "someone/not-cached", "--image", str(image), "--question", "q"]) != 0
    assert "not in the Hub cache" in capsys.readouterr().err


def test_init_from_a_hub_repo_id(saved, offline_cache) -> None:
    from fusionzoo.training.trainer import load_matching_weights

    model, folder = saved
    as_hub_cache(folder, offline_cache, "someone/vqa-coattn")
    torch.manual_seed(1)
    fresh = fusionzoo.create_model("vqa", "co_attention", pretrained=False, answers=["red", "blue", "green"],
                                   fusion_kwargs={"dim": 32})
    stats = load_matching_weights(fresh, "someone/vqa-coattn")
    assert stats["missing"] == 0
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # the same from create_model, for another task: the encoders and fusion carry over; the head's output
    # layer (2 labels, not 3 answers) keeps the initialisation it gets without init_from
    def classifier(**kwargs):
        torch.manual_seed(2)
        return fusionzoo.create_model("classification", "co_attention", pretrained=False, labels=["no", "yes"],
                                      fusion_kwargs={"dim": 32}, **kwargs).state_dict()

    other, plain = classifier(init_from="someone/vqa-coattn"), classifier()
    saved_state = model.state_dict()
    for name, value in other.items():
        if name.startswith(("vision.", "text.", "fusion.")):
            assert torch.equal(value, saved_state[name]), name
        elif saved_state.get(name) is None or saved_state[name].shape != value.shape:
            assert torch.equal(value, plain[name]), name
    assert any(saved_state.get(n) is not None and saved_state[n].shape != v.shape for n, v in other.items())


@pytest.fixture()
def uploads(monkeypatch) -> list[dict]:
    """huggingface_hub's create_repo and upload_folder patched: each upload's arguments and files are kept."""
    calls: list[dict] = []

    def create_repo(repo_id, **kwargs):
        calls.append({"create": repo_id, **kwargs})

    def upload_folder(*, repo_id, folder_path, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls.append({"repo_id": repo_id, "files": files, **kwargs})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT}"})()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_folder(saved, uploads) -> None:
    model, folder = saved
    url = model.push_to_hub("me/vqa-coattn", private=True)
    assert url.endswith(COMMIT)
    create, upload = uploads
    assert create == {"create": "me/vqa-coattn", "private": True, "token": None, "exist_ok": True}
    assert upload["repo_id"] == "me/vqa-coattn"
    files = upload["files"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer/tokenizer.json"} <= set(files)
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert "fusionzoo.load_model('me/vqa-coattn')" in files["README.md"].decode()


def test_push_command(saved, uploads, tmp_path, capsys) -> None:
    from fusionzoo.cli import main

    _, folder = saved
    run = tmp_path / "run"
    shutil.copytree(folder, run / "final")  # a run's output_dir
    assert main(["push", str(run), "me/from-cli", "--message", "first"]) == 0
    assert capsys.readouterr().out.strip().endswith(COMMIT)
    upload = uploads[-1]
    assert upload["repo_id"] == "me/from-cli" and upload["commit_message"] == "first"
    assert "me/from-cli" in upload["files"]["README.md"].decode()
    assert main(["push", str(tmp_path / "nothing"), "me/x"]) == 2
    assert main(["push", str(run), "not a repo id"]) == 2
