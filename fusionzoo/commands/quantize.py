"""``fusionzoo quantize`` and the ``quantize=int8`` key of ``fusionzoo eval`` / ``fusionzoo predict``.

``fusionzoo quantize RUN --out RUN-int8`` writes the INT8 model (:mod:`fusionzoo.quantize`) of a
saved float model into a folder that ``load_model`` reads. ``fusionzoo eval`` of an INT8 folder,
or of a float one with ``quantize=int8``, scores the INT8 and the float model on the same split
with the same settings, both on the CPU, and prints both and their difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import OutputDirError, QuantizedModelError

QUANTIZE_HELP = """\
Every Linear layer (the encoders', the fusion's, the head's) gets an int8 weight with one scale
(torch.ao.quantization.quantize_dynamic, qint8); activations are quantised per batch inside each
product. Embeddings, convolutions (an EfficientNet image encoder is all convolutions) and
normalisation stay float32. The INT8 model runs on the CPU only and does not train.
OUT holds config.json (with "quantization": what was done, and "source": RUN's model folder),
model.safetensors (int8 weights with their scales, float32 for the rest), text_encoder/, tokenizer/
and README.md. Load it with fusionzoo.load_model(OUT); `fusionzoo eval OUT` scores it beside RUN.
"""


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an INT8 (dynamically quantised) copy of a saved model for CPU inference",
        description="Quantise the Linear layers of a saved model to INT8 (PyTorch dynamic quantisation) and save "
        "the result where fusionzoo.load_model, `fusionzoo eval` and `fusionzoo predict` read it.",
        epilog=QUANTIZE_HELP + "\nexamples:\n  fusionzoo quantize runs/vqa --out runs/vqa-int8\n"
        "  fusionzoo eval runs/vqa-int8 split=test        # INT8 and float scores, and the difference\n"
        "  fusionzoo eval runs/vqa quantize=int8 split=test   # the same without writing a folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="RUN", help="a saved float model folder (with config.json) or a run's output_dir")
    p.add_argument("--out", required=True, metavar="OUT", help="the folder to write the INT8 model to")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in OUT")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from ..model import load_model
    from ..model_folder import WEIGHTS_NAME
    from ..quantize import is_quantized, quantize_model
    from ..training.trainer import resolve_model_dir

    source = resolve_model_dir(args.checkpoint)
    out = Path(args.out)
    if out.resolve() == source.resolve():
        raise OutputDirError(f"--out {out} is the float model's own folder; give the INT8 model a folder of its own")
    if (out / "config.json").exists() and not args.overwrite:
        raise OutputDirError(f"--out {out} already holds a saved model (config.json); pass --overwrite to replace it")
    model = load_model(source)
    if is_quantized(model):
        raise QuantizedModelError(f"{source} is already quantised ({json.dumps(model.config['quantization'])}); "
                                  "quantise the float model it came from")
    quantized = quantize_model(model, "int8", inplace=True, source=source)
    quantized.save_pretrained(out)
    float_bytes, int8_bytes = (source / WEIGHTS_NAME).stat().st_size, (out / WEIGHTS_NAME).stat().st_size
    layers = quantized.config["quantization"]["quantized_layers"]
    print(f"fusionzoo quantize: wrote {out}: {layers} Linear layers in INT8; {WEIGHTS_NAME} {int8_bytes / 1e6:.1f} MB "
          f"against {float_bytes / 1e6:.1f} MB in float32 ({int8_bytes / float_bytes:.3f}x)", file=sys.stderr)
    print(json.dumps({"out": str(out), "source": str(source), "quantized_layers": layers,
                      "weights_bytes": int8_bytes, "float_weights_bytes": float_bytes,
                      "size_ratio": round(int8_bytes / float_bytes, 4)}))
    return 0


# -- the quantize key of eval and predict -----------------------------------------------------------
def take_quantize(overrides: list[str]) -> tuple[str | None, list[str]]:
    """The ``quantize=...`` override (checked) and the other overrides, in their order."""
    from ..quantize import check_quantize

    mode, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "quantize":
            value = value.strip()
            mode = check_quantize(None if value.lower() in ("", "none", "null", "false", "no") else value,
                                  "command line: key 'quantize'")
        else:
            rest.append(item)
    return mode, rest


def saved_quantization(folder: str | Path) -> dict[str, Any] | None:
    """The ``quantization`` record of ``folder``'s config.json (None for a float model or no readable config)."""
    path = Path(folder) / "config.json"
    try:
        record = json.loads(path.read_text())["quantization"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def float_source(folder: str | Path) -> Path | None:
    """The float model folder an INT8 folder was quantised from, where it still holds a saved model."""
    record = saved_quantization(folder)
    source = record.get("source") if record else None
    if isinstance(source, str) and (Path(source) / "config.json").is_file():
        return Path(source)
    return None


def evaluate_int8(checkpoint: str, config: Any, mode: str | None) -> dict[str, Any]:
    """``fusionzoo eval`` of an INT8 model beside its float model, on the CPU with the same settings.

    ``checkpoint`` is an INT8 folder (its float model is config.json's ``quantization.source``,
    scored where it still exists) or a float one with ``mode="int8"`` (quantised in memory and
    saved to a temporary folder, so the INT8 score is that of a saved and reloaded model).

    Returns:
        the INT8 model's scores, with ``float`` (the float model's, or None), ``int8_minus_float``
        (the difference of every number in both) and ``quantization`` (config.json's record).
    """
    from ..model import load_model
    from ..training.trainer import evaluate_checkpoint, resolve_model_dir

    folder = resolve_model_dir(checkpoint)
    config.cpu = True  # INT8 kernels are CPU kernels; the float model is scored there too, for a like-for-like figure

    def score(path: Path) -> dict[str, Any]:
        return evaluate_checkpoint(path, copy.deepcopy(config))

    record = saved_quantization(folder)
    if record is None:  # a float folder and quantize=int8
        float_scores = score(folder)
        with tempfile.TemporaryDirectory(prefix="fusionzoo-int8-") as tmp:
            saved = load_model(folder, quantize=mode).save_pretrained(Path(tmp) / "int8")
            record = saved_quantization(saved)
            int8_scores = score(saved)
    else:
        int8_scores = score(folder)
        source = float_source(folder)
        float_scores = score(source) if source is not None else None
        if source is None:
            print(f"fusionzoo eval: {folder} records no float model folder that still exists "
                  f"(quantization.source: {record.get('source')!r}); scoring the INT8 model alone", file=sys.stderr)
    result = {**int8_scores, "float": float_scores, "int8_minus_float": _difference(int8_scores, float_scores),
              "quantization": record}
    _print_comparison(int8_scores, float_scores)
    return result


def _difference(int8: dict[str, Any], float_: dict[str, Any] | None) -> dict[str, Any] | None:
    """``int8 - float`` for every number (nested dicts too) the two score dicts share."""
    if float_ is None:
        return None
    out: dict[str, Any] = {}
    for key, value in int8.items():
        other = float_.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            out[key] = _difference(value, other)
        elif isinstance(value, (int, float)) and isinstance(other, (int, float)) and not isinstance(value, bool):
            out[key] = round(value - other, 6)
    return out


def _print_comparison(int8: dict[str, Any], float_: dict[str, Any] | None) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process or float_ is None:
        return
    parts = [f"{key} {value:.4g} (float {float_[key]:.4g}, {value - float_[key]:+.4g})" for key, value in int8.items()
             if isinstance(value, (int, float)) and isinstance(float_.get(key), (int, float))]
    print("fusionzoo eval: INT8 " + "; ".join(parts), file=sys.stderr)


def quantized_eval_job(checkpoint: str, mode: str | None) -> Callable[[Any], dict[str, Any]] | None:
    """The eval job for ``checkpoint`` when it is INT8 or ``mode`` asks for INT8; None for a plain float eval."""
    from ..training.trainer import resolve_model_dir

    if mode is None and saved_quantization(resolve_model_dir(checkpoint)) is None:
        return None
    return lambda config: evaluate_int8(checkpoint, config, mode)
