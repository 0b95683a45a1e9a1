"""Optimiser and schedule: AdamW with decay / no-decay groups, warmup then cosine.

As in nanoGPT and BERT: weights of matrices (2-D and up) decay; biases, norms,
embeddings' position/type tables and learned scalars (temperature) do not.
Unfrozen encoders get their own learning rate (``encoder_lr``); LoRA adapters in them train at ``lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Parameter-name prefixes of a FusionModel's encoders: the group trained at ``encoder_lr``.
ENCODER_PREFIXES = ("vision.", "text.")


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, encoder_lr: float | None = None,
    encoder_prefixes: tuple[str, ...] = ENCODER_PREFIXES,
) -> list[dict]:
    """Four groups at most: {fusion/head, encoders} x {decay, no decay}; frozen params skipped."""
    encoder_lr = lr / 10 if encoder_lr is None else encoder_lr
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # LoRA adapters are new weights (their B starts at zero): they train at ``lr``, not the encoders' rate
        is_encoder = name.startswith(encoder_prefixes) and ".lora_" not in name
        no_decay = p.ndim < 2 or "position" in name or "type_embed" in name or "norm" in name.lower()
        groups.setdefault((is_encoder, not no_decay), []).append(p)
    out = []
    for (is_encoder, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": encoder_lr if is_encoder else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'encoder' if is_encoder else 'fusion_head'}_{'decay' if decay else 'no_decay'}",
        })
    if not out:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    encoder_lr: float | None = None,
                    encoder_prefixes: tuple[str, ...] = ENCODER_PREFIXES) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, with the fused kernel where torch has one, else foreach.

    The fused kernel does the whole update of all parameters in one call per dtype
    and device: CUDA, and CPU since torch 2.4. On CPU it matters most for small models,
    whose step is mostly per-operator overhead: the one call replaces the optimiser's
    many small operations per parameter tensor.
    """
    groups = parameter_groups(model, lr, weight_decay, encoder_lr, encoder_prefixes)
    device_type = next(p for g in groups for p in g["params"]).device.type
    if device_type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except RuntimeError:  # torch < 2.4 on CPU: no fused CPU kernel
            pass
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup, then cosine.

    ``(step + 1) / warmup_steps`` during the warmup, then a cosine from 1 down to
    ``min_ratio`` at ``total_steps``. A pure function of the step, so a schedule is
    the same however many processes run it and needs no state in a checkpoint.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
