"""The saved model folder: writing it atomically, reading it back as untrusted data.

A folder written by :meth:`~fusionzoo.model.FusionModel.save_pretrained` holds
``config.json`` (the model config of :mod:`fusionzoo.model_config` plus ``format_version``
and ``fusionzoo_version``; written last, so its presence marks a complete save),
``model.safetensors`` (every weight, never a pickle), ``text_encoder/config.json``,
``tokenizer/`` and ``README.md``, the model card (:mod:`fusionzoo.model_card`).

* :func:`save_folder` writes those files into a staging folder and
  :func:`publish_folder` moves them into place so that a crash never leaves a folder
  that loads as a half-written model (pretraining exports publish the same way).
* :func:`load_folder` rebuilds the architecture from config.json without downloading
  anything and loads the weights strictly. It reads the folder as data: timm gets only
  allow-listed architecture keywords, every file must lie inside the folder (symlinks
  included), the tokenizer must fit the text encoder, and a hub name needs
  ``allow_download=True``. Each error names the file and the key. ``directory`` may also be
  a Hub repo id (``owner/name``), fetched into the Hub cache (:mod:`fusionzoo.hub`).

This module knows the model's parts, not the :class:`~fusionzoo.model.FusionModel`
class: :func:`load_folder` is given the class to assemble the parts with.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import safetensors.torch
from torch import nn

from .alignment import Alignment
from .encoders import TextEncoder
from .encoders.saved_vision import rebuild_saved_vision_encoder
from .encoders.text import CONFIG_DIR, TOKENIZER_DIR
from .errors import MissingModelFileError, ModelFolderError
from .hub import resolve_model_folder
from .lora import (ADAPTERS_NAME, BASE_NAME, ENCODER_PARTS, LoraSpec, add_lora, check_sources, load_base,
                   preset_encoders, split_state, verify_base)
from .model_card import CARD_NAME, model_card, read_card_sources
from .model_config import check_vocabulary
from .registry import FUSIONS, HEADS, TASKS, RegistryError
from .version import __version__

#: Version of the checkpoint layout written by :func:`save_folder`.
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: What marks a multi-task model's folder (one model folder per task inside; :mod:`fusionzoo.multitask`).
MULTITASK_NAME = "multitask.json"

M = TypeVar("M", bound=nn.Module)


# -- writing ------------------------------------------------------------------------------------
def save_folder(directory: str | os.PathLike, model: nn.Module, text: TextEncoder, config: dict[str, Any]) -> Path:
    """Write ``model``'s weights, ``text``'s config and tokenizer and ``config`` into ``directory``, atomically.

    See :meth:`~fusionzoo.model.FusionModel.save_pretrained`; ``config`` is the model config,
    to which ``format_version``, ``fusionzoo_version`` and ``text.tokenizer_size`` are added.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save a model to {directory}: it exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "fusionzoo_version": __version__, **config}
    # load_folder checks the tokenizer it finds against this (a lost tokenizer.json leaves 5 tokens)
    config["text"] = {**config.get("text", {}), "tokenizer_size": len(text.tokenizer)}
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    try:
        if config.get("lora"):
            config["lora"] = {**config["lora"], "base": _save_lora_tensors(model, staging)}
        else:
            safetensors.torch.save_model(model, str(staging / WEIGHTS_NAME), force_contiguous=True)
        text.save_config(staging)
        # The card: the run's dataset and last evaluation come from a run.json already in the folder.
        _, run = read_card_sources(directory) if directory.is_dir() else (None, None)
        (staging / CARD_NAME).write_text(model_card(config, run))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        publish_folder(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _save_lora_tensors(model: nn.Module, staging: Path) -> dict[str, Any]:
    """adapters.safetensors (and base.safetensors where a preset does not rebuild the base); the sources."""
    adapters, base, sources = split_state(model, preset_encoders(model))
    shared = {t.data_ptr() for t in base.values()} | {
        p.data_ptr() for part in ENCODER_PARTS for p in getattr(model, part).parameters()}
    # a tensor tied to an encoder's base (a head sharing the word embeddings) comes back with that base
    adapters = {k: v for k, v in adapters.items() if v.data_ptr() not in shared or ".lora_" in k}
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in adapters.items()}, str(staging / ADAPTERS_NAME))
    if base:
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in base.items()}, str(staging / BASE_NAME))
    return sources


def _apply_umask(staging: Path) -> None:
    """Give every folder 0777 and every file 0666 less the umask, as ``mkdir`` and ``open`` would.

    ``mkdtemp`` makes the staging folder private (0700) and safetensors writes its file 0600.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def publish_folder(staging: Path, target: Path) -> None:
    """Move the files of ``staging`` into ``target`` so that a crash leaves no loadable half-model.

    A new folder is one atomic rename. Into an existing folder, its old
    config.json is removed first, the other entries are replaced one by one
    (each an atomic rename), and the new config.json comes last. Every file and
    folder gets the mode the umask allows.
    """
    _apply_umask(staging)
    if not target.exists():
        os.rename(staging, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        if (target / CONFIG_NAME).exists():
            os.replace(target / CONFIG_NAME, trash / CONFIG_NAME)
        for entry in sorted(staging.iterdir()):
            if entry.name == CONFIG_NAME:
                continue
            destination = target / entry.name
            if destination.exists() or destination.is_symlink():
                os.replace(destination, trash / entry.name)
            os.replace(entry, destination)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# -- loading ------------------------------------------------------------------------------------
def load_folder(directory: str | os.PathLike, build: Callable[..., M], *, allow_download: bool = False) -> M:
    """The model saved in ``directory``: its parts rebuilt from config.json, assembled by ``build``, weights loaded.

    See :meth:`~fusionzoo.model.FusionModel.from_pretrained` for what is checked and raised.

    Args:
        directory: the saved folder.
        build: called as ``build(vision, text, fusion, head, config, align=align)`` with the
            rebuilt modules and the model config (config.json less its format keys);
            :class:`~fusionzoo.model.FusionModel` itself.
        allow_download: let an ``hf-hub:`` image encoder name fetch its timm config.
    Returns:
        the model, with the weights of model.safetensors loaded strictly and the encoders
        frozen again if the config says so; in the mode ``build`` left it.
    """
    folder = resolve_model_folder(directory)  # a local folder, or a Hub repo id's cached snapshot
    config_path = folder / CONFIG_NAME
    config = _read_config(folder)

    def get(key: str, kind: type | tuple[type, ...] | None = None, expected: str = "") -> Any:
        return _get(config, config_path, key, kind, expected)

    version = get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ModelFolderError(
            f"{config_path}: format_version {version!r} is newer than this fusionzoo reads "
            f"({FORMAT_VERSION}); upgrade fusionzoo (the model was saved by fusionzoo "
            f"{config.get('fusionzoo_version', '?')})"
        )
    task_spec = _lookup(TASKS, get("task"), config_path, "task")
    fusion_cls = _lookup(FUSIONS, get("fusion.name"), config_path, "fusion.name")
    head_cls = _lookup(HEADS, get("head.name"), config_path, "head.name")
    fusion_config = get("fusion.config", dict, "an object")
    head_kwargs = get("head.kwargs", dict, "an object")
    vocabulary = _saved_vocabulary(config, config_path, task_spec)
    _check_optional(config, config_path)

    vision = rebuild_saved_vision_encoder(
        get("vision.spec"), get("vision.data_config"),
        folder=folder, config_path=config_path, allow_download=allow_download,
    )
    text = _load_text_encoder(folder, config_path, get("text.spec", (dict, str), "an object"),
                              get("text", dict, "an object").get("tokenizer_size"))
    with _as_folder_error(config_path, "fusion.config", "does not build the fusion"):
        fusion = fusion_cls(text.out_dim, vision.out_dim, **fusion_config)
    with _as_folder_error(config_path, "head.kwargs", "does not build the head"):
        head = head_cls.from_parts(fusion, text, vocabulary, **head_kwargs)
    align = None
    if config.get("align") is not None:
        align_config = get("align", dict, "an object or null")
        with _as_folder_error(config_path, "align", "does not build the alignment"):
            align = Alignment(text.out_dim, vision.out_dim, **align_config)
    model_config = {k: v for k, v in config.items() if k not in ("format_version", "fusionzoo_version")}
    with _as_folder_error(config_path, "task", "does not describe a model that fits together"):
        model = build(vision, text, fusion, head, model_config, align=align)
    if config.get("lora") is not None:
        _load_lora(model, folder, config_path, config["lora"])
    else:
        _load_weights(model, folder / WEIGHTS_NAME, config_path)
    if config.get("freeze_encoders"):
        vision.freeze()
        text.freeze()
    return model


def _lookup(registry: Any, name: Any, config_path: Path, key: str) -> Any:
    """``registry.get(name)`` with an error that names the checkpoint file and key."""
    if not isinstance(name, str):
        raise ModelFolderError(
            f"{config_path}: key {key!r} must be the name of a registered {registry.kind}, got {name!r}"
        )
    try:
        return registry.get(name)
    except RegistryError as exc:
        raise RegistryError(
            f"{config_path}: key {key!r} names {registry.kind} {name!r}, which is not registered. {exc} "
            f"If it comes from a plug-in, import that module (or pass --import) before loading."
        ) from exc


# -- reading a model folder as data -------------------------------------------------------------
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"  # the vocabulary of a tokenizers-backed ("fast") tokenizer


def _check_inside(folder: Path, path: Path) -> None:
    """A ModelFolderError unless ``path`` resolves (symlinks followed) inside ``folder``."""
    root, resolved = folder.resolve(), path.resolve()
    if not resolved.is_relative_to(root):
        raise ModelFolderError(
            f"{path} resolves to {resolved}, outside the model folder {root}: a model folder holds its own "
            "files (a symlink in it may only point inside it)"
        )


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a ModelFolderError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def weight_files(folder: Path, config: dict[str, Any] | None = None) -> list[Path]:
    """The weight files a saved folder loads: model.safetensors, or a LoRA model's adapters (and base)."""
    lora = (config if config is not None else read_json_object(folder / CONFIG_NAME)).get("lora")
    if not lora:
        return [folder / WEIGHTS_NAME]
    return [folder / name for name in (ADAPTERS_NAME, BASE_NAME) if name == ADAPTERS_NAME or (folder / name).exists()]


def _read_config(folder: Path) -> dict[str, Any]:
    """config.json of ``folder``, once it and its weights (model.safetensors) are known to be files inside it."""
    if not folder.is_dir():
        raise MissingModelFileError(f"no saved fusionzoo model at {folder}: the folder does not exist")
    if not (folder / CONFIG_NAME).is_file() and (folder / MULTITASK_NAME).is_file():
        tasks = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        raise MissingModelFileError(
            f"{folder} holds a multi-task model ({MULTITASK_NAME}): load one task's model from its folder "
            f"({', '.join(str(folder / t) for t in tasks)}) or all of them with "
            "fusionzoo.multitask.load_multitask_model")
    final = folder / "final"
    if not (folder / CONFIG_NAME).is_file() and ((final / CONFIG_NAME).is_file() or (final / MULTITASK_NAME).is_file()):
        # the commands take a run's output_dir for its final/; load_model takes the model folder itself
        raise MissingModelFileError(
            f"{folder} is a training run's output_dir, not a saved model: its model is {final} "
            f"(fusionzoo.load_model({str(final)!r}); the fusionzoo commands take either)")
    _require_file(folder, folder / CONFIG_NAME, WEIGHTS_NAME)
    config = read_json_object(folder / CONFIG_NAME)
    for path in weight_files(folder, config):
        _require_file(folder, path, path.name)
    return config


def _require_file(folder: Path, path: Path, weights: str) -> None:
    if not path.is_file():
        raise MissingModelFileError(
            f"{path} not found: a model saved by FusionModel.save_pretrained has {CONFIG_NAME} and "
            f"{weights} (a folder without {CONFIG_NAME} is an incomplete save)")
    _check_inside(folder, path)


def _get(config: dict[str, Any], config_path: Path, key: str, kind: type | tuple[type, ...] | None = None,
         expected: str = "") -> Any:
    """``config[a][b]`` for ``key="a.b"``; a ModelFolderError naming the key if it is missing or not ``kind``."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ModelFolderError(f"{config_path}: missing key {key!r}")
        value = value[part]
    if kind is not None and not isinstance(value, kind):
        raise ModelFolderError(f"{config_path}: key {key!r} must be {expected}, got {value!r}")
    return value


def _saved_vocabulary(config: dict[str, Any], config_path: Path, task_spec: Any) -> list[str] | None:
    """The ``answers`` / ``labels`` of config.json for the task, checked as create_model checks them."""
    key = task_spec.vocabulary_key
    if not key:
        return None
    value = _get(config, config_path, key, list, "a list of strings")
    with _as_folder_error(config_path, key, "is not a valid output vocabulary"):
        return check_vocabulary(config["task"], key, {key: value})


def _check_optional(config: dict[str, Any], config_path: Path) -> None:
    """``max_text_len`` (an int >= 2) and ``freeze_encoders`` (a bool), where config.json has them."""
    max_text_len = config.get("max_text_len", 32)
    if not isinstance(max_text_len, int) or isinstance(max_text_len, bool) or max_text_len < 2:
        raise ModelFolderError(f"{config_path}: key 'max_text_len' must be an int >= 2, got {max_text_len!r}")
    if not isinstance(config.get("freeze_encoders", False), bool):
        raise ModelFolderError(f"{config_path}: key 'freeze_encoders' must be true or false, "
                               f"got {config['freeze_encoders']!r}")


@contextlib.contextmanager
def _as_folder_error(config_path: Path, key: str, what: str) -> Iterator[None]:
    """Turn a ValueError / TypeError raised while building from ``key`` into a ModelFolderError naming it."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ModelFolderError):
            raise
        raise ModelFolderError(f"{config_path}: key {key!r} {what}: {exc}") from exc


def _check_text_files(folder: Path) -> None:
    """text_encoder/ and tokenizer/ hold their files, all inside the folder, and name no file elsewhere.

    A tokenizer_config.json may not point the tokenizer at a vocabulary outside tokenizer/
    (transformers opens a string under ``vocab``, ``merges`` or a ``*_file`` key as a path).
    """
    for name in (CONFIG_DIR, TOKENIZER_DIR):
        path = folder / name
        if not path.is_dir():
            raise MissingModelFileError(
                f"{path} not found: a model saved by FusionModel.save_pretrained has the folders "
                f"{CONFIG_DIR}/ and {TOKENIZER_DIR}/ (written by TextEncoder.save_config)"
            )
        _check_inside(folder, path)
        for entry in sorted(path.rglob("*")):
            _check_inside(folder, entry)
    tokenizer_dir = folder / TOKENIZER_DIR
    expected = [folder / CONFIG_DIR / CONFIG_NAME, tokenizer_dir / TOKENIZER_CONFIG]
    for path in expected:
        if not path.is_file():
            raise MissingModelFileError(f"{path} not found: TextEncoder.save_config writes it into every saved model")
    read_json_object(folder / CONFIG_DIR / CONFIG_NAME)
    tokenizer_config = read_json_object(tokenizer_dir / TOKENIZER_CONFIG)
    backend = tokenizer_config.get("backend", "tokenizers")
    if backend == "tokenizers" and not (tokenizer_dir / TOKENIZER_FILE).is_file():
        raise MissingModelFileError(
            f"{tokenizer_dir / TOKENIZER_FILE} not found: {tokenizer_dir / TOKENIZER_CONFIG} describes a "
            f"tokenizers-backed tokenizer, whose vocabulary is that file (without it every word would be [UNK])"
        )
    inside = tokenizer_dir.resolve()
    for key, value in tokenizer_config.items():
        if key in ("vocab", "merges") or key.endswith("_file"):
            paths = [value]
        elif key.endswith("_files"):
            paths = value if isinstance(value, list) else [value]
        else:
            continue
        for item in paths:
            if isinstance(item, str) and item and not Path(item).resolve().is_relative_to(inside):
                raise ModelFolderError(
                    f"{tokenizer_dir / TOKENIZER_CONFIG}: key {key!r} names the file {item!r}, outside {inside}; "
                    f"a saved tokenizer keeps its files in {TOKENIZER_DIR}/ under their standard names"
                )


def _load_text_encoder(folder: Path, config_path: Path, spec: Any, tokenizer_size: Any) -> TextEncoder:
    """The text encoder of text_encoder/ and tokenizer/, its tokenizer checked against the embedding table.

    ``tokenizer_size`` (config.json's ``text.tokenizer_size``, written since it was added) is the
    tokenizer length saved with the model; folders without it must have exactly one embedding
    row per token.
    """
    if tokenizer_size is not None and not (type(tokenizer_size) is int and tokenizer_size > 0):
        raise ModelFolderError(
            f"{config_path}: key 'text.tokenizer_size' must be a positive int, got {tokenizer_size!r}"
        )
    _check_text_files(folder)
    config_dir, tokenizer_dir = folder / CONFIG_DIR, folder / TOKENIZER_DIR
    try:
        text = TextEncoder.from_saved(folder, spec)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(
            f"{config_dir / CONFIG_NAME} and {tokenizer_dir}/ do not rebuild a text encoder: {exc}"
        ) from exc
    tokens, rows = len(text.tokenizer), text.vocab_size
    expected = rows if tokenizer_size is None else tokenizer_size
    if tokens != expected:
        if tokenizer_size is None:
            said = f"the embedding table of {config_dir / CONFIG_NAME} has {rows} rows"
        else:
            said = f"{config_path} key 'text.tokenizer_size' says {tokenizer_size} (embedding table: {rows} rows)"
        raise ModelFolderError(
            f"{tokenizer_dir}/: the tokenizer has {tokens} tokens but {said}; a tokenizer file is missing or "
            "comes from another model (save_pretrained writes the tokenizer the model was trained with)"
        )
    return text


def _load_lora(model: nn.Module, folder: Path, config_path: Path, lora: Any) -> None:
    """Base weights (from the presets or base.safetensors), then the adapters, loaded so every tensor is set."""
    if not isinstance(lora, dict):
        raise ModelFolderError(f"{config_path}: key 'lora' must be an object, got {lora!r}")
    with _as_folder_error(config_path, "lora", "does not describe LoRA adapters"):
        spec = LoraSpec(**{k: v for k, v in lora.items() if k != "base"})
        sources = check_sources(lora.get("base"), str(config_path))
    with _as_folder_error(config_path, "lora.base", "names a preset that does not build"):
        for part, encoder in preset_encoders(model).items():
            if sources[part]["source"] == "preset":
                load_base(model, part, encoder)
    model.config.pop("lora", None)  # add_lora records it again, less the base sources
    add_lora(model, spec)
    tensors = {}
    for name in (ADAPTERS_NAME, BASE_NAME):
        path = folder / name
        if name == ADAPTERS_NAME or any(s["source"] == "saved" for s in sources.values()):
            _check_inside(folder, path)
            if not path.is_file():
                raise MissingModelFileError(f"{path}: missing (config.json {config_path} has key 'lora')")
            tensors.update(safetensors.torch.load_file(str(path)))
    from_presets = {n for part in ENCODER_PARTS if sources[part]["source"] == "preset"
                    for n, _ in getattr(model, part).named_parameters(prefix=part) if ".lora_" not in n}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise ModelFolderError(f"{folder / ADAPTERS_NAME} does not fit the architecture {config_path} "
                               f"describes: {exc}") from exc
    tied = _tied_names(model)
    left = [k for k in missing if k not in from_presets and k not in tied]
    if left or unexpected:
        raise ModelFolderError(f"{folder / ADAPTERS_NAME} does not fit the architecture {config_path} describes: "
                               f"missing {left[:5]}, unexpected {list(unexpected)[:5]}")
    with _as_folder_error(config_path, "lora.base", "does not match the base weights"):
        verify_base(model, sources, str(config_path))


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors that share storage with an encoder's parameters (tied weights)."""
    encoder_ptrs = {p.data_ptr() for part in ENCODER_PARTS for p in getattr(model, part).parameters()}
    return {k for k, v in model.state_dict().items()
            if v.data_ptr() in encoder_ptrs and not k.startswith(ENCODER_PARTS)}


def _load_weights(model: nn.Module, weights_path: Path, config_path: Path) -> None:
    """Load model.safetensors strictly; a ModelFolderError if it does not fit the architecture."""
    try:
        safetensors.torch.load_model(model, str(weights_path), strict=True)
    except (RuntimeError, safetensors.SafetensorError) as exc:
        raise ModelFolderError(
            f"{weights_path} does not fit the architecture {config_path} describes: {exc}"
        ) from exc


