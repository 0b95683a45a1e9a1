"""The Accelerate training loop end to end, on easy-VQA with tiny encoders.

A run killed with SIGKILL and its resume, and a predict on the saved model, run the real
command line in subprocesses; the models they start from or compare with train in the test
process. Two processes against one: test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusionzoo.training.config import load_config

COMMON = [
    "task=vqa", "data=easy-vqa", "fusion=merged_transformer", "vision=tiny", "text=tiny",
    "batch_size=16", "max_train_samples=160", "fusion_kwargs.dim=32", "lr=1e-3", "log_with=none",
    "log_every=1", "seed=3",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _fusionzoo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusionzoo", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:  # where a run or a resume starts
            continue
        out[record["step"]] = record["train/loss"]  # a step run twice (after a resume) keeps its last value
    return out


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    from fusionzoo.training.trainer import train

    args = [*COMMON, "max_steps=20", "save_every=3", "max_eval_samples=100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    final_straight = train(load_config(None, [*args, f"output_dir={straight}"]))  # what `fusionzoo train` prints

    proc = subprocess.Popen([sys.executable, "-m", "fusionzoo", "train", *args, f"output_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    target = killed / "checkpoints" / "step-00000012"  # mid-epoch: 10 batches an epoch
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.is_dir(), "the run ended before it could be killed"
    assert not (killed / "final").exists()

    resumed = _fusionzoo("train", *args, f"output_dir={killed}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), f"step {step}"
    final_resumed = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert final_resumed["accuracy"] == pytest.approx(final_straight["accuracy"])
    # Only the last keep_last (2) checkpoints remain, all complete.
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["step-00000018", "step-00000020"], (ckpts, resumed.stdout[-2000:], resumed.stderr[-2000:])
    run = json.loads((killed / "final" / "run.json").read_text())
    assert run["config"]["max_steps"] == 20 and "torch" in run["versions"]


def test_predict_on_saved_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusionzoo.cli import main
    from fusionzoo.training.trainer import train

    out = tmp_path / "run"
    train(load_config(None, [*COMMON, "max_steps=2", "max_eval_samples=32", f"output_dir={out}"]))
    from fusionzoo.data.vqa import load_easy_vqa

    data = load_easy_vqa(splits=["test"])
    row = data["test"][0]
    answers = json.loads((out / "final" / "config.json").read_text())["answers"]
    result = _fusionzoo("predict", str(out), "--image", row["image_path"], "--question", row["question"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() in answers
    capsys.readouterr()
    assert main(["predict", str(out), "--image", str(tmp_path / "nope.png"), "--question", "what?"]) == 2
    assert "cannot read image" in capsys.readouterr().err


NAN_FUSION = '''
import torch
import fusionzoo
from fusionzoo.fusions.early_concat import EarlyConcatFusion

CALLS = {"n": 0}


@fusionzoo.register_fusion("nan_after_three", override=True)
class NanAfterThree(EarlyConcatFusion):
    """Early concat whose output turns NaN from its fourth training forward on."""

    def forward(self, text, text_mask, image, image_mask=None, *, causal=False, cache=None):
        out = super().forward(text, text_mask, image, image_mask, causal=causal, cache=cache)
        if self.training:
            CALLS["n"] += 1
            if CALLS["n"] > 3:
                out.pooled = out.pooled * float("nan")
        return out
'''


def test_nan_loss_stops_after_saving_last_good_state(tmp_path: Path) -> None:
    from fusionzoo.plugins import import_plugin
    from fusionzoo.registry import FUSIONS
    from fusionzoo.training.trainer import NonFiniteLossError, train

    plugin = tmp_path / "nan_fusion.py"
    plugin.write_text(NAN_FUSION)
    import_plugin(str(plugin))
    try:
        cfg = load_config(None, [*COMMON, "fusion=nan_after_three", "fusion_kwargs={}", "max_steps=10",
                                 "max_eval_samples=16", f"output_dir={tmp_path / 'run'}"])
        with pytest.raises(NonFiniteLossError, match=r"loss is nan \(vqa=nan\) at step 3 .*last good state was saved"):
            train(cfg)
        saved = tmp_path / "run" / "checkpoints" / "step-00000003"
        assert (saved / "model.safetensors").is_file()
        progress = json.loads((saved / "progress.json").read_text())
        assert progress["step"] == 3
    finally:
        FUSIONS.unregister("nan_after_three")
        torch.set_grad_enabled(True)


def _karpathy_fixture(root: Path, n_images: int = 8) -> None:
    """A Karpathy-schema split file over small generated images (train 6 / val 1 / test 1)."""
    from PIL import Image

    words = ["red", "blue", "green", "black"]
    images = []
    for k in range(n_images):
        image_id = 500 + k
        filename = f"COCO_val2014_{image_id:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (60 * (k % 4), 30 * k % 255, 90)).save(root / "val2014" / filename)
        split = "test" if k == n_images - 1 else "val" if k == n_images - 2 else "train"
        sentences = [{"raw": f"a {words[k % 4]} square on a plain background {s}", "tokens": [], "imgid": k,
                      "sentid": 10 * k + s} for s in range(2)]
        images.append({"filepath": "val2014", "filename": filename, "imgid": k, "split": split,
                       "sentences": sentences, "sentids": [s["sentid"] for s in sentences], "cocoid": image_id})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def test_captioning_trains_generates_and_reports_caption_scores(tmp_path: Path) -> None:
    from fusionzoo.model import load_model
    from fusionzoo.training.trainer import evaluate_checkpoint, train

    _karpathy_fixture(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_config(None, [
        "task=captioning", "data=karpathy-captions", f"data_dir={tmp_path / 'data'}", "fusion=albef",
        "vision=tiny", "text=tiny", "fusion_kwargs.dim=32", "batch_size=4", "max_steps=4", "lr=1e-3",
        "log_with=none", f"output_dir={out}", "max_text_len=16",
    ])
    metrics = train(cfg)
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert key in metrics and metrics[key] >= 0.0
    assert metrics["num_samples"] == 1  # the one val image
    model = load_model(out / "final")
    from PIL import Image

    caption = model.generate([Image.new("RGB", (32, 32), (0, 0, 255))], max_new_tokens=5, num_beams=2)
    assert isinstance(caption[0], str)
    cfg.split = "test"
    scored = evaluate_checkpoint(out, cfg)
    assert scored["num_samples"] == 1 and "CIDEr" in scored


def test_captioning_with_the_training_captions_tokens_as_its_output_vocabulary(tmp_path: Path) -> None:
    """``head_kwargs.output_ids=train``: the head scores the train captions' tokens only, kept by the saved model."""
    from fusionzoo.model import load_model
    from fusionzoo.training.config import ConfigError
    from fusionzoo.training.trainer import train

    _karpathy_fixture(tmp_path / "data")
    out = tmp_path / "run"
    args = ["task=captioning", "data=karpathy-captions", f"data_dir={tmp_path / 'data'}", "fusion=early_concat",
            "vision=tiny", "text=tiny", "fusion_kwargs.dim=32", "batch_size=4", "max_steps=3", "lr=1e-3",
            "log_with=none", "max_text_len=16", "max_eval_samples=0"]
    train(load_config(None, [*args, "head_kwargs.output_ids=train", f"output_dir={out}"]))
    model = load_model(out / "final")
    tokenizer = model.text.tokenizer
    expected = set()  # every token of the 12 train captions, [CLS] and [SEP] included (k = 0..5 are train)
    for k in range(6):
        for s in range(2):
            colour = ["red", "blue", "green", "black"][k % 4]
            expected.update(tokenizer(f"a {colour} square on a plain background {s}")["input_ids"])
    assert model.head.output_ids == sorted(expected)
    assert len(expected) < 30 < model.head.vocab_size
    from PIL import Image

    captions = model.generate([Image.new("RGB", (32, 32), (0, 0, 255))], max_new_tokens=6)
    assert set(tokenizer(captions[0])["input_ids"]) <= expected  # written from the train captions' tokens only
    with pytest.raises(ConfigError, match="head_kwargs.output_ids': expected 'train'"):
        train(load_config(None, [*args, "head_kwargs.output_ids=all", f"output_dir={tmp_path / 'b'}"]))
    with pytest.raises(ConfigError, match="is for a task that writes text"):
        train(load_config(None, [*COMMON, "max_steps=1", "head_kwargs.output_ids=train", f"output_dir={tmp_path / 'c'}"]))
