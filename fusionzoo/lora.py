"""LoRA adapters on a FusionModel's encoders (and optionally its fusion), with the ``peft`` library.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a
pretrained weight ``W`` and trains a low-rank update: a layer computes
``W x + (alpha / r) B A x`` with ``A`` (r x in) and ``B`` (out x r), ``B`` starting at zero so
the adapted model starts as the base model. ``peft`` injects those layers in place
(``inject_adapter_in_model``), so the encoders keep their classes and fusionzoo's code paths.

What is adapted, per part named in ``targets``:

* every ``nn.Linear`` and every plain ``nn.Conv2d`` with ``groups == 1`` (a ViT's or BERT's
  projections, an EfficientNet's 1x1 convolutions). Depthwise convolutions (grouped) and
  timm's ``Conv2dSame`` (an EfficientNet's stem, whose padding peft cannot copy) keep their
  base weights.
* the base weights of an adapted part are frozen; an encoder not named in ``targets`` is
  frozen whole; the head (and the alignment of retrieval) train fully.
* an adapted encoder's base keeps its eval behaviour in training (no dropout of its own,
  BatchNorm statistics frozen): only the adapters and their dropout train.

Saved folders (:func:`split_state`): ``adapters.safetensors`` holds the adapter matrices and
every tensor that is not an encoder's base parameter (fusion, head, alignment, buffers).
An encoder's base parameters are not saved when its preset rebuilds them exactly (checked at
save time against a SHA-256 of the parameters); otherwise (a random ``tiny`` encoder, an
encoder changed before the adapters were added) they go to ``base.safetensors``. The config
records, per encoder, where its base comes from and the checksum, and loading checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable

import torch
from torch import Tensor, nn

#: The parts of a FusionModel that can carry adapters.
LORA_PARTS = ("vision", "text", "fusion")
#: The parts whose base weights may come from their preset instead of the saved folder.
ENCODER_PARTS = ("vision", "text")
ADAPTERS_NAME = "adapters.safetensors"
BASE_NAME = "base.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """How to adapt a model (the ``lora_*`` config keys).

    Attributes:
        r: rank of each update (``lora_r``), an int >= 1.
        alpha: scale numerator (``lora_alpha``); the update is multiplied by ``alpha / r``.
        dropout: dropout on a layer's input to its update (``lora_dropout``), in [0, 1).
        targets: the parts that get adapters (``lora_targets``): any of vision, text, fusion.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("vision", "text")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora_r must be an int >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"lora_alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in LORA_PARTS]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise ValueError(f"lora_targets must name each of {', '.join(LORA_PARTS)} at most once "
                             f"(at least one), got {list(self.targets)!r}")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @classmethod
    def parse_targets(cls, value: str | Iterable[str]) -> tuple[str, ...]:
        """``"vision,text"`` or ``["vision", "text"]`` -> ``("vision", "text")``."""
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(item).strip() for item in items if str(item).strip())

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("LoRA needs the peft library: pip install peft") from exc
    return peft


def _inner(model: nn.Module, part: str) -> nn.Module:
    """The module adapters go into: an encoder's timm / transformers model, or the fusion itself."""
    module = getattr(model, part)
    return module.model if part in ENCODER_PARTS else module


def adaptable_layers(module: nn.Module) -> list[str]:
    """Names (inside ``module``) of the layers LoRA adapts: Linear, and plain Conv2d with groups == 1."""
    names = []
    for name, layer in module.named_modules():
        if not name or ".lora_" in f".{name}" or name.endswith("base_layer"):
            continue
        if type(layer) is nn.Linear or (type(layer) is nn.Conv2d and layer.groups == 1):
            names.append(name)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft LoRA layer in ``model``."""
    base = _peft().tuners.lora.LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, base)]


def keep_base_in_eval(module: nn.Module) -> None:
    """Put every submodule of ``module`` in eval mode except LoRA's dropout, which follows ``module``.

    An adapted encoder's base then computes what it computed before training (no dropout of its
    own, BatchNorm statistics frozen), so an adapter-only folder holds all that training changed
    and several processes draw no random numbers but the adapters' dropout.
    """
    for name, sub in module.named_modules():
        if name:
            sub.training = module.training and name.rsplit(".", 2)[-2:-1] == ["lora_dropout"]


def has_lora(model: nn.Module) -> bool:
    return bool(model.config.get("lora")) if isinstance(getattr(model, "config", None), dict) else False


def adapt_module(module: nn.Module, spec: LoraSpec) -> list[str]:
    """Inject LoRA adapters (rank, alpha, dropout of ``spec``) into every :func:`adaptable_layers` layer of
    ``module`` in place and freeze everything else in it; the names adapted (none: nothing changed)."""
    peft = _peft()
    names = adaptable_layers(module)
    if not names:
        return []
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    peft.inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():  # peft marks adapters trainable; the base is frozen
        p.requires_grad_(".lora_" in f".{name}")
    return names


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject LoRA adapters into ``model`` (a FusionModel) in place, freeze the base weights, record ``spec``.

    The parts of ``spec.targets`` get adapters on every :func:`adaptable_layers` layer and their
    other parameters are frozen; encoders not in ``targets`` are frozen whole. The model's
    config gains ``lora`` (the spec) and ``freeze_encoders`` becomes false (the adapted
    encoders run in training mode). Returns ``model``.
    """
    if has_lora(model) or lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    for part in ENCODER_PARTS:
        encoder = getattr(model, part)
        if part not in spec.targets:
            encoder.freeze()
        elif getattr(encoder, "frozen", False):
            encoder.unfreeze()
    for part in spec.targets:
        inner = _inner(model, part)
        if not adapt_module(inner, spec):
            raise ValueError(f"lora_targets names {part!r}, but its {type(inner).__name__} has no Linear or "
                             "1-group Conv2d layer to adapt")
        if part in ENCODER_PARTS:
            encoder = getattr(model, part)
            encoder.lora_base_eval = True
            encoder.train(encoder.training)
    model.config["lora"] = spec.to_dict()
    model.config["freeze_encoders"] = False
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the LoRA layers, in place.

    The result is a plain model (no ``lora`` in its config) with the same outputs, saved as an
    ordinary folder. The encoders stay as trainable as they were (base weights frozen).
    """
    for name, layer in lora_layers(model):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for part in ENCODER_PARTS:
        getattr(model, part).lora_base_eval = False
    model.config.pop("lora", None)
    return model


# -- saving and loading ------------------------------------------------------------------------
def _is_adapter(key: str) -> bool:
    return ".lora_" in key


def base_parameter_names(model: nn.Module, part: str) -> list[str]:
    """Full state-dict names of ``part``'s base parameters (adapters left out), in order."""
    encoder = getattr(model, part)
    return [f"{part}.{name}" for name, _ in encoder.named_parameters() if not _is_adapter(name)]


def _plain_name(name: str) -> str:
    """A base parameter's name without the ``base_layer.`` peft puts in it."""
    return name.replace(".base_layer.", ".")


def base_checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the named tensors (names without ``base_layer.``, sorted; float32 bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors, key=_plain_name):
        digest.update(_plain_name(name).encode())
        digest.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_base(model: nn.Module, part: str) -> dict[str, Tensor]:
    """``{name within the encoder: tensor}`` of an encoder's base parameters."""
    encoder = getattr(model, part)
    return {name: p for name, p in encoder.named_parameters() if not _is_adapter(name)}


def split_state(model: nn.Module, rebuilt: dict[str, nn.Module]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """The tensors of a LoRA model's folder: ``(adapters, base, sources)``.

    Args:
        model: a FusionModel with adapters.
        rebuilt: per encoder part, the same encoder built again from its preset with its
            pretrained weights (what loading would rebuild).
    Returns:
        ``adapters``: every state-dict tensor that is not an encoder base parameter;
        ``base``: the base parameters of encoders their preset does not rebuild exactly;
        ``sources``: per encoder, ``{"source": "preset" | "saved", "sha256": ...}``.
    """
    state = model.state_dict()
    base_names = {name for part in ENCODER_PARTS for name in base_parameter_names(model, part)}
    adapters = {k: v for k, v in state.items() if k not in base_names}
    base: dict[str, Tensor] = {}
    sources = {}
    for part in ENCODER_PARTS:
        own = encoder_base(model, part)
        checksum = base_checksum(own)
        fresh = dict(rebuilt[part].named_parameters()) if part in rebuilt else {}
        same = bool(fresh) and base_checksum(fresh) == checksum
        sources[part] = {"source": "preset" if same else "saved", "sha256": checksum}
        if not same:
            base.update({f"{part}.{name}": state[f"{part}.{name}"] for name in own})
    return adapters, base, sources


def load_base(model: nn.Module, part: str, pretrained: nn.Module) -> None:
    """Copy a freshly built pretrained encoder's parameters into ``model``'s (unadapted) ``part``."""
    target = getattr(model, part)
    with torch.no_grad():
        own = dict(target.named_parameters())
        fresh = dict(pretrained.named_parameters())
        if own.keys() != fresh.keys():
            raise ValueError(f"the {part} encoder built from its preset does not have the saved architecture")
        for name, p in own.items():
            p.copy_(fresh[name])


def preset_encoders(model: nn.Module) -> dict[str, nn.Module]:
    """Each encoder of ``model`` whose spec names a preset, built again from it with pretrained weights.

    Only presets are rebuilt (offline and registered in this process); an encoder given by a
    timm name, a folder or a hub id keeps its base in the saved folder.
    """
    from .encoders import build_text_encoder, build_vision_encoder

    builders = {"vision": build_vision_encoder, "text": build_text_encoder}
    out = {}
    for part in ENCODER_PARTS:
        spec = getattr(model, part).spec
        if isinstance(spec, dict) and isinstance(spec.get("preset"), str):
            with torch.random.fork_rng(devices=[]):  # a random preset must not move the caller's RNG
                out[part] = builders[part](spec, pretrained=True)
    return out


def check_sources(sources: Any, where: str) -> dict[str, dict[str, str]]:
    """``lora.base`` of a config.json: per encoder, ``{"source": "preset" | "saved", "sha256": hex}``."""
    ok = isinstance(sources, dict) and set(sources) == set(ENCODER_PARTS) and all(
        isinstance(s, dict) and s.get("source") in ("preset", "saved") and isinstance(s.get("sha256"), str)
        for s in sources.values())
    if not ok:
        raise ValueError(f"{where}: key 'lora.base' must map vision and text to "
                         f"{{'source': 'preset' or 'saved', 'sha256': ...}}, got {sources!r}")
    return sources


def verify_base(model: nn.Module, sources: dict[str, dict[str, str]], where: str) -> None:
    """Raise ValueError when an encoder's base parameters are not the ones the adapters were trained on."""
    for part in ENCODER_PARTS:
        if base_checksum(encoder_base(model, part)) != sources[part]["sha256"]:
            origin = ("its preset " + repr(getattr(model, part).spec) if sources[part]["source"] == "preset"
                      else "the folder's " + BASE_NAME)
            raise ValueError(f"{where}: the {part} encoder's base weights from {origin} are not the ones the "
                             "adapters were trained on (lora.base sha256 differs); save the model again with "
                             "merge_lora=True on the machine that trained it")
