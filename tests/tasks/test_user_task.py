"""A task defined in a user's own file (the README's SNLI-VE example) trains and evaluates through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLE = Path(__file__).resolve().parent / "visual_entailment.py"  # the README's example, whole
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 200, 40)}


def _write_entailment(root: Path, sizes: dict[str, int]) -> None:
    """SNLI-VE-style lines: a hypothesis about a coloured square is entailed, contradicted, or neither."""
    names = list(COLOURS)
    k = 0
    (root / "images").mkdir(parents=True)
    for split, count in sizes.items():
        lines = []
        for _ in range(count):
            colour = names[k % 3]
            image = Image.new("RGB", (32, 32), (255, 255, 255))
            image.paste(COLOURS[colour], (6, 6, 26, 26))
            image.save(root / "images" / f"{k}.png")
            kind = ("entailment", "contradiction", "neutral")[(k // 3) % 3]
            hypothesis = {"entailment": f"the square is {colour}",
                          "contradiction": f"the square is {names[(k + 1) % 3]}",
                          "neutral": "the square was drawn by a child"}[kind]
            lines.append(json.dumps({"pair_id": f"{split}-{k}", "image": f"images/{k}.png", "hypothesis": hypothesis,
                                     "gold_label": kind}))
            k += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


#: Runs the ``fusionzoo`` command lines given as JSON one after another in this one process, each with its own
#: captured stdout and stderr; prints one JSON list of them. (A process start costs seconds of imports.)
SEQUENCE = """
import contextlib, io, json, sys
from fusionzoo.cli import main
done = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    done.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(done))
"""


def _fusionzoo(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """``fusionzoo --import EXAMPLE`` with each of ``commands`` in turn, in one new process."""
    argvs = [["--import", str(EXAMPLE), *args] for args in commands]
    run = subprocess.run([sys.executable, "-c", SEQUENCE, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, **done) for argv, done in
            zip(argvs, json.loads(run.stdout.strip().splitlines()[-1]))]


def test_user_file_task_trains_evaluates_and_predicts(tmp_path: Path) -> None:
    data = tmp_path / "ve"
    _write_entailment(data, {"train": 36, "test": 9})
    out = tmp_path / "run"
    [trained] = _fusionzoo(("train", "task=snli-ve", f"data={data}", "fusion=early_concat", "vision=tiny",
                            "text=tiny", "fusion_kwargs.dim=16", "batch_size=6", "max_steps=6", "lr=1e-3",
                            "log_with=none", f"output_dir={out}"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads(trained.stdout.strip().splitlines()[-1])
    assert metrics["num_samples"] == 9
    assert {"accuracy", "macro_f1", "loss", "accuracy_entailment", "accuracy_neutral",
            "accuracy_contradiction"} <= set(metrics)
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["task"] == "snli-ve" and saved["labels"] == ["entailment", "neutral", "contradiction"]

    # A new process that did not train (only its --import knows the task): eval, then predict in it; then
    # the user's task and VQA trained as one model (task=snli-ve+vqa).
    vqa = tmp_path / "vqa"
    vqa.mkdir()
    for split in ("train", "test"):
        lines = [json.dumps({"question_id": k, "image": f"images/{k}.png", "question": "what colour is the square?",
                             "answers": [list(COLOURS)[k % 3]]}) for k in range(9 if split == "test" else 36)]
        (vqa / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    multi = tmp_path / "multi"
    scored, said, joint = _fusionzoo(
        ("eval", str(out), "split=test"),
        ("predict", str(out), "--image", str(data / "images" / "0.png"), "--question", "the square is red"),
        ("train", "task=snli-ve+vqa", f"data={data}+vqa-jsonl",
         f"task_data.vqa={{data_dir: {vqa}, data_kwargs: {{image_root: {data}}}}}", "fusion=early_concat",
         "vision=tiny", "text=tiny", "fusion_kwargs.dim=16", "batch_size=6", "max_steps=4", "lr=1e-3",
         "log_with=none", f"output_dir={multi}"))
    assert scored.returncode == 0, scored.stderr[-3000:]
    final = {k: v for k, v in metrics.items() if k not in ("step", "epoch")}
    assert json.loads(scored.stdout.strip().splitlines()[-1]) == final  # the same model, the same split

    assert said.returncode == 0, said.stderr[-3000:]
    assert said.stdout.strip() in ("entailment", "neutral", "contradiction")

    assert joint.returncode == 0, joint.stderr[-3000:]
    both = json.loads(joint.stdout.strip().splitlines()[-1])
    assert {"snli-ve/accuracy_entailment", "snli-ve/macro_f1", "vqa/accuracy"} <= set(both)
    assert both["snli-ve/num_samples"] == 9 and both["vqa/num_samples"] == 9
    assert json.loads((multi / "final" / "multitask.json").read_text())["tasks"] == ["snli-ve", "vqa"]
    assert json.loads((multi / "final" / "snli-ve" / "config.json").read_text())["labels"] == saved["labels"]
