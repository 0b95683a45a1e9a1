"""Image and text encoders: timm for images, transformers for text, plus offline presets.

::

    from fusionzoo.encoders import build_vision_encoder, build_text_encoder
    vision = build_vision_encoder("efficientnet-lite0")      # or any timm name, e.g. "resnet50"
    text = build_text_encoder("minilm-l6", causal=False)    # or a hub id / local folder
    pixels = vision.preprocess(images)                       # (B, 3, 224, 224), its own mean/std
    tokens = vision(pixels).tokens                           # (B, 49, 1280)
    batch = text.tokenize(["what is this?"])
    states = text(**batch).states                            # (B, T, 384)

Presets are listed by ``fusionzoo.list_encoders()``; new ones are registered
with ``@fusionzoo.register_vision_encoder("name")`` /
``@fusionzoo.register_text_encoder("name")`` on a builder
``fn(pretrained=True, **kw) -> VisionEncoder`` (text builders also take ``causal``).
"""

from .text import TextEncoder, TextOutput, TextTail, build_text_encoder, create_hf_encoder
from .vision import (
    VisionEncoder,
    VisionOutput,
    VisionTail,
    build_vision_encoder,
    create_timm_encoder,
    resolve_data_config,
)
from . import presets  # noqa: E402,F401  (registers the presets; last, after the classes it builds)
from .presets import load_efficientnet_lite0_weights, load_efficientnet_lite_weights  # noqa: E402

__all__ = [
    "TextEncoder",
    "TextOutput",
    "TextTail",
    "VisionEncoder",
    "VisionOutput",
    "VisionTail",
    "build_text_encoder",
    "build_vision_encoder",
    "create_hf_encoder",
    "create_timm_encoder",
    "load_efficientnet_lite0_weights",
    "load_efficientnet_lite_weights",
    "resolve_data_config",
]
