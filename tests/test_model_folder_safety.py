"""load_model reads a model folder as untrusted data: each broken or malicious folder is refused.

Every case edits one file of a freshly saved tiny model and expects a
:class:`~fusionzoo.errors.ModelFolderError` whose message names the file and the key,
while nothing outside the folder is read and timm never gets a keyword that could
name a file (:data:`~fusionzoo.encoders.saved_vision.SAVED_TIMM_KWARGS` only). A normal
folder still loads offline to identical outputs, and saved files get the umask's mode.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import timm
import timm.models
import torch

from fusionzoo.encoders.saved_vision import SAVED_TIMM_KWARGS
from fusionzoo.errors import ModelFolderError
from fusionzoo.factory import create_model
from fusionzoo.model import FusionModel, load_model
from fusionzoo.model_folder import CONFIG_NAME, WEIGHTS_NAME

ANSWERS = ["yes", "no", "2", "red"]
TINY_FUSION = {"dim": 32, "num_layers": 1, "num_heads": 2}
QUESTIONS = ["what colour is the ball?", "is there a dog?"]


def build(vision: Any = "tiny") -> FusionModel:
    torch.manual_seed(0)
    return create_model("vqa", "early_concat", vision, "tiny", pretrained=False, answers=ANSWERS,
                        fusion_kwargs=TINY_FUSION).eval()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[FusionModel, Path]:
    """One saved tiny VQA model; each test works on its own copy."""
    model = build()
    return model, model.save_pretrained(tmp_path_factory.mktemp("template") / "model")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the model holding sentinel files that loading must never read."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "sentinel.txt").write_text("never read me\n")
    (folder / "config.json").write_text(json.dumps({"architecture": "test_vit", "model_args": {"img_size": 32}}))
    return folder


@pytest.fixture
def folder(template: tuple[FusionModel, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(template[1], tmp_path / "models" / "model"))


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Record every file read and every timm.create_model call; check both after the test.

    Nothing under ``tmp_path/outside`` may be read, and timm gets no pretrained weights
    and no keyword beyond the allow-list.
    """
    read: list[Path] = []
    calls: list[dict[str, Any]] = []

    def record(file: Any) -> None:
        if isinstance(file, (str, os.PathLike)):
            read.append(Path(os.fsdecode(file)).resolve())

    def spy_open(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if not set(mode) & set("wax+"):
                record(file)
            return real(file, mode, *args, **kwargs)
        return wrapper

    def spy_os_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if not flags & (os.O_WRONLY | os.O_RDWR):
            record(file)
        return real_os_open(file, flags, *args, **kwargs)

    def spy_load_model(model: Any, filename: Any, *args: Any, **kwargs: Any) -> Any:
        record(filename)  # safetensors reads in Rust: record the path it is handed
        return real_load_model(model, filename, *args, **kwargs)

    real_os_open, real_load_model = os.open, safetensors.torch.load_model
    monkeypatch.setattr(builtins, "open", spy_open(builtins.open))
    monkeypatch.setattr(io, "open", spy_open(io.open))
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(safetensors.torch, "load_model", spy_load_model)
    real_create = timm.create_model

    def create(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append({"name": name, **kwargs})
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    forbidden = (tmp_path / "outside").resolve()
    assert not [p for p in read if p.is_relative_to(forbidden)], "read a file outside the model folder"
    allowed = set(SAVED_TIMM_KWARGS) | {"name", "pretrained", "num_classes"}
    for call in calls:
        assert call.get("pretrained") is False and set(call) <= allowed, call


def edit_config(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def assert_refused(folder: Path, match: str, file: Path | None = None, **kwargs: Any) -> ModelFolderError:
    with pytest.raises(ModelFolderError, match=match) as info:
        load_model(folder, **kwargs)
    assert str(file or folder / CONFIG_NAME) in str(info.value), "the message names the file"
    return info.value


def logits(model: FusionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def inputs_for(model: FusionModel) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 32, 32), **model.text.tokenize(QUESTIONS)}


# -- config.json: what it may not ask for -----------------------------------------------------

def set_vision_spec(spec: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config["vision"].__setitem__("spec", spec)


SENTINEL = "<outside>/sentinel.txt"  # replaced by the sentinel's real path

BAD_CONFIGS = {
    "checkpoint_path kwarg of a preset": (
        set_vision_spec({"preset": "tiny", "kwargs": {"checkpoint_path": SENTINEL}}),
        r"'vision\.spec\.kwargs\.checkpoint_path' is not accepted"),
    "checkpoint_path kwarg of a timm name": (
        set_vision_spec({"name": "test_vit",
                         "kwargs": {"img_size": 32, "checkpoint_path": "../../../../etc/hostname"}}),
        r"'vision\.spec\.kwargs\.checkpoint_path' is not accepted"),
    "pretrained_cfg_overlay kwarg": (
        set_vision_spec({"name": "test_vit", "kwargs": {"pretrained_cfg_overlay": {"file": SENTINEL}}}),
        r"'vision\.spec\.kwargs\.pretrained_cfg_overlay' is not accepted"),
    "unknown kwarg": (
        set_vision_spec({"preset": "tiny", "kwargs": {"img_size": 32, "mystery": 1}}),
        r"'vision\.spec\.kwargs\.mystery' is not accepted.*img_size"),
    "kwarg of the wrong kind": (
        set_vision_spec({"preset": "tiny", "kwargs": {"img_size": "32"}}),
        r"'vision\.spec\.kwargs\.img_size' must be a positive int"),
    "unknown spec key": (
        set_vision_spec({"preset": "tiny", "weights": SENTINEL}), r"'vision\.spec\.weights' is not accepted"),
    "local-dir escaping the folder": (
        set_vision_spec({"name": "local-dir:../../../../etc"}), r"'vision\.spec\.name'.*outside the model folder"),
    "local-dir to an absolute path outside": (
        set_vision_spec({"name": "local-dir:<outside>"}), r"'vision\.spec\.name'.*outside the model folder"),
    "hf-hub name without allow_download": (
        set_vision_spec({"name": "hf-hub:timm/test_vit.r160_in1k"}),
        r"'vision\.spec\.name'.*Hugging Face hub.*allow_download=True"),
    "unknown data_config key": (
        lambda config: config["vision"]["data_config"].__setitem__("auto_augment", "rand-m9"),
        r"'vision\.data_config\.auto_augment' is not accepted"),
    "data_config of the wrong kind": (
        lambda config: config["vision"]["data_config"].__setitem__("input_size", [3, "32", 32]),
        r"'vision\.data_config\.input_size' must be a list"),
    "tokenizer_size of the wrong kind": (
        lambda config: config["text"].__setitem__("tokenizer_size", "many"), r"'text\.tokenizer_size' must be"),
    "unknown fusion keyword": (
        lambda config: config["fusion"]["config"].__setitem__("bogus", 1),
        r"'fusion\.config' does not build the fusion.*bogus"),
    "answers not a list": (lambda config: config.__setitem__("answers", "yes"), r"'answers' must be a list of strings"),
    "duplicated answers": (
        lambda config: config.__setitem__("answers", ["yes", "yes", "no", "2"]), r"'answers'.*duplicates"),
    "task not a name": (lambda config: config.__setitem__("task", 5), r"'task' must be the name of a registered task"),
    "newer format": (lambda config: config.__setitem__("format_version", 99), r"format_version 99 is newer"),
    "max_text_len of the wrong kind": (
        lambda config: config.__setitem__("max_text_len", "32"), r"'max_text_len' must be"),
}


def _with_outside(value: Any, outside: Path) -> Any:
    """``value`` with the ``<outside>`` placeholder replaced by the real folder."""
    return json.loads(json.dumps(value).replace("<outside>", str(outside)))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_config_json_asking_for_more_than_an_architecture_is_refused(case: str, folder: Path, outside: Path) -> None:
    change, match = BAD_CONFIGS[case]
    edit_config(folder, lambda config: (change(config), config.update(_with_outside(config, outside))))
    assert_refused(folder, match)


@pytest.mark.parametrize("key", [
    "format_version", "task", "fusion.name", "fusion.config", "head.name", "head.kwargs",
    "vision.spec", "vision.data_config", "vision.data_config.mean", "text.spec", "answers",
])
def test_a_missing_key_is_named(key: str, folder: Path) -> None:
    def remove(config: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        for part in parents:
            config = config[part]
        del config[last]

    edit_config(folder, remove)
    assert_refused(folder, rf"missing key '{key}'")


# -- the folder's files ------------------------------------------------------------------------

def move_outside(name: str) -> Callable[[Path, Path], None]:
    """Move ``folder/name`` outside and leave a symlink to it in its place."""
    def damage(folder: Path, outside: Path) -> None:
        target = outside / name.replace("/", "_")
        shutil.move(folder / name, target)
        (folder / name).symlink_to(target)
    return damage


def rewrite(name: str, change: Callable[[str], str]) -> Callable[[Path, Path], None]:
    def damage(folder: Path, outside: Path) -> None:
        path = folder / name
        path.write_text(change(path.read_text()).replace("<outside>", str(outside)))
    return damage


def remove(name: str) -> Callable[[Path, Path], None]:
    def damage(folder: Path, outside: Path) -> None:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def other_weights(folder: Path, outside: Path) -> None:
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(folder / WEIGHTS_NAME))


def tokenizer_vocabulary(size: int) -> Callable[[str], str]:
    """A tokenizer.json whose WordPiece vocabulary is cut to ``size`` tokens (or grown to it)."""
    def change(text: str) -> str:
        tokenizer = json.loads(text)
        vocab = {token: i for token, i in tokenizer["model"]["vocab"].items() if i < size}
        vocab.update({f"extra{i}": i for i in range(len(vocab), size)})
        tokenizer["model"]["vocab"] = vocab
        return json.dumps(tokenizer)
    return change


def json_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        value = json.loads(text)
        change(value)
        return json.dumps(value)
    return edit


#: case: (damage, what the message matches, the file or folder it names)
BROKEN_FOLDERS = {
    "config.json not JSON": (
        rewrite(CONFIG_NAME, lambda text: text[: len(text) // 2]), r"config\.json is not valid JSON", CONFIG_NAME),
    "config.json not an object": (
        rewrite(CONFIG_NAME, lambda text: "[1, 2]"), r"config\.json: expected a JSON object", CONFIG_NAME),
    "config.json a symlink outside": (
        move_outside(CONFIG_NAME), r"resolves to .*outside the model folder", CONFIG_NAME),
    "weights a symlink outside": (
        move_outside(WEIGHTS_NAME), r"model\.safetensors resolves to .*outside the model folder", WEIGHTS_NAME),
    "text_encoder config a symlink outside": (
        move_outside("text_encoder/config.json"), r"outside the model folder", "text_encoder/config.json"),
    "tokenizer.json a symlink outside": (
        move_outside("tokenizer/tokenizer.json"), r"outside the model folder", "tokenizer/tokenizer.json"),
    "tokenizer folder a symlink outside": (
        move_outside("tokenizer"), r"tokenizer resolves to .*outside the model folder", "tokenizer"),
    "tokenizer.json missing": (
        remove("tokenizer/tokenizer.json"), r"tokenizer\.json not found.*\[UNK\]", "tokenizer/tokenizer.json"),
    "tokenizer_config.json missing": (
        remove("tokenizer/tokenizer_config.json"), r"tokenizer_config\.json not found",
        "tokenizer/tokenizer_config.json"),
    "text_encoder folder missing": (remove("text_encoder"), r"text_encoder not found", "text_encoder"),
    "smaller vocabulary": (
        rewrite("tokenizer/tokenizer.json", tokenizer_vocabulary(1000)),
        r"the tokenizer has 1000 tokens but .*'text\.tokenizer_size' says 30522", "tokenizer"),
    "larger vocabulary": (
        rewrite("tokenizer/tokenizer.json", tokenizer_vocabulary(30600)),
        r"do not rebuild a text encoder.*30600 tokens", "tokenizer"),
    "tokenizer_config vocab outside": (
        rewrite("tokenizer/tokenizer_config.json",
                json_edit(lambda config: config.__setitem__("vocab", "<outside>/sentinel.txt"))),
        r"tokenizer_config\.json: key 'vocab' names the file .*sentinel\.txt", "tokenizer/tokenizer_config.json"),
    "weights of another architecture": (
        other_weights, r"model\.safetensors does not fit the architecture", WEIGHTS_NAME),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_a_broken_or_escaping_folder_is_refused(case: str, folder: Path, outside: Path) -> None:
    damage, match, named = BROKEN_FOLDERS[case]
    damage(folder, outside)
    assert_refused(folder, match, file=folder / named)


def test_an_old_folder_without_tokenizer_size_checks_the_embedding_table(folder: Path) -> None:
    edit_config(folder, lambda config: config["text"].pop("tokenizer_size"))
    assert load_model(folder).text.vocab_size == 30522  # a whole tokenizer still loads
    rewrite("tokenizer/tokenizer.json", tokenizer_vocabulary(1000))(folder, folder)
    assert_refused(folder, r"the tokenizer has 1000 tokens but the embedding table .* has 30522 rows",
                   file=folder / "tokenizer")


def test_missing_files_are_also_file_not_found_errors(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelFolderError, match=r"model\.safetensors not found"):
        load_model(folder)


def test_a_runs_output_dir_names_its_final_folder(tmp_path: Path, folder: Path) -> None:
    """load_model of a training run's output_dir says where the model is (the commands resolve it themselves)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.move(str(folder), run / "final")
    with pytest.raises(ModelFolderError, match=r"training run's output_dir.*load_model\('.*final'\)"):
        load_model(run)
    assert isinstance(load_model(run / "final"), FusionModel)


# -- encoders that must still load --------------------------------------------------------------

def test_round_trip_is_identical_and_offline(template: tuple[FusionModel, Path], folder: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_model went to the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(timm.models, "load_model_config_from_hf", no_network)
    model = template[0]
    loaded = load_model(folder)
    inputs = inputs_for(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert loaded.config["vision"] == model.config["vision"]


def test_a_timm_name_with_a_recorded_checkpoint_loads_without_opening_it(tmp_path: Path, outside: Path) -> None:
    checkpoint = outside / "test_vit.safetensors"
    source = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    safetensors.torch.save_file(source.state_dict(), str(checkpoint))
    model = build({"name": "test_vit", "checkpoint": str(checkpoint), "kwargs": {"img_size": 32}})
    folder = model.save_pretrained(tmp_path / "model")
    loaded = load_model(folder)  # the guard checks the checkpoint is never opened
    assert loaded.config["vision"]["spec"]["checkpoint"] == str(checkpoint)  # kept as a record
    inputs = inputs_for(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_local_dir_inside_the_folder_loads_and_its_model_args_are_checked(
        template: tuple[FusionModel, Path], folder: Path, outside: Path) -> None:
    (folder / "arch").mkdir()
    timm_config = folder / "arch" / "config.json"
    timm_config.write_text(json.dumps({"architecture": "test_vit", "model_args": {"img_size": 32}}))
    edit_config(folder, set_vision_spec({"name": "local-dir:arch"}))
    inputs = inputs_for(template[0])
    assert torch.equal(logits(load_model(folder), inputs), logits(template[0], inputs))

    timm_config.write_text(json.dumps({"architecture": "test_vit", "model_args": {"checkpoint_path": str(outside)}}))
    assert_refused(folder, r"'model_args\.checkpoint_path' is not accepted", file=timm_config)
    shutil.rmtree(folder / "arch")
    (folder / "arch").symlink_to(outside)  # holds a valid timm config.json, but outside
    assert_refused(folder, r"'vision\.spec\.name' names local-dir:arch.*outside the model folder")


def test_a_hub_name_needs_allow_download_and_its_config_is_checked(
        template: tuple[FusionModel, Path], folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []
    hub_config: dict[str, Any] = {"img_size": 32}

    def fake_hub(model_id: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
        fetched.append(model_id)
        return {"hf_hub_id": model_id}, "test_vit", dict(hub_config)

    monkeypatch.setattr(timm.models, "load_model_config_from_hf", fake_hub)
    edit_config(folder, set_vision_spec({"name": "hf-hub:someone/test_vit"}))
    assert_refused(folder, r"allow_download=True")
    assert not fetched
    inputs = inputs_for(template[0])
    assert torch.equal(logits(load_model(folder, allow_download=True), inputs), logits(template[0], inputs))
    assert fetched == ["someone/test_vit"]

    hub_config["checkpoint_path"] = "/etc/hostname"
    hub_match = r"hub config of 'hf-hub:someone/test_vit'.*'model_args\.checkpoint_path' is not accepted"
    with pytest.raises(ModelFolderError, match=hub_match):
        load_model(folder, allow_download=True)


# -- file modes ---------------------------------------------------------------------------------

def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def expected_modes(folder: Path, file_mode: int, dir_mode: int) -> dict[str, int]:
    return {str(p.relative_to(folder)): dir_mode if p.is_dir() else file_mode for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_saved_files_get_the_mode_the_umask_allows(template: tuple[FusionModel, Path], tmp_path: Path,
                                                   umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        folder = template[0].save_pretrained(tmp_path / "new")
        template[0].save_pretrained(tmp_path / "new")  # into an existing folder too
    finally:
        os.umask(old)
    assert modes(folder) == expected_modes(folder, file_mode, dir_mode)
    assert modes(folder)[WEIGHTS_NAME] == file_mode


def test_pretraining_exports_get_the_same_modes(tmp_path: Path) -> None:
    from fusionzoo.training.config import load_config
    from fusionzoo.training.pretrain import pretrain_base_config
    from fusionzoo.training.pretrain_model import build_pretrain_model

    fusion = 'fusion_kwargs={"dim": 32, "embed_dim": 16, "num_layers": 1, "num_heads": 2}'
    config = load_config(None, ["vision=tiny", "text=tiny", fusion], base=pretrain_base_config())
    old = os.umask(0o022)
    try:
        folder = build_pretrain_model(config, pretrained=False).save_pretrained(tmp_path / "export")
    finally:
        os.umask(old)
    assert modes(folder) == expected_modes(folder, 0o644, 0o755)
