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
"""

__version__ = "0.1.0"

from .registry import (  # noqa: E402  (registries first: everything below registers into them)
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
from .layers import KVCache  # noqa: E402
from .fusions import FusionModule, FusionOutput  # noqa: E402
from . import encoders, heads  # noqa: E402,F401
from . import tasks  # noqa: E402,F401  (the repository's tasks/ folder, installed as fusionzoo.tasks)
from .model import FusionModel, create_model, load_model  # noqa: E402

__all__ = [
    "DATASETS",
    "list_datasets",
    "register_dataset",
    "FUSIONS",
    "HEADS",
    "TASKS",
    "TEXT_ENCODERS",
    "VISION_ENCODERS",
    "FusionModel",
    "FusionModule",
    "FusionOutput",
    "KVCache",
    "RegistryError",
    "create_model",
    "list_encoders",
    "list_fusions",
    "list_heads",
    "list_tasks",
    "load_model",
    "register_fusion",
    "register_head",
    "register_task",
    "register_text_encoder",
    "register_vision_encoder",
]
