"""fusionzoo: interchangeable vision-language fusion modules, heads and training.

Quick use::

    import fusionzoo
    fusionzoo.list_fusions()                      # the six built-in fusions
    model = fusionzoo.create_model("vqa", "merged_transformer",
                                   vision="efficientnet-lite0", text="minilm-l6",
                                   answers=["yes", "no"])
    model.predict([image], ["is there a dog?"])

Extend the zoo with ``@fusionzoo.register_fusion("my_fusion")`` on a
:class:`fusionzoo.FusionModule` subclass (see the README).

Importing this package is light (no torch): the registries load their built-in
entries on first use, and the model classes below are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__  # noqa: F401
from .registry import (  # noqa: E402
    DATASETS,
    FUSIONS,
    HEADS,
    TASKS,
    TEXT_ENCODERS,
    VISION_ENCODERS,
    RegistryError,
    list_datasets,
    list_encoders,
    list_fusions,
    list_heads,
    list_tasks,
    register_dataset,
    register_fusion,
    register_head,
    register_task,
    register_text_encoder,
    register_vision_encoder,
)

# Public names that need torch, imported on first access (PEP 562).
_LAZY = {
    "FusionModel": "fusionzoo.model",
    "ModelOutput": "fusionzoo.model",
    "create_model": "fusionzoo.factory",
    "load_model": "fusionzoo.model",
    "FusionModule": "fusionzoo.fusions.base",
    "FusionOutput": "fusionzoo.fusions.base",
    "KVCache": "fusionzoo.layers",
}
_SUBMODULES = {"encoders", "fusions", "heads", "layers", "losses", "model", "tasks", "training", "plugins"}

if TYPE_CHECKING:  # for type checkers and IDEs
    from .fusions.base import FusionModule, FusionOutput
    from .layers import KVCache
    from .factory import create_model
    from .model import FusionModel, ModelOutput, load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fusionzoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = [
    "DATASETS",
    "FUSIONS",
    "HEADS",
    "TASKS",
    "TEXT_ENCODERS",
    "VISION_ENCODERS",
    "FusionModel",
    "FusionModule",
    "FusionOutput",
    "KVCache",
    "ModelOutput",
    "RegistryError",
    "create_model",
    "list_datasets",
    "list_encoders",
    "list_fusions",
    "list_heads",
    "list_tasks",
    "load_model",
    "register_dataset",
    "register_fusion",
    "register_head",
    "register_task",
    "register_text_encoder",
    "register_vision_encoder",
]
