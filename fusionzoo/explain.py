"""Where a model looks: a map over the image of how much an answer, or each caption word, depends on it.

:func:`explain` runs a :class:`~fusionzoo.model.FusionModel` on one image (and a question or
text) and returns an :class:`Explanation`: one map over the encoder's patch grid per target
(the answer or label; for captioning each generated word), each summing to 1.

* **Attention rollout** for a fusion that defines ``attention_rollout``
  (:mod:`fusionzoo.rollout`: ``merged_transformer``, ``co_attention``, ``albef``): the
  attention of one forward pass, rolled out through the layers from the position the target
  is read from (VQA and classification: the pooled vector; captioning: the position before
  the word) to the image tokens.
* **Input x gradient** for the others (Shrikumar et al. 2016; Simonyan et al. 2014 for the
  gradient): ``|sum_d x_nd * d score / d x_nd|`` over the image tokens ``x`` (N, D) fed to
  the fusion, where ``score`` is the target's logit (the answer, the label) or log-probability
  (a caption word).

An encoder's prefix tokens (a ViT's class and register tokens) have no place in the image and
are left out of the maps; what they carried stays unattributed. The grid is placed on the image
where the encoder's evaluation preprocessing (resize, centre crop) took it from
(:func:`crop_box`), so :meth:`Explanation.heatmap` is over the image's own pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .rollout import record_attention

ROLLOUT = "attention rollout"
GRADIENT = "input x gradient"
METHODS = ("auto", "attention", "gradient")


@dataclass
class Explanation:
    """What :func:`explain` returns.

    Attributes:
        method: ``"attention rollout"`` or ``"input x gradient"``.
        targets: what each map explains: the answer / label, or each caption token in order (WordPiece
            pieces as the tokenizer has them: ``surf``, ``##board``).
        maps: (K, h, w) float32, one map per target over the encoder's patch grid, each summing to 1.
        image: the image explained (RGB).
        crop_box: (left, top, right, bottom) in ``image`` pixels: the part the grid covers.
        answer: the answer or label; for captioning the caption as ``model.generate`` (and so
            ``fusionzoo predict``) writes it, decoded by the tokenizer from the tokens of ``targets``.
        question: the question or text asked (None for captioning).
        fusion: the model's fusion, by registry name.
    """

    method: str
    targets: list[str]
    maps: Tensor
    image: Image.Image
    crop_box: tuple[float, float, float, float]
    answer: str
    question: str | None = None
    fusion: str = ""

    def heatmap(self, index: int = 0) -> np.ndarray:
        """(H, W) float32 over the pixels of :attr:`image`: map ``index`` spread bilinearly over
        :attr:`crop_box`, zero outside it, summing to 1."""
        width, height = self.image.size
        left, top, right, bottom = self.crop_box
        # Sample the grid at every pixel centre: cell (i, j) covers 1/h x 1/w of the box.
        h, w = self.maps.shape[1:]
        ys = (np.arange(height) + 0.5 - top) / (bottom - top) * h - 0.5  # grid row coordinate of each pixel
        xs = (np.arange(width) + 0.5 - left) / (right - left) * w - 0.5
        grid = torch.stack(torch.meshgrid(torch.as_tensor((xs + 0.5) / w * 2 - 1),
                                          torch.as_tensor((ys + 0.5) / h * 2 - 1), indexing="xy"), dim=-1)
        values = F.grid_sample(self.maps[index][None, None].double(), grid[None], mode="bilinear",
                               padding_mode="border", align_corners=False)[0, 0].numpy()  # (H, W)
        inside = ((xs[None, :] >= -0.5) & (xs[None, :] <= w - 0.5) & (ys[:, None] >= -0.5) & (ys[:, None] <= h - 0.5))
        values = np.where(inside, values, 0.0)
        total = values.sum()
        return (values / total if total > 0 else values).astype(np.float32)


def crop_box(size: tuple[int, int], data_config: dict[str, Any]) -> tuple[float, float, float, float]:
    """The part of an image of ``size`` (width, height) that timm's evaluation transform keeps.

    timm resizes to ``input_size / crop_pct`` and crops the centre ``input_size``: with
    ``crop_mode`` ``"center"`` (the default) the shorter side is resized, keeping the aspect;
    with ``"squash"`` both sides are. Returns (left, top, right, bottom) in the image's pixels.

    Raises:
        ValueError: another ``crop_mode`` (``"border"`` pads, which has no box in the image).
    """
    width, height = size
    _, out_h, out_w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875
    mode = data_config.get("crop_mode") or "center"
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if mode == "squash":
        resized_w, resized_h = scale_w, scale_h
    elif mode == "center":
        if scale_h == scale_w:  # torchvision's Resize(int): the shorter side to it, the longer in proportion
            short, long = sorted((width, height))
            other = int(scale_h * long / short)
            resized_w, resized_h = (scale_h, other) if width <= height else (other, scale_h)
        else:
            ratio = min(scale_h / height, scale_w / width)
            resized_w, resized_h = round(width * ratio), round(height * ratio)
    else:
        raise ValueError(f"cannot place a heat map through crop_mode {mode!r} (data config {data_config}); "
                         "explain follows 'center' and 'squash'")
    x0, y0 = int(round((resized_w - out_w) / 2.0)), int(round((resized_h - out_h) / 2.0))
    sx, sy = width / resized_w, height / resized_h
    return (x0 * sx, y0 * sy, (x0 + out_w) * sx, (y0 + out_h) * sy)


def explain(model: nn.Module, image: Image.Image, question: str | None = None, *, method: str = "auto",
            **decoding: Any) -> Explanation:
    """Map how much the model's answer (or each word of its caption) depends on each image region.

    Args:
        model: a :class:`~fusionzoo.model.FusionModel`.
        image: a PIL image (any mode).
        question: the question (VQA), the text (classification, retrieval); None for captioning.
        method: ``"auto"`` (rollout where the fusion has ``attention_rollout``, else gradients),
            ``"attention"`` or ``"gradient"``.
        decoding: how the caption is generated (captioning): the fields of
            :class:`~fusionzoo.decoding.DecodingOptions` (``num_beams``, ``max_new_tokens``, ...), as
            ``model.generate`` takes them, so the caption explained is the one it writes.
    Returns:
        :class:`Explanation`. The model's modes are restored afterwards.
    Raises:
        ValueError: an unknown ``method``, ``"attention"`` for a fusion without rollout, a
            question for captioning or none for another task.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rollout = getattr(model.fusion, "attention_rollout", None)
    fusion = model.fusion.registry_name or type(model.fusion).__name__
    if method == "attention" and rollout is None:
        raise ValueError(f"fusion {fusion!r} has no attention over image tokens to roll out "
                         "(no attention_rollout); use method='gradient'")
    use_rollout = rollout is not None and method != "gradient"
    causal = bool(model.head.causal)
    if causal and question is not None:
        raise ValueError(f"a {model.task} model writes text about the image alone; pass no question")
    if not causal and not question:
        raise ValueError(f"a {model.task} model answers a question or text about the image; pass question=...")

    image = image.convert("RGB")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        pixels = model.vision.preprocess([image]).to(model.device, model.dtype)  # (1, 3, H, W)
        with torch.no_grad():
            tokens = model.vision(pixels).tokens  # (1, N, Di)
        ids, mask, positions, targets = _text_and_targets(model, pixels, question, decoding)
        if use_rollout:
            relevance = _rollout(model, tokens, ids, mask, positions, causal)
        else:
            relevance = _input_x_gradient(model, tokens, ids, mask, positions, targets, causal)
    finally:
        for module, training in modes:
            module.training = training
    prefix = model.vision.num_prefix_tokens
    rows, cols = model.vision.token_grid(tokens.shape[1], pixels.shape[2], pixels.shape[3])
    maps = relevance[:, prefix:].float().clamp_min(0).reshape(-1, rows, cols)  # (K, h, w)
    totals = maps.sum(dim=(1, 2), keepdim=True)
    maps = torch.where(totals > 0, maps / totals.clamp_min(1e-30), torch.full_like(maps, 1.0 / (rows * cols)))
    names = _target_names(model, targets, causal)
    # a caption as model.generate decodes it ("the ocean.", not the tokens joined: "the ocean .")
    answer = model.text.tokenizer.decode(targets, skip_special_tokens=True).strip() if causal else names[0]
    return Explanation(method=ROLLOUT if use_rollout else GRADIENT, targets=names, maps=maps.cpu(), image=image,
                       crop_box=crop_box(image.size, model.vision.data_config), answer=answer, question=question,
                       fusion=fusion)


# -- what is explained ----------------------------------------------------------------------------
def _text_and_targets(model: nn.Module, pixels: Tensor, question: str | None, decoding: dict[str, Any]
                      ) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """The text ids and mask (1, T) of the forward, the position each target is read from, the targets.

    VQA / classification: the question, position -1 (the pooled vector), the argmax answer.
    Captioning: the generated caption without its [SEP], position k-1 for word k.
    """
    if not model.head.causal:
        batch = model.text.tokenize([question], max_length=model.max_text_len)
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        with torch.no_grad():
            logits = _forward(model, model.vision(pixels).tokens, ids, mask, causal=False)[0]  # (1, C)
        return ids, mask, [-1], [int(logits[0].argmax())]
    generated = model.generate_ids(pixels, **decoding)[0]  # (1 + L,)
    special = {model.text.eos_token_id, model.text.pad_token_id}
    words = [int(i) for i in generated[1:].tolist()]
    words = words[: next((k for k, w in enumerate(words) if w in special), len(words))]
    if not words:
        raise ValueError("the model generated an empty caption: nothing to explain")
    ids = generated[None, : 1 + len(words)]  # (1, 1 + K): [CLS] and the words
    return ids, torch.ones_like(ids), list(range(len(words))), words


def _target_names(model: nn.Module, targets: list[int], causal: bool) -> list[str]:
    if causal:
        return model.text.tokenizer.convert_ids_to_tokens(targets)
    vocabulary = model.vocabulary or list(getattr(model.head, "labels", ()))
    return [vocabulary[i] for i in targets]


def _forward(model: nn.Module, tokens: Tensor, ids: Tensor, mask: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Head logits (1, C) or (1, T, V) and the text mask, through the whole fusion (no ``pooled_only``)."""
    text_mask = mask.bool()
    states = model.text(ids, mask).states  # (1, T, Dt)
    fused = model.fusion(states, text_mask, tokens, None, causal=causal)
    vote = model.fusion.vote if model.fusion.decision_level else None
    logits = model.head(fused, vote=vote)
    if causal and hasattr(model.head, "full_vocabulary"):
        logits = model.head.full_vocabulary(logits)  # (1, T, V)
    return logits, text_mask


def _rollout(model: nn.Module, tokens: Tensor, ids: Tensor, mask: Tensor, positions: list[int],
             causal: bool) -> Tensor:
    """(K, N) rolled-out attention from each target's position to the image tokens."""
    with torch.no_grad(), record_attention(model.fusion) as attention:
        _, text_mask = _forward(model, tokens, ids, mask, causal)
        relevance = model.fusion.attention_rollout(attention, text_mask, None, causal)
    if positions == [-1]:
        return relevance.pooled  # (1, N)
    return relevance.text_tokens[0, positions]  # (K, N)


def _input_x_gradient(model: nn.Module, tokens: Tensor, ids: Tensor, mask: Tensor, positions: list[int],
                      targets: list[int], causal: bool) -> Tensor:
    """(K, N) ``|sum_d x * grad|`` of each target's score with respect to the image tokens x."""
    x = tokens.detach().clone().requires_grad_(True)  # (1, N, Di)
    with torch.enable_grad():
        logits, _ = _forward(model, x, ids, mask, causal)
        rows = []
        for k, (position, target) in enumerate(zip(positions, targets)):
            if causal:
                score = logits[0, position].float().log_softmax(dim=-1)[target]
            else:
                score = logits[0, target].float()
            (grad,) = torch.autograd.grad(score, x, retain_graph=k + 1 < len(targets))
            rows.append((x * grad).sum(dim=-1)[0].abs().detach())  # (N,)
    return torch.stack(rows)  # (K, N)
