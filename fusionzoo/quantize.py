"""INT8 inference on the CPU: PyTorch's dynamic quantisation of a model's Linear layers.

:func:`quantize_model` runs :func:`torch.ao.quantization.quantize_dynamic` (``qint8``, the
default dynamic qconfig: one symmetric scale per weight matrix) over every ``nn.Linear`` of
the model -- the encoders', the fusion's, the head's and the alignment's -- and puts each
resulting layer into an :class:`Int8Linear`. Activations are quantised on the fly, per
batch, inside each product; everything else stays float32: embeddings (word, position,
modality-type tables), convolutions (an EfficientNet is convolutions, so its image encoder
is unchanged), normalisation and attention's softmax. PyTorch's dynamic quantisation has no
convolution, and quantising the embedding tables would change the text encoder's input
rather than speed it up.

:class:`Int8Linear` computes what ``torch.ao.nn.quantized.dynamic.Linear`` computes (the
same ``quantized::linear_dynamic`` kernel on the same packed weights) but keeps its state as
plain tensors -- the int8 weight, its scale and zero point, the float bias -- so a quantised
model's state dict is written to and read from ``model.safetensors`` like any other, and a
saved folder loads back bit for bit. ``config.json`` records what was done under
``quantization`` (:func:`quantization_record`); :func:`saved_quantized` quantises a model
built from such a folder before its weights are loaded.

A quantised model is for inference on the CPU: :meth:`~torch.nn.Module.train`, or ``to`` /
``cuda`` onto another device or dtype, raise :class:`~fusionzoo.errors.QuantizedModelError`.
"""

from __future__ import annotations

import copy
import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from .errors import ConfigError, ModelFolderError, QuantizedModelError
from .layers import Linear

#: The values ``quantize=`` takes, with what each does.
QUANTIZE_MODES = {"int8": "dynamic INT8 (qint8) quantisation of every Linear layer, for CPU inference"}
#: What config.json's ``quantization`` records, and the only values this fusionzoo reads back.
RECORD = {"method": "dynamic", "dtype": "qint8", "layers": "Linear", "qscheme": "per_tensor_symmetric"}
#: The float layers that are quantised: ``nn.Linear`` and fusionzoo's own subclass (same state).
FLOAT_LINEARS = (nn.Linear, Linear)

M = TypeVar("M", bound=nn.Module)


# -- the quantised layer -------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """A Linear layer with an int8 weight: ``y = dequant(W_q) @ quant(x) + b``, activations quantised per call.

    Args:
        weight: (out, in) ``torch.qint8`` per-tensor quantised weight (from quantize_dynamic).
        bias: (out,) float32 bias, or None.
    State dict: ``weight_int8`` (out, in) int8, ``weight_scale`` () float64, ``weight_zero_point``
    () int64 and ``bias`` (out,) float32 where there is one.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.dtype != torch.qint8 or weight.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(f"Int8Linear takes a per-tensor qint8 weight, got {weight.dtype} {weight.qscheme()}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int8", weight.int_repr())
        self.register_buffer("weight_scale", torch.tensor(weight.q_scale(), dtype=torch.float64))
        self.register_buffer("weight_zero_point", torch.tensor(weight.q_zero_point(), dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_load_state_dict_post_hook(lambda module, _keys: module.__dict__.pop("_packed", None))

    @classmethod
    def from_dynamic(cls, layer: nn.Module) -> "Int8Linear":
        """The layer ``quantize_dynamic`` made (``torch.ao.nn.quantized.dynamic.Linear``), with the same weights."""
        return cls(layer.weight(), layer.bias())

    def quantized_weight(self) -> Tensor:
        """(out, in) the ``torch.qint8`` weight the state holds."""
        with _quiet():
            return torch._make_per_tensor_quantized_tensor(
                self.weight_int8, float(self.weight_scale), int(self.weight_zero_point))

    def _packed_params(self) -> Any:
        """The weight and bias packed for the CPU kernel; packed again after a state dict is loaded."""
        packed = self.__dict__.get("_packed")
        if packed is None:
            packed = torch.ops.quantized.linear_prepack(self.quantized_weight(), self.bias)
            self.__dict__["_packed"] = packed
        return packed

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        if x.device.type != "cpu":
            raise QuantizedModelError(f"an INT8 Linear layer runs on the CPU; got an input on {x.device}")
        # reduce_range=True: activations in 7 bits, as torch.ao's dynamic Linear does on x86 (no overflow in VPMADDUBSW)
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed_params(), reduce_range=True)
        return y.to(x.dtype)

    def __getstate__(self) -> dict[str, Any]:  # the packed weights are rebuilt from the buffers (copy, pickle)
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qint8, "
                f"scale={float(self.weight_scale):.3g}, bias={self.bias is not None}")


# -- a quantised model: CPU only, inference only --------------------------------------------------
class _InferenceOnly:
    """Mixed into a quantised model's class: training and devices other than the CPU are refused."""

    def train(self, mode: bool = True) -> Any:
        if mode:
            raise QuantizedModelError(
                "this model is quantised to INT8 for inference: it cannot train or be fine-tuned further; "
                "train the float model (the folder it was quantised from) and quantise that again")
        return super().train(False)  # type: ignore[misc]

    def to(self, *args: Any, **kwargs: Any) -> Any:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            raise QuantizedModelError(
                f"this model is quantised to INT8 for the CPU (PyTorch's dynamic quantisation has CPU kernels "
                f"only); it cannot move to {device}. Run it on the CPU (cpu=true, --device cpu) or load the float "
                "model for the GPU")
        if dtype is not None and dtype != torch.float32:
            raise QuantizedModelError(f"this model is quantised to INT8; its float parts stay float32, not {dtype}")
        return super().to(*args, **kwargs)  # type: ignore[misc]

    def cuda(self, device: Any = None) -> Any:
        return self.to("cuda" if device is None else torch.device("cuda", device) if isinstance(device, int) else device)

    def half(self) -> Any:
        return self.to(torch.float16)

    def bfloat16(self) -> Any:
        return self.to(torch.bfloat16)


_INFERENCE_CLASSES: dict[type, type] = {}


def _inference_only_class(cls: type) -> type:
    """``cls`` with :class:`_InferenceOnly` mixed in (one class per ``cls``)."""
    if issubclass(cls, _InferenceOnly):
        return cls
    if cls not in _INFERENCE_CLASSES:
        _INFERENCE_CLASSES[cls] = type(f"Int8{cls.__name__}", (_InferenceOnly, cls),
                                       {"__module__": cls.__module__, "__doc__": cls.__doc__})
    return _INFERENCE_CLASSES[cls]


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` was quantised by :func:`quantize_model` (directly or loaded from an INT8 folder)."""
    return isinstance(model, _InferenceOnly)


# -- quantising a model ---------------------------------------------------------------------------
def check_quantize(value: Any, where: str = "quantize") -> str | None:
    """``value`` as a quantisation mode (None or ``"int8"``); a ConfigError naming ``where`` for anything else."""
    if value is None or (isinstance(value, str) and value in QUANTIZE_MODES):
        return value
    modes = ", ".join(f"{name!r} ({what})" for name, what in QUANTIZE_MODES.items())
    raise ConfigError(f"{where}: expected {modes} or None (float), got {value!r}")


def quantization_record(layers: int, source: str | None = None) -> dict[str, Any]:
    """What config.json's ``quantization`` holds: :data:`RECORD`, the number of layers and where it came from."""
    record: dict[str, Any] = {**RECORD, "quantized_layers": layers, "torch_version": torch.__version__.split("+")[0]}
    if source is not None:
        record["source"] = source
    return record


def quantize_model(model: M, mode: str | None = "int8", *, inplace: bool = False,
                   source: str | os.PathLike | None = None) -> M:
    """``model`` with every Linear layer dynamically quantised to INT8, for CPU inference.

    Args:
        model: a :class:`~fusionzoo.model.FusionModel` (any nn.Module whose ``config`` dict is its model config).
        mode: ``"int8"``; None returns ``model`` as it is.
        inplace: quantise ``model`` itself instead of a copy (the float model is then gone).
        source: the float folder (or Hub repo id) it was loaded from, recorded in
            ``config["quantization"]["source"]`` (a local folder as its absolute path).
    Returns:
        the quantised model, on the CPU, in eval mode; its ``config`` gains ``quantization``
        (:func:`quantization_record`). An already quantised model comes back unchanged.
    Raises:
        ConfigError: ``mode`` is not a quantisation mode.
        QuantizedModelError: the model has LoRA adapters that were not merged.
    """
    if check_quantize(mode) is None or is_quantized(model):
        return model
    if getattr(model, "config", {}).get("lora"):
        raise QuantizedModelError("quantise a model with LoRA adapters after merging them into its weights "
                                  "(save_pretrained(..., merge_lora=True), then quantise that folder)")
    if not inplace:
        model = copy.deepcopy(model)
    model.to("cpu").eval()
    layers = _quantize_linears(model)
    model.__class__ = _inference_only_class(type(model))
    if isinstance(getattr(model, "config", None), dict):
        if source is not None and Path(source).is_dir():
            source = Path(source).resolve()
        model.config["quantization"] = quantization_record(layers, None if source is None else str(source))
    return model


def _quantize_linears(model: nn.Module) -> int:
    """Replace every float Linear of ``model`` by its :class:`Int8Linear` (quantize_dynamic's weights); how many."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    # quantize_dynamic matches exact types: fusionzoo's Linear (nn.Linear's parameters) becomes an nn.Linear first
    for name, layer in list(model.named_modules()):
        if type(layer) is Linear:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            _replace(model, name, plain)
    with _quiet():
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    for module in model.modules():  # the qconfig quantize_dynamic leaves on every module has done its job
        module.__dict__.pop("qconfig", None)
    count = 0
    for name, layer in list(model.named_modules()):
        if type(layer) is DynamicLinear:
            _replace(model, name, Int8Linear.from_dynamic(layer))
            count += 1
    return count


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PyTorch 2.10+ warns that torch.ao.quantization and quantised-tensor constructors are deprecated (torchao
    succeeds them); they still work, and saying so at every load would only be noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        yield


# -- loading an INT8 folder -------------------------------------------------------------------------
def check_record(record: Any, where: str) -> dict[str, Any]:
    """config.json's ``quantization`` object, checked; a ModelFolderError naming ``where`` and the key."""
    if not isinstance(record, dict):
        raise ModelFolderError(f"{where}: key 'quantization' must be an object (or null for a float model), "
                               f"got {record!r}")
    for key, expected in RECORD.items():
        if record.get(key) != expected:
            raise ModelFolderError(
                f"{where}: key 'quantization.{key}' is {record.get(key)!r}; this fusionzoo reads INT8 folders with "
                f"{key} {expected!r} (written by `fusionzoo quantize` / quantize_model)")
    layers = record.get("quantized_layers")
    if type(layers) is not int or layers < 0:
        raise ModelFolderError(f"{where}: key 'quantization.quantized_layers' must be an int >= 0, got {layers!r}")
    if not isinstance(record.get("source", ""), str):
        raise ModelFolderError(f"{where}: key 'quantization.source' must be the float model's folder (a string), "
                               f"got {record['source']!r}")
    return record


def saved_quantized(build: Callable[..., M], where: str = "config.json") -> Callable[..., M]:
    """``build`` (load_folder's model builder) followed by quantisation when the config says the folder is INT8.

    The quantised model's state dict is that of the saved folder, so load_folder then loads
    model.safetensors into it strictly, exactly as into a float model. ``where`` names the
    config file in errors.
    """

    def build_then_quantize(*parts: Any, **kwargs: Any) -> M:
        model = build(*parts, **kwargs)
        record = getattr(model, "config", {}).get("quantization")
        if record is None:
            return model
        record = check_record(record, where)
        quantized = quantize_model(model, "int8", inplace=True)
        layers = quantized.config["quantization"]["quantized_layers"]
        if layers != record["quantized_layers"]:
            raise ModelFolderError(f"{where}: key 'quantization.quantized_layers' says {record['quantized_layers']} "
                                   f"Linear layers were quantised, but the model it describes has {layers}")
        quantized.config["quantization"] = record
        return quantized

    return build_then_quantize


def refuse_quantized_weights(weights: Path, what: str) -> None:
    """A QuantizedModelError when the model.safetensors at ``weights`` belongs to an INT8 folder.

    Its int8 weights carry other names than a float model's (``weight_int8``, ...), so copying
    tensors by name (``init_from``) would quietly leave every Linear layer at its initialisation.
    """
    import json

    try:
        record = json.loads((Path(weights).parent / "config.json").read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return
    if record is not None:
        source = record.get("source") if isinstance(record, dict) else None
        raise QuantizedModelError(
            f"{what}: {Path(weights).parent} holds an INT8 model (config.json has 'quantization'), which is for "
            f"inference only; train from the float model it was quantised from"
            + (f" ({source})" if source else ""))
