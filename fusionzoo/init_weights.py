"""Starting a model from another model's weights: every saved tensor whose name and shape match.

What ``init_from=`` does in ``fusionzoo train`` / ``pretrain`` and ``create_model(init_from=...)``:
a task starts from another task's, a pretraining run's or a shared model's weights -- the
encoders and the fusion carry over, a head of another shape does not. The source may be a
saved model folder, a run's ``output_dir``, a LoRA adapters folder (its weights with the
adapters folded in) or a Hub repo id (its snapshot in the Hub cache, :mod:`fusionzoo.hub`).
An INT8 folder is refused (its Linear weights are not float tensors of the same names).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError
from .hub import resolve_model_folder
from .quantize import refuse_quantized_weights

logger = logging.getLogger(__name__)

__all__ = ["load_matching_weights"]


def load_matching_weights(model: nn.Module, source: str | Path, verbose: bool = False) -> dict[str, int]:
    """Copy every tensor of a saved model (``model.safetensors``) whose name and shape match.

    Used to start a task from another task's or ALBEF pretraining's weights: the
    encoders and fusion carry over, a head of another shape does not. With
    ``verbose`` the main process prints what was loaded, per top-level module. A folder of LoRA
    adapters gives its weights with the adapters folded in.
    """
    import safetensors.torch

    path = resolve_model_folder(source)  # a Hub repo id: its snapshot in the Hub cache
    for folder in (path, path / "final"):
        if (folder / "adapters.safetensors").is_file() and (folder / "config.json").is_file():
            return _load_matching(model, _merged_lora_state(folder), folder / "adapters.safetensors", verbose)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        final = path / "final" / "model.safetensors"
        if final.is_file():
            weights = final
        else:
            raise CheckpointError(f"init_from={source!r}: no model.safetensors there (nor under final/); "
                                  "expected a saved model folder or a run's output_dir")
    refuse_quantized_weights(weights, f"init_from={source!r}")
    return _load_matching(model, safetensors.torch.load_file(str(weights)), weights, verbose)


def _merged_lora_state(folder: Path) -> dict[str, Any]:
    """The weights of a LoRA model's folder with its adapters folded in (what ``lora_merge=true`` saves)."""
    from .lora import merge_lora
    from .model import load_model

    return merge_lora(load_model(folder)).state_dict()


def _load_matching(model: nn.Module, saved: dict[str, Any], weights: Path, verbose: bool) -> dict[str, int]:
    """Copy the tensors of ``saved`` (read from ``weights``) whose name and shape match ``model``'s."""
    from collections import Counter

    for source_prefix, target_prefix in getattr(model, "init_aliases", {}).items():  # e.g. itm.head. -> head.linear.
        for key in [k for k in saved if k.startswith(source_prefix)]:
            saved.setdefault(target_prefix + key[len(source_prefix):], saved[key])
    own = model.state_dict()
    matched = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    stats = {"loaded": len(matched), "skipped": len(saved) - len(matched), "missing": len(own) - len(matched)}

    def by_part(keys) -> str:  # "vision 294, text 101, fusion 40"
        counts = Counter(key.split(".", 1)[0] for key in keys)
        return ", ".join(f"{part} {n}" for part, n in counts.items()) or "none"

    message = (f"init_from {weights}: loaded {stats['loaded']} tensors ({by_part(matched)}); skipped "
               f"{stats['skipped']} saved tensors absent here or of another shape "
               f"({by_part(k for k in saved if k not in matched)}); {stats['missing']} tensors of this model "
               f"kept their initialisation ({by_part(k for k in own if k not in matched)})")
    logger.info(message)
    if verbose:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(message, flush=True)
    return stats
