"""Bad input on the command line ends in one short message and a non-zero exit, and removes nothing.

Table-driven: each case runs ``fusionzoo.cli.main`` in this process (the same code path as the
``fusionzoo`` command) and checks the exit code, that stderr is one or two lines naming what is
wrong, that no traceback is printed, and that every file that existed before is still there.
Property-based (hypothesis): config overrides and JSONL records never end in anything but a
configuration or data error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionzoo.cli import main
from fusionzoo.errors import FusionZooError
from fusionzoo.training.config import field_names, load_config

sys.path.insert(0, str(Path(__file__).parent / "training"))
from fixtures import write_vqa_jsonl  # noqa: E402

TINY = ["vision=tiny", "text=tiny", "log_with=none", "max_steps=2", "batch_size=4", "fusion_kwargs.dim=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VQA JSONL dataset, broken copies of it, a finished run and a folder that is not a run."""
    root = tmp_path_factory.mktemp("cli-errors")
    write_vqa_jsonl(root / "vqa", {"train": 16, "test": 4})
    broken = root / "broken-line"
    write_vqa_jsonl(broken, {"train": 8, "test": 4})
    lines = (broken / "train.jsonl").read_text().splitlines()
    lines[1] = '{"question_id": 1, "image": "0001.png", "question": "what colour'  # cut off
    (broken / "train.jsonl").write_text("\n".join(lines) + "\n")
    no_image = root / "no-image-key"
    write_vqa_jsonl(no_image, {"train": 8, "test": 4})
    records = [json.loads(x) for x in (no_image / "train.jsonl").read_text().splitlines()]
    del records[2]["image"]
    (no_image / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    corrupt = root / "corrupt-image"
    write_vqa_jsonl(corrupt, {"train": 8, "test": 4})
    (corrupt / "images" / "0003.png").write_bytes(b"not a png at all")
    (corrupt / "images" / "0009.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a test image
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("keep me")
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- task\n- vqa\n")
    (root / "typo.yaml").write_text("task: vqa\nfusion: early_concat\nbatchsize: 8\n")
    (root / "wrong-type.yaml").write_text("task: vqa\nlr: fast\n")
    assert main(["train", "task=vqa", "fusion=early_concat", "data=vqa-jsonl", f"data_dir={root / 'vqa'}", *TINY,
                 f"output_dir={root / 'finished'}"]) == 0
    return root


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


CASES = [
    # (id, argv with {root}, exit code, words the message must hold)
    ("unknown fusion", ["train", "fusion=albfe"], 2, ["unknown fusion 'albfe'", "Did you mean 'albef'"]),
    ("unknown task", ["train", "task=vqq"], 2, ["unknown task 'vqq'", "'vqa'"]),
    ("unknown dataset", ["train", "data=easy-vqq"], 2, ["unknown dataset 'easy-vqq'", "easy-vqa"]),
    ("unknown vision encoder", ["train", "vision=efficientnet-lite9"], 2, ["efficientnet-lite0"]),
    ("unknown key", ["train", "learning_rate=1"], 2, ["unknown key 'learning_rate'"]),
    ("wrong type", ["train", "batch_size=many"], 2, ["'batch_size'", "integer"]),
    ("fusion kwarg of the wrong type", ["train", "task=vqa", "fusion=early_concat", "data=vqa-jsonl",
                                        "data_dir={root}/vqa", "fusion_kwargs.dim=abc"], 2, ["fusion_kwargs", "'abc'"]),
    ("dataset without its folder", ["train", "data=vqa-jsonl"], 2, ["data_dir="]),
    ("broken JSONL line", ["train", "data=vqa-jsonl", "data_dir={root}/broken-line"], 2,
     ["train.jsonl", "line 2", "not valid JSON"]),
    ("missing key in a record", ["train", "data=vqa-jsonl", "data_dir={root}/no-image-key"], 2,
     ["train.jsonl", "line 3", "missing key 'image'"]),
    ("corrupt image", ["train", "fusion=early_concat", "data=vqa-jsonl", "data_dir={root}/corrupt-image",
                       "max_train_samples=null", "batch_size=8"], 2, ["0003.png", "cannot decode", "skip_bad=true"]),
    ("empty YAML", ["train", "{root}/empty.yaml", "task=vqq"], 2, ["unknown task"]),
    ("YAML that is a list", ["train", "{root}/list.yaml"], 2, ["list.yaml", "mapping"]),
    ("unknown YAML key names its line", ["train", "{root}/typo.yaml"], 2,
     ["typo.yaml, line 3", "unknown key 'batchsize'", "'batch_size'"]),
    ("wrong YAML type names its line", ["train", "{root}/wrong-type.yaml"], 2, ["wrong-type.yaml, line 2", "number"]),
    ("missing YAML file", ["train", "{root}/nope.yaml"], 2, ["nope.yaml", "not found"]),
    ("resume from nothing", ["train", "data=vqa-jsonl", "data_dir={root}/vqa", "resume={root}/nope"], 2,
     ["no such checkpoint folder"]),
    ("output_dir of another run", ["train", "fusion=early_concat", "data=vqa-jsonl", "data_dir={root}/vqa",
                                   "output_dir={root}/finished"], 2, ["holds another run", "resume=auto",
                                                                      "overwrite=true"]),
    ("eval of a folder that is not a run", ["eval", "{root}/not-a-run"], 2, ["not a saved model", "config.json"]),
    ("eval of a missing split", ["eval", "{root}/finished", "split=tset"], 2, ["split", "tset", "test"]),
    ("init_from nothing", ["train", "data=vqa-jsonl", "data_dir={root}/vqa", "init_from={root}/not-a-run"], 2,
     ["init_from", "model.safetensors"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_removes_nothing(case: tuple, world: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, argv, code, words = case
    argv = [a.format(root=world) for a in argv]
    if argv[0] == "train":  # the tiny settings first, so that the case's own keys win; a YAML file stays first
        head = 2 if len(argv) > 1 and argv[1].endswith(".yaml") else 1
        out = [] if any(a.startswith("output_dir=") for a in argv) else [f"output_dir={tmp_path / 'o'}"]
        argv = [*argv[:head], *TINY, *out, *argv[head:]]
    before = _files(world)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("train ", "Loading"))
             and "it/s" not in line and "WARNING" not in line]
    assert 1 <= len(lines) <= 2, err[-3000:]
    assert lines[-1].startswith(f"fusionzoo {argv[0]}: error: "), err[-3000:]
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err[-2000:])
    assert before <= _files(world)  # nothing that existed was removed


def test_debug_shows_the_traceback(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FusionZooError, match="unknown fusion"):
        main(["--debug", "train", "fusion=albfe"])


def test_skip_bad_leaves_out_undecodable_images_in_training_and_evaluation(
        world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(["train", "task=vqa", "fusion=early_concat", "data=vqa-jsonl", f"data_dir={world / 'corrupt-image'}",
                 "skip_bad=true", *TINY, "batch_size=8", "max_steps=3", f"output_dir={out}"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_samples"] == 3  # 4 test images, one of them truncated
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "0003.png" in warned and "0009.png" in warned
    assert main(["eval", str(out), "skip_bad=true"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_samples"] == 3


def test_overwrite_replaces_a_finished_run(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "task=vqa", "fusion=early_concat", "data=vqa-jsonl", f"data_dir={world / 'vqa'}", *TINY,
            f"output_dir={out}"]
    assert main(args) == 0
    first = (out / "final" / "model.safetensors").read_bytes()
    assert main([*args, "seed=7"]) == 2  # refused: the first run is still there, untouched
    assert (out / "final" / "model.safetensors").read_bytes() == first
    assert main([*args, "seed=7", "overwrite=true"]) == 0
    assert (out / "final" / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]


# -- property-based --------------------------------------------------------------------------

KEYS = st.sampled_from(field_names() + ["fusion_kwargs.dim", "head_kwargs.dropout", "lr_", "", "x.y"])
VALUES = st.one_of(st.text(max_size=12), st.integers().map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["true", "null", "[1, 2]", "{a: 1}", "-1", "0", "1e-3", "auto", "~", "{"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4))
def test_config_overrides_never_end_in_a_traceback(overrides: list[str]) -> None:
    try:
        load_config(None, overrides)
    except FusionZooError:
        pass


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
RECORDS = st.fixed_dictionaries({}, optional={"question_id": JSON_VALUES, "image": st.one_of(
    JSON_VALUES, st.sampled_from(["0000.png", "../x.png", "/etc/hostname", "", "missing.png"])),
    "question": JSON_VALUES, "answers": st.one_of(JSON_VALUES, st.lists(st.text(max_size=5), max_size=3))})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(RECORDS, JSON_VALUES), min_size=1, max_size=4), st.booleans())
def test_jsonl_records_never_end_in_a_traceback(world: Path, records: list, skip_bad: bool) -> None:
    from fusionzoo.data.vqa import load_vqa_jsonl

    folder = world / "vqa"
    path = world / "hypothesis_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        load_vqa_jsonl(files={"train": path}, image_root=folder / "images", skip_bad=skip_bad)
    except FusionZooError:
        pass
    finally:
        os.unlink(path)


# -- plug-ins that cannot be imported ----------------------------------------------------------

PLUGIN_CASES = [
    # (id, plug-in source, the one line printed after "fusionzoo: error: ")
    ("syntax error", "def broken(:\n    pass\n", "plugin.py, line 1: invalid syntax: def broken(:"),
    ("indentation error", "if True:\nx = 1\n", "plugin.py, line 2: expected an indented block"),
    ("import error", "import os\nimport fusionzoo_no_such_module\n",
     "plugin.py, line 2: ModuleNotFoundError: No module named 'fusionzoo_no_such_module'"),
    ("exception raised in the plug-in", "def register():\n    raise ValueError('no such width')\n\nregister()\n",
     "plugin.py, line 2: ValueError: no such width"),
]


@pytest.mark.parametrize("case", PLUGIN_CASES, ids=[c[0] for c in PLUGIN_CASES])
def test_broken_plugin_is_one_line_naming_the_file(case: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, source, expected = case
    (tmp_path / "plugin.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUSIONZOO_PLUGINS", raising=False)
    capsys.readouterr()
    assert main(["--import", "plugin.py", "list"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()], captured.err  # one line
    assert captured.err.startswith(f"fusionzoo: error: {expected}"), captured.err


def test_broken_plugin_with_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionzoo.plugins import PluginError

    (tmp_path / "plugin.py").write_text("raise ValueError('no such width')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PluginError, match="plugin.py, line 1: ValueError: no such width") as info:
        main(["--debug", "--import", "plugin.py", "list"])
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ValueError)


def test_plugin_with_a_syntax_error_from_the_command_line(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "plugin.py").write_text("x = (1,\n")
    env = {k: v for k, v in os.environ.items() if k != "FUSIONZOO_PLUGINS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-m", "fusionzoo", "--import", "plugin.py", "list"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "fusionzoo: error: plugin.py, line 1: '(' was never closed: x = (1,\n"


# -- bench --device ------------------------------------------------------------------------------

DEVICE_CASES = [
    # (id, --device, GPUs this "machine" has, words the one line must hold)
    ("not a device", "foo", 0, ["--device 'foo' is not a device", "cpu, cuda, cuda:N", "mps"]),
    ("bad GPU index", "cuda:x", 0, ["--device 'cuda:x' is not a device", "cuda:N"]),
    ("cuda without a GPU", "cuda", 0, ["--device cuda: no CUDA GPU is available", "--device cpu"]),
    ("cuda:N without a GPU", "cuda:1", 0, ["--device cuda:1: no CUDA GPU is available"]),
    ("cuda:N past the last GPU", "cuda:2", 2, ["--device cuda:2: this machine has 2 CUDA GPU(s)", "cuda:1"]),
]


@pytest.mark.parametrize("case", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_bench_refuses_a_device_it_does_not_have_at_once(case: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    _, device, gpus, words = case
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["bench", "--quick", "--device", device, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()], err  # one line
    assert err.startswith("fusionzoo bench: error: --device"), err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and not (tmp_path / "c").exists()  # refused before anything was built or read
