"""Rebuilding an image encoder from a saved model folder, whose ``config.json`` is untrusted data.

A spec read back from a saved model folder (``vision.spec`` and ``vision.data_config`` of its
``config.json``) could name any file to read or anything to download. So
:func:`rebuild_saved_vision_encoder` passes timm only the architecture keywords of
:data:`SAVED_TIMM_KWARGS` and the preprocessing keys of :data:`SAVED_DATA_CONFIG`, each
value checked, never a ``checkpoint`` (it is kept as a record), reads a ``local-dir:``
architecture only from inside the folder, and goes to the hub for an ``hf-hub:`` name only
when downloading is allowed. Every refusal is a :class:`~fusionzoo.errors.ModelFolderError`
that names the file and the key.

:mod:`fusionzoo.encoders.vision` builds encoders from specs a user writes;
:func:`fusionzoo.load_model` calls this module for the ones a folder holds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm

from ..errors import ModelFolderError
from ..registry import VISION_ENCODERS, RegistryError
from .vision import VisionEncoder, unknown_vision_name


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rate(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


def _image_size(value: Any) -> bool:
    return _positive_int(value) or (isinstance(value, list) and len(value) == 2 and all(map(_positive_int, value)))


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _pool_name(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[a-z_]{0,24}", value) is not None


def _input_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(map(_positive_int, value))


def _channel_numbers(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= 4 and all(map(_number, value))


def _channel_scales(value: Any) -> bool:
    return _channel_numbers(value) and all(v > 0 for v in value)


def _crop_fraction(value: Any) -> bool:
    return _number(value) and 0 < value <= 1


_SOURCES = {"local-dir": "local-dir", "hf-hub": "hf-hub", "hf_hub": "hf-hub"}  # timm's name prefixes
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")  # timm's names
_CROP_MODES = ("center", "squash", "border")

#: ``timm.create_model`` keywords that ``vision.spec.kwargs`` of a saved model folder may carry,
#: each with what its value must be. They shape the architecture and nothing else; any other
#: keyword (``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir``, ...) could name a file
#: to read or something to download, so :func:`rebuild_saved_vision_encoder` refuses it.
SAVED_TIMM_KWARGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "img_size": ("a positive int or a list of two", _image_size),
    "patch_size": ("a positive int or a list of two", _image_size),  # a ViT's patch side (the tiny preset's too)
    "in_chans": ("a positive int", _positive_int),
    "global_pool": ("a pooling name such as 'avg', 'token' or ''", _pool_name),
    "output_stride": ("a positive int", _positive_int),
    "dynamic_img_size": ("true or false", _flag),
    "dynamic_img_pad": ("true or false", _flag),
    **{
        rate: ("a number in [0, 1]", _rate)
        for rate in (
            "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate",
            "attn_drop_rate", "pos_drop_rate", "patch_drop_rate",
        )
    },
}

#: Keys of ``vision.data_config`` (timm's resolved data config) that a saved model folder may
#: carry, with what each must be; they all go to ``timm.data.create_transform``.
SAVED_DATA_CONFIG: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "input_size": ("a list [channels, height, width] of positive ints", _input_size),
    "mean": ("a list of numbers, one per channel", _channel_numbers),
    "std": ("a list of positive numbers, one per channel", _channel_scales),
    "interpolation": (f"one of {', '.join(_INTERPOLATIONS)}", lambda v: v in _INTERPOLATIONS),
    "crop_pct": ("a number in (0, 1]", _crop_fraction),
    "crop_mode": (f"one of {', '.join(_CROP_MODES)}", lambda v: v in _CROP_MODES),
}
REQUIRED_DATA_CONFIG = ("input_size", "mean", "std")


def _checked_entries(
    values: Any, allowed: dict[str, tuple[str, Callable[[Any], bool]]], where: Path | str, key: str
) -> dict[str, Any]:
    """``values`` if it is a dict of allowed keys with valid values, else a ModelFolderError naming the key."""
    if not isinstance(values, dict):
        raise ModelFolderError(f"{where}: key {key!r} must be an object, got {type(values).__name__}")
    for name, value in values.items():
        if name not in allowed:
            raise ModelFolderError(
                f"{where}: key {f'{key}.{name}'!r} is not accepted; a saved model folder may give only "
                f"these keys there: {', '.join(sorted(allowed))} (nothing that names a file or a download)"
            )
        expected, valid = allowed[name]
        if not valid(value):
            raise ModelFolderError(f"{where}: key {f'{key}.{name}'!r} must be {expected}, got {value!r}")
    return dict(values)


def _model_args_from_timm_config(config_file: Path) -> tuple[str, dict[str, Any]]:
    """Architecture name and allowed ``model_args`` of a timm ``config.json`` inside the model folder."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{config_file}: not a readable timm config.json ({exc})") from exc
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ModelFolderError(
            f"{config_file}: key 'architecture' must name a timm model (timm.list_models()), got {architecture!r}"
        )
    return architecture, _checked_entries(config.get("model_args", {}), SAVED_TIMM_KWARGS, config_file, "model_args")


def _local_dir(path: str, folder: Path, config_path: Path, key: str) -> Path:
    """The folder a ``local-dir:`` name points at (relative to the model folder), if it lies inside it."""
    root = folder.resolve()
    target = Path(path) if os.path.isabs(path) else folder / path
    resolved = target.resolve()  # symlinks followed
    if not resolved.is_relative_to(root):
        raise ModelFolderError(
            f"{config_path}: key {key!r} names local-dir:{path}, which resolves to {resolved}, outside the "
            f"model folder {root}; a saved model may only refer to files inside its own folder"
        )
    config_file = resolved / "config.json"
    if not config_file.is_file() or not config_file.resolve().is_relative_to(root):
        raise ModelFolderError(
            f"{config_path}: key {key!r} names local-dir:{path}, but {config_file} is not a file inside "
            f"the model folder {root} (expected the timm config.json of the architecture)"
        )
    return config_file


def rebuild_saved_vision_encoder(
    spec: Any,
    data_config: Any,
    *,
    folder: Path,
    config_path: Path,
    allow_download: bool = False,
) -> VisionEncoder:
    """Rebuild, with random weights, the image encoder that a saved model folder's config.json describes.

    ``spec`` and ``data_config`` (config.json's ``vision.spec`` and ``vision.data_config``)
    are untrusted data: timm gets only the keywords of :data:`SAVED_TIMM_KWARGS` and the
    preprocessing keys of :data:`SAVED_DATA_CONFIG`. A ``checkpoint`` is kept in the spec as a
    record but never opened (the weights come from the folder). ``local-dir:<path>`` must
    resolve (symlinks followed) inside ``folder``; its timm ``config.json`` is read here and
    its ``model_args`` are checked like ``kwargs``. ``hf-hub:<id>`` fetches that config from
    the hub, and only with ``allow_download``.

    Raises:
        ModelFolderError: a key that is not accepted, a value of the wrong kind, a path
            outside the folder or a hub name without ``allow_download`` (names file and key).
        RegistryError: an unknown preset or timm model name.
    """
    key = "vision.spec"
    if isinstance(spec, str):
        spec = {"preset": spec} if spec in VISION_ENCODERS else {"name": spec}
    if not isinstance(spec, dict):
        raise ModelFolderError(f"{config_path}: key {key!r} must be an object or a string, got {spec!r}")
    unknown = sorted(set(spec) - {"preset", "name", "checkpoint", "kwargs"})
    if unknown:
        raise ModelFolderError(
            f"{config_path}: key {f'{key}.{unknown[0]}'!r} is not accepted; {key} holds 'preset' or "
            "'name', and optionally 'checkpoint' and 'kwargs'"
        )
    if ("preset" in spec) == ("name" in spec):
        raise ModelFolderError(f"{config_path}: key {key!r} must hold exactly one of 'preset' or 'name', got {spec!r}")
    if "checkpoint" in spec and not isinstance(spec["checkpoint"], str):
        raise ModelFolderError(f"{config_path}: key '{key}.checkpoint' must be a string, got {spec['checkpoint']!r}")
    kwargs = _checked_entries(spec.get("kwargs", {}), SAVED_TIMM_KWARGS, config_path, f"{key}.kwargs")
    data_config = _checked_entries(data_config, SAVED_DATA_CONFIG, config_path, "vision.data_config")
    missing = [name for name in REQUIRED_DATA_CONFIG if name not in data_config]
    if missing:
        raise ModelFolderError(f"{config_path}: missing key {f'vision.data_config.{missing[0]}'!r}")

    try:
        if "preset" in spec:
            preset = spec["preset"]
            if not isinstance(preset, str) or preset not in VISION_ENCODERS:
                raise RegistryError(
                    f"{config_path}: key '{key}.preset' names vision encoder {preset!r}, which is not "
                    f"registered (presets: {', '.join(VISION_ENCODERS.list())}). If it comes from a "
                    "plug-in, import that module (or pass --import) before loading."
                )
            encoder = VISION_ENCODERS.get(preset)(pretrained=False, **kwargs)
        else:
            architecture, create_kwargs = _saved_architecture(spec["name"], kwargs, folder, config_path, allow_download)
            encoder = VisionEncoder(
                timm.create_model(architecture, pretrained=False, num_classes=0, **create_kwargs), {}
            )
    except (TypeError, ValueError, AssertionError) as exc:
        if isinstance(exc, ModelFolderError):
            raise
        raise ModelFolderError(f"{config_path}: key {key!r} ({spec!r}) does not build an image encoder: {exc}") from exc
    encoder.spec = copy.deepcopy(spec)
    encoder.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return encoder


def _saved_architecture(
    name: Any, kwargs: dict[str, Any], folder: Path, config_path: Path, allow_download: bool
) -> tuple[str, dict[str, Any]]:
    """(timm architecture name, create_model keywords) for a saved ``vision.spec.name``; see the caller."""
    key = "vision.spec.name"
    if not isinstance(name, str):
        raise ModelFolderError(f"{config_path}: key {key!r} must be a timm model name, got {name!r}")
    source, _, location = name.partition(":")
    source = _SOURCES.get(source.lower())
    if location and source == "local-dir":
        architecture, model_args = _model_args_from_timm_config(_local_dir(location, folder, config_path, key))
    elif location and source == "hf-hub":
        if not allow_download:
            raise ModelFolderError(
                f"{config_path}: key {key!r} names the Hugging Face hub model {name!r}, whose timm config "
                "would be downloaded; load_model downloads nothing unless asked: pass allow_download=True "
                "to fetch it"
            )
        loaded = timm.models.load_model_config_from_hf(location)  # (pretrained_cfg, architecture[, model_args])
        architecture, model_args = loaded[1], (loaded[2] if len(loaded) > 2 else {}) or {}
        model_args = _checked_entries(model_args, SAVED_TIMM_KWARGS, f"the hub config of {name!r}", "model_args")
        if not isinstance(architecture, str) or not timm.is_model(architecture):
            raise ModelFolderError(
                f"{config_path}: key {key!r} names {name!r}, whose hub config gives the architecture "
                f"{architecture!r}, not a timm model"
            )
    else:
        if not timm.is_model(name):
            raise RegistryError(f"{config_path}: key {key!r}: {unknown_vision_name(name)}")
        architecture, model_args = name, {}
    return architecture, {**model_args, **kwargs}
