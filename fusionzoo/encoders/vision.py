"""Image encoders: any timm model as a token encoder with its own preprocessing.

A fusion module needs image *tokens* (B, N, D) and a pooled vector (B, D).
timm already separates the two (``forward_features`` and
``forward_head(pre_logits=True)``, the design of pytorch-image-models), so a
:class:`VisionEncoder` wraps one headless timm model (``num_classes=0``):

* a CNN's last feature map (B, C, H, W) becomes H*W tokens of width C;
* a ViT's tokens (B, N, D) are kept as they are, prefix/[CLS] tokens first.

Each encoder carries the preprocessing its weights expect (input size, mean,
std, interpolation, crop) as timm's resolved ``data_config``, so images are
never normalised with another model's statistics.

To fine-tune only its last ``n`` blocks, an encoder splits in two:
:meth:`VisionEncoder.tail_inputs` runs what comes before them (the part that stays
frozen, whose output can be computed once) and :meth:`VisionEncoder.tail` gives a
:class:`VisionTail` of the last ``n`` blocks and what follows them in
``forward_features``, so ``tail(n)(tail_inputs(x, n))`` are the tokens of ``forward(x)``.
Supported: timm's ``EfficientNet`` class (EfficientNet, EfficientNet-Lite, MobileNetV2,
MixNet, MnasNet...) and ``VisionTransformer``.

Specs (what :func:`build_vision_encoder` accepts and ``encoder.spec`` records):

* a string: a registered preset (``fusionzoo.list_encoders()["vision"]``,
  e.g. ``"efficientnet-lite0"``, ``"tiny"``) or any timm model name
  (``timm.list_models()``);
* ``{"preset": "tiny", "kwargs": {...}}``: a preset with builder arguments;
* ``{"name": "resnet50", "checkpoint": "/path/weights.safetensors",
  "kwargs": {"drop_path_rate": 0.1}}``: a timm model, optionally with its
  pretrained weights from a local file (``.safetensors``/``.pth``/``.bin``),
  and extra ``timm.create_model`` keyword arguments.

Specs are JSON-serialisable; ``build_vision_encoder(encoder.spec,
pretrained=False)`` rebuilds the same architecture with random weights (the
caller then loads a state dict).

A spec read back from a saved model folder is untrusted data: it is rebuilt by
:func:`fusionzoo.encoders.saved_vision.rebuild_saved_vision_encoder`, which checks it first.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import timm.data
import torch
from PIL import Image
from timm.models.efficientnet import EfficientNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..lora import keep_base_in_eval
from ..registry import VISION_ENCODERS, RegistryError


@dataclass
class VisionOutput:
    """What a :class:`VisionEncoder` returns.

    Attributes:
        tokens: (B, N, D) image token states: a CNN's last feature map
            flattened row-major (N = H*W), or a ViT's tokens with its prefix
            (class/register) tokens first.
        pooled: (B, D_pool) timm's pooled pre-logits vector
            (``forward_head(features, pre_logits=True)``). ``D_pool`` equals
            ``D`` for ViTs, ResNets and EfficientNets; see
            :attr:`VisionEncoder.pooled_dim`.
    """

    tokens: Tensor
    pooled: Tensor


class VisionEncoder(nn.Module):
    """A headless timm model that returns image tokens and a pooled vector.

    Args:
        model: a timm model built with ``num_classes=0``.
        spec: JSON-serialisable description that
            ``build_vision_encoder(spec, pretrained=False)`` rebuilds.
        data_config: timm data config (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``crop_mode``); resolved from the
            model when omitted.

    Attributes:
        out_dim: width D of the image tokens.
        pooled_dim: width of ``pooled``. Equal to ``out_dim`` unless the timm
            head has its own hidden layer (``head_hidden_size``, e.g.
            MobileNetV3's 1280-wide head over 960-wide features).
        frozen: whether :meth:`freeze` is in effect.
    """

    def __init__(self, model: nn.Module, spec: dict[str, Any], data_config: dict[str, Any] | None = None):
        super().__init__()
        if getattr(model, "num_classes", 0) != 0:
            raise ValueError(
                "VisionEncoder expects a headless timm model (num_classes=0), got "
                f"num_classes={model.num_classes}"
            )
        self.model = model
        self.spec = copy.deepcopy(spec)
        self._eval_transform: Callable[[Image.Image], Tensor] | None = None
        self.data_config = dict(data_config) if data_config is not None else resolve_data_config(model)
        self.out_dim: int = int(model.num_features)
        self.pooled_dim: int = int(getattr(model, "head_hidden_size", None) or model.num_features)
        # timm's convention for the layout of forward_features() of 2-D maps.
        self._channels_last = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
        self.frozen = False

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``...

        Setting it changes what :meth:`preprocess` and :meth:`transform` do.
        """
        return self._data_config

    @data_config.setter
    def data_config(self, config: dict[str, Any]) -> None:
        self._data_config = dict(config)
        self._eval_transform = None  # rebuilt from the new config on the next preprocess()

    # -- forward ------------------------------------------------------------
    def forward(self, pixel_values: Tensor) -> VisionOutput:
        """Encode a batch of preprocessed images.

        Args:
            pixel_values: (B, 3, H, W) images normalised as :meth:`transform` does.

        Returns:
            :class:`VisionOutput` with tokens (B, N, D) and pooled (B, D_pool).
        """
        features = self.model.forward_features(pixel_values)  # (B, C, h, w), (B, h, w, C) or (B, N, D)
        pooled = self.model.forward_head(features, pre_logits=True)  # (B, D_pool)
        tokens = feature_tokens(features, self._channels_last, f"{self.spec}: forward_features")  # (B, N, D)
        return VisionOutput(tokens=tokens, pooled=pooled)

    def stage_tokens(self, pixel_values: Tensor, stage: int) -> Tensor:
        """Tokens of an intermediate feature map: (B, 3, H, W) -> (B, h*w, C_stage), row-major.

        ``stage`` indexes timm's ``feature_info`` (the model's stage outputs, finest first;
        EfficientNet-Lite0: strides 2, 4, 8, 16, 32 with 16, 24, 40, 112, 320 channels;
        negative counts from the end). Earlier stages keep more of the grid and of low-level
        cues (colour, edges) than the last map, which a CNN has pooled into what ImageNet
        classes need. Runs through timm's ``forward_intermediates``, stopping at that stage.

        Raises:
            ValueError: the model has no ``forward_intermediates`` (not a timm model that
                exposes its stages) or no such stage; the message lists the stages.
        """
        index = self.stage_index(stage)
        maps = self.model.forward_intermediates(pixel_values, indices=[index], intermediates_only=True,
                                                stop_early=True)
        features = maps[0]  # (B, C, h, w) in timm's NCHW convention for intermediates
        if features.ndim != 4:
            raise ValueError(f"{self.spec}: stage {stage} gave shape {tuple(features.shape)}; expected (B, C, h, w)")
        return features.flatten(2).transpose(1, 2)  # (B, h*w, C)

    def stage_index(self, stage: int) -> int:
        """``stage`` as a non-negative index into :meth:`stages`; a ValueError listing the stages if there is none."""
        stages = self.stages()
        if not -len(stages) <= stage < len(stages):
            raise ValueError(f"{self.spec}: no stage {stage}; its stages (index: channels, stride) are "
                             + ", ".join(f"{i}: {s['num_chs']} ch, /{s['reduction']}" for i, s in enumerate(stages)))
        return stage % len(stages)

    def stages(self) -> list[dict[str, Any]]:
        """timm's ``feature_info`` of the model: one dict per stage (``num_chs``, ``reduction``, ``module``)."""
        info = getattr(self.model, "feature_info", None)
        if not info or not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"{self.spec}: {type(self.model).__name__} does not expose its stages "
                             "(timm feature_info and forward_intermediates); use its last feature map")
        return [dict(entry) for entry in info]

    # -- the last blocks, for fine-tuning only them -------------------------
    def num_blocks(self) -> int:
        """How many blocks :meth:`tail` can take: EfficientNet's blocks over all stages, a ViT's blocks.

        Raises:
            ValueError: a model whose blocks :meth:`tail` does not know (the message names what it knows).
        """
        return len(self._blocks())

    def tail_inputs(self, pixel_values: Tensor, n: int) -> Tensor:
        """What the encoder computes before its last ``n`` blocks: the input of :meth:`tail` (``n``).

        Args:
            pixel_values: (B, 3, H, W) images normalised as :meth:`transform` does.
            n: 1 .. :meth:`num_blocks`.
        Returns:
            EfficientNet: the feature map (B, C, h, w) entering block ``-n``; ViT: the tokens
            (B, N, D) entering block ``-n`` (positions added, prefix tokens first).
        """
        blocks = self._tail_blocks(n)
        model = self.model
        if isinstance(model, EfficientNet):
            x = model.bn1(model.conv_stem(pixel_values))  # (B, C0, H/2, W/2)
        else:  # VisionTransformer, as its forward_features
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixel_values))))  # (B, N, D)
        for block in blocks[: len(blocks) - n]:
            x = block(x)
        return x

    def tail(self, n: int) -> VisionTail:
        """The last ``n`` blocks and what follows them in ``forward_features``, as one module.

        EfficientNet: the last ``n`` of its blocks (stages flattened into one list), ``conv_head``
        and ``bn2``; ViT: the last ``n`` of ``blocks`` and ``norm``. The tail holds this encoder's
        own modules, not copies (``copy.deepcopy`` it to train it apart), and maps
        :meth:`tail_inputs` to the tokens (B, N, D) that :meth:`forward` returns.

        Raises:
            ValueError: ``n`` outside 1 .. :meth:`num_blocks`, or a model other than timm's
                EfficientNet and VisionTransformer.
        """
        blocks = self._tail_blocks(n)
        model = self.model
        after = [model.conv_head, model.bn2] if isinstance(model, EfficientNet) else [model.norm]
        return VisionTail(blocks[len(blocks) - n:], after, self._channels_last)

    def _blocks(self) -> list[nn.Module]:
        model = self.model
        # The layout tail_inputs / tail follow is that of these classes' own forward_features.
        if isinstance(model, EfficientNet) and type(model).forward_features is EfficientNet.forward_features:
            return [block for stage in model.blocks for block in stage]
        if (isinstance(model, VisionTransformer)
                and type(model).forward_features is VisionTransformer.forward_features):
            return list(model.blocks)
        raise ValueError(
            f"{self.spec}: cannot split a timm {type(model).__name__} into a frozen part and its last blocks; "
            "supported: timm's EfficientNet class (efficientnet-lite0/1/2, efficientnet_b*, mobilenetv2_*, "
            "mixnet_*, ...) and VisionTransformer (vit_*, deit_*, test_vit, the tiny preset)"
        )

    def _tail_blocks(self, n: int) -> list[nn.Module]:
        """Every block (:meth:`_blocks`), once ``n`` is known to be a valid tail length."""
        blocks = self._blocks()
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(blocks):
            raise ValueError(f"{self.spec}: the number of last blocks must be 1..{len(blocks)} (its "
                             f"{type(self.model).__name__} has {len(blocks)} blocks), got {n!r}")
        return blocks

    # -- preprocessing ------------------------------------------------------
    def transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        """timm's transform for this encoder's data config: PIL image -> (3, H, W) tensor.

        ``train=True`` gives timm's training augmentation (random resized crop,
        flip, ...), ``train=False`` the resize + centre crop used at evaluation.
        """
        return timm.data.create_transform(**self.data_config, is_training=train)

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """Evaluation preprocessing of PIL images into a (B, 3, H, W) float batch (on CPU).

        Images of any mode (L, RGBA, P, ...) are converted to RGB first.
        """
        if isinstance(images, Image.Image):
            images = [images]
        if self._eval_transform is None:
            self._eval_transform = self.transform(train=False)
        return torch.stack([self._eval_transform(image.convert("RGB")) for image in images])  # (B, 3, H, W)

    # -- freezing -----------------------------------------------------------
    def freeze(self) -> None:
        """Stop gradients and keep the encoder in eval mode (BatchNorm statistics, dropout off)."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def unfreeze(self) -> None:
        """Make every parameter trainable again; the mode follows the next ``.train()`` call."""
        self.frozen = False
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Like ``nn.Module.train``, except that a frozen encoder stays in eval mode, and an encoder
        with LoRA adapters trains only their dropout (its base keeps its eval behaviour)."""
        super().train(mode and not self.frozen)
        if getattr(self, "lora_base_eval", False):
            keep_base_in_eval(self)
        return self

    # -- where the tokens come from ----------------------------------------
    @torch.no_grad()
    def num_tokens(self) -> int:
        """How many tokens :meth:`forward` gives for an image of the preprocessing size
        (``data_config["input_size"]``): one forward of a blank image, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            blank = torch.zeros(1, *self.data_config["input_size"], device=device)
            return int(self.forward(blank).tokens.shape[1])
        finally:
            self.train(was_training)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens ahead of the patch grid: a ViT's class and register tokens (timm's
        ``num_prefix_tokens``: 1 for CLIP / DeiT, 5 for DINOv2 with registers), 0 for a CNN's map."""
        return int(getattr(self.model, "num_prefix_tokens", 0) or 0)

    def token_grid(self, num_tokens: int, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(rows, columns) of the patch grid behind ``num_tokens`` tokens, prefix tokens left out.

        The grid is the pair of factors of ``num_tokens - num_prefix_tokens`` whose shape is closest
        to the input's ``height`` / ``width`` (default: the data config's ``input_size``), the
        row-major order :func:`feature_tokens` gives.

        Raises:
            ValueError: no more tokens than prefix tokens.
        """
        patches = num_tokens - self.num_prefix_tokens
        if patches < 1:
            raise ValueError(f"{self.spec}: {num_tokens} tokens, but the encoder puts {self.num_prefix_tokens} "
                             "prefix tokens before its patch grid")
        _, default_h, default_w = self.data_config["input_size"]
        return grid_shape(patches, height or default_h, width or default_w)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, out_dim={self.out_dim}, frozen={self.frozen}"


class VisionTail(nn.Module):
    """The last blocks of a timm model and what follows them: tail inputs -> image tokens (B, N, D).

    Built by :meth:`VisionEncoder.tail`, which documents what it holds.

    Args:
        blocks: the last blocks, in order.
        after: what ``forward_features`` runs after the blocks (EfficientNet: ``conv_head``,
            ``bn2``; ViT: ``norm``).
        channels_last: whether the model's feature maps are (B, h, w, C) (timm's ``output_fmt``).
    """

    def __init__(self, blocks: list[nn.Module], after: list[nn.Module], channels_last: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.after = nn.Sequential(*after)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) feature map or (B, N, D) tokens from :meth:`VisionEncoder.tail_inputs` -> tokens (B, N', D')."""
        return feature_tokens(self.after(self.blocks(x)), self.channels_last, "VisionTail")


def feature_tokens(features: Tensor, channels_last: bool, where: str = "forward_features") -> Tensor:
    """A timm model's features as tokens: a map (B, C, h, w) or (B, h, w, C) -> (B, h*w, C), row-major.

    Tokens (B, N, D) are returned as they are.
    """
    if features.ndim == 4:
        if channels_last:
            return features.flatten(1, 2)  # (B, h*w, C)
        return features.flatten(2).transpose(1, 2)  # (B, h*w, C)
    if features.ndim == 3:
        return features  # (B, N, D)
    raise ValueError(f"{where} returned shape {tuple(features.shape)}; expected a feature map (B, C, H, W) "
                     "or tokens (B, N, D)")


def grid_shape(count: int, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) with ``rows * columns == count`` whose aspect is closest to ``height / width``."""
    pairs = [(rows, count // rows) for rows in range(1, count + 1) if count % rows == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - math.log(height / width)))


# -- data config ------------------------------------------------------------
def resolve_data_config(model: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's ``resolve_data_config`` with ``input_size`` matching the built model.

    timm resolves ``input_size`` from the pretrained config, which does not
    follow an ``img_size``/``in_chans`` given to ``create_model`` (a ViT built
    with ``img_size=32`` still reports 160 for ``test_vit``). The model's own
    patch-embedding size wins when it has a fixed one.
    """
    config = dict(timm.data.resolve_data_config(dict(overrides or {}), model=model))
    channels, height, width = config["input_size"]
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, "in_chans", None)
    if in_chans is None:
        first_conv = _first_conv(model)
        in_chans = first_conv.in_channels if first_conv is not None else channels
    config["input_size"] = (int(in_chans), int(height), int(width))
    return config


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, str):
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Conv2d):
            return module
    return None


# -- builders ---------------------------------------------------------------
def create_timm_encoder(
    name: str,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> VisionEncoder:
    """Build a :class:`VisionEncoder` around ``timm.create_model(name, num_classes=0, **kwargs)``.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet50"``,
            ``"vit_base_patch16_224.augreg_in21k"``.
        pretrained: load pretrained weights: from ``checkpoint`` when given,
            else from the Hugging Face hub (needs internet or a warm cache).
        checkpoint: local weights file for ``name`` (safetensors or a torch
            state dict); used only when ``pretrained`` is True.
        **kwargs: extra ``timm.create_model`` arguments (``img_size``,
            ``drop_path_rate``, ...); must be JSON-serialisable to be saved.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        RuntimeError: the weights could not be had (offline, or a checkpoint
            that does not fit the architecture); the message says what to do.
    """
    kwargs = dict(kwargs)
    kwargs.pop("num_classes", None)  # always headless: heads live in fusionzoo.heads
    spec: dict[str, Any] = {"name": name}
    if checkpoint is not None:
        spec["checkpoint"] = os.fspath(checkpoint)
    if kwargs:
        spec["kwargs"] = copy.deepcopy(kwargs)

    if pretrained and checkpoint is not None:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint for timm model {name!r} not found: {path!r}")
        try:
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **kwargs
            )
        except Exception as exc:
            raise RuntimeError(
                f"could not load timm model {name!r} from checkpoint {path!r}: {exc}. Expected a "
                f"safetensors or torch state dict saved from timm.create_model({name!r}, ...)."
            ) from exc
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:
            hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name
            raise RuntimeError(
                f"could not get pretrained weights for timm model {name!r} ({type(exc).__name__}: {exc}). "
                f"When offline: download them where there is internet (e.g. `hf download {hub_id}`) and "
                f"pass the file as {{'name': {name!r}, 'checkpoint': '/path/model.safetensors'}}; "
                f"or build with pretrained=False; or use an offline preset such as 'efficientnet-lite0' "
                f"(presets: {', '.join(VISION_ENCODERS.list())})."
            ) from exc
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return VisionEncoder(model, spec)


def build_vision_encoder(spec: str | dict[str, Any], pretrained: bool = True, **kwargs: Any) -> VisionEncoder:
    """Build an image encoder from a preset name, a timm model name or a spec dict.

    Args:
        spec: ``"efficientnet-lite0"`` (a preset), ``"resnet50"`` (a timm
            name), ``{"preset": ..., "kwargs": {...}}`` or ``{"name": ...,
            "checkpoint": ..., "kwargs": {...}}`` (see the module docstring).
        pretrained: load the preset's or timm's pretrained weights; False
            builds the same architecture with random weights.
        **kwargs: builder / ``timm.create_model`` arguments, merged over the
            spec's ``kwargs``.

    Raises:
        RegistryError: ``spec`` names neither a preset nor a timm model; the
            message lists the presets and the closest names.
    """
    if isinstance(spec, str):
        spec = {"preset": spec} if spec in VISION_ENCODERS else {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"vision encoder spec must be a str or dict, got {type(spec).__name__}")
    unknown_keys = set(spec) - {"preset", "name", "checkpoint", "kwargs"}
    if ("preset" in spec) == ("name" in spec) or unknown_keys:
        raise ValueError(
            "vision encoder spec dict must have exactly one of 'preset' or 'name' (plus optional "
            f"'checkpoint' and 'kwargs'), got {spec!r}"
        )
    merged = {**spec.get("kwargs", {}), **kwargs}

    if "preset" in spec:
        builder = VISION_ENCODERS.get(spec["preset"])
        encoder = builder(pretrained=pretrained, **merged)
        encoder.spec = {"preset": spec["preset"], **({"kwargs": copy.deepcopy(merged)} if merged else {})}
        return encoder

    name = spec["name"]
    check_vision_name(name)
    return create_timm_encoder(name, pretrained=pretrained, checkpoint=spec.get("checkpoint"), **merged)


def check_vision_name(name: str) -> None:
    """A vision encoder preset or a name timm builds; otherwise a RegistryError with the closest names.

    Cheap (no weights are touched), so a run can check it before it loads any data.
    """
    # timm accepts "arch", "arch.pretrained_tag" and hub/folder prefixes.
    if name in VISION_ENCODERS or timm.is_model(name) or name.startswith(("hf-hub:", "local-dir:")):
        return
    raise unknown_vision_name(name)


def unknown_vision_name(name: str) -> RegistryError:
    """The registry's unknown-preset error, extended with the closest timm model names."""
    try:
        VISION_ENCODERS.get(name)
        preset_message = ""
    except RegistryError as exc:
        preset_message = str(exc)
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Closest timm models: {', '.join(repr(c) for c in close)}." if close else ""
    return RegistryError(
        f"{preset_message} {name!r} is not a timm model name either (see timm.list_models()).{hint}"
    )
