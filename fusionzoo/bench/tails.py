"""``--train-encoders N``: fine-tune the last N blocks of both encoders, keeping the cache for the rest.

The benchmark's encoders are frozen, so their outputs are computed once and cached
(:mod:`fusionzoo.bench.features`). Training the last N blocks changes only what those
blocks compute, so the run splits each encoder in two
(:meth:`~fusionzoo.encoders.VisionEncoder.tail_inputs` / :meth:`~fusionzoo.encoders.VisionEncoder.tail`,
and the same on :class:`~fusionzoo.encoders.TextEncoder`):

1. **cache** -- the frozen part's output, the *tail inputs* (the input of the last N
   blocks), is extracted once per image and per text and cached under keys of their own
   (``output: tail-inputs-<N>``), never mistaken for final outputs;
2. **statistics** -- the untrained tails run once per run over every cached row
   (:func:`untrained_image_tokens`, :func:`untrained_text_states`): their outputs are the frozen
   encoders' features, from which each row's
   :class:`~fusionzoo.bench.standardize.StandardizedFusion` takes its train-split
   statistics, as without ``--train-encoders``;
3. **rows** -- each row (and each of its seeds) deep-copies both tails under its seed
   (:func:`with_encoder_tails`), so rows never share trained weights and the run's encoders
   stay as they were. An :class:`EncoderTailsModel` runs a batch as: cached tail inputs ->
   tails -> (image: the suite's :func:`~fusionzoo.bench.features.pool_image_tokens` grid and
   :func:`~fusionzoo.bench.features.add_position_channels`, as for frozen features) -> fusion
   and head.

Training choices:

* the optimiser trains the tails, the fusion and the head; the tails at a tenth of the row's
  learning rate (:data:`EncoderTailsModel.ENCODER_PREFIXES`, the encoder group of
  :func:`~fusionzoo.training.optim.parameter_groups`, as ``fusionzoo train`` trains unfrozen
  encoders), so a rate chosen for a fresh fusion does not wipe out pretrained blocks;
* BatchNorm layers of the image tail keep their running statistics (eval mode) while their
  scale and shift train: the fusion is standardised with, and evaluated on, the same
  statistics, and small batches do not replace ImageNet's;
* the tails keep the encoders' own dropout (BERT's hidden and attention dropout, 0.1 in MiniLM;
  a timm model's drop-path rate, 0 unless its spec sets one).

``--train-encoders lora:N`` trains the same N blocks through LoRA adapters instead (rank
``--lora-r``, alpha twice the rank, as ``fusionzoo train peft=lora``; :func:`fusionzoo.lora.adapt_module`):
every Linear and 1-group Conv2d of the tails gets an adapter, their own weights stay frozen and
in eval mode (no dropout, BatchNorm statistics kept), and the adapters train at the row's
learning rate (they start at zero: the first step is the frozen model's).

Supported: VQA and classification tasks (the rows scored through
:func:`~fusionzoo.bench.loop.predict_logits`). Captioning generates with the live text
encoder and retrieval embeds galleries apart, neither through a tail; a suite that reads an
intermediate stage of the image encoder (``image_stage``, Sort-of-CLEVR) would not see the
last blocks at all. Those fail with a :class:`~fusionzoo.bench.suites.BenchError` before any
data is read. Meant for a GPU: every step runs the tails forward and backward.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..encoders import TextEncoder, VisionEncoder
from ..lora import LoraSpec, adapt_module, keep_base_in_eval
from ..model import FusionModel, ModelOutput
from .features import FEATURE_DTYPE, add_position_channels, pool_image_tokens
from .suites import MODEL_TASKS, BenchError, Suite

#: Model tasks whose rows ``--train-encoders`` supports: trained by ``run_prediction_row`` and scored
#: through ``predict_logits``.
TAIL_MODEL_TASKS = ("vqa", "classification")


# --------------------------------------------------------------------------------------
# Checks, before any data is read
# --------------------------------------------------------------------------------------
def parse_train_encoders(value: str) -> tuple[int, bool]:
    """``--train-encoders``: ``N`` (the last N blocks' weights) or ``lora:N`` (their LoRA adapters;
    ``lora`` alone is ``lora:1``) -> (N, with LoRA)."""
    text = value.strip()
    lora = text == "lora" or text.startswith("lora:")
    number = text.partition(":")[2] if lora else text
    try:
        blocks = int(number) if number else 1
    except ValueError:
        raise BenchError(f"--train-encoders takes N (the last N blocks of both encoders) or lora:N (the same blocks "
                         f"through LoRA adapters), got {value!r}") from None
    if lora and blocks < 1:
        raise BenchError(f"--train-encoders lora:N takes N >= 1 blocks, got {value!r}")
    return blocks, lora


def check_tail_tasks(train_encoders: int, suite: Suite, task_names: Sequence[str]) -> None:
    """A :class:`BenchError` unless ``--train-encoders`` can run ``task_names`` of ``suite``."""
    if isinstance(train_encoders, bool) or not isinstance(train_encoders, int) or train_encoders < 0:
        raise BenchError(f"--train-encoders takes a number of last blocks >= 0, got {train_encoders!r}")
    if not train_encoders:
        return
    if suite.image_stage is not None:
        raise BenchError(f"--train-encoders: the {suite.name!r} suite feeds the fusions stage {suite.image_stage} "
                         "of the image encoder, which its last blocks do not change; train encoders on "
                         "another suite (easy-vqa, coco, vqav2)")
    other = [name for name in task_names if MODEL_TASKS[name] not in TAIL_MODEL_TASKS]
    if other:
        raise BenchError("--train-encoders trains VQA and classification tasks only, not "
                         + ", ".join(f"{name} ({MODEL_TASKS[name]})" for name in other)
                         + "; leave them out with --tasks")


def check_tail_blocks(train_encoders: int, vision: VisionEncoder, text: TextEncoder,
                      vision_name: str, text_name: str) -> None:
    """A :class:`BenchError` unless both encoders have ``train_encoders`` blocks to train (names the encoder)."""
    for option, name, encoder in (("--vision", vision_name, vision), ("--text", text_name, text)):
        try:
            blocks = encoder.num_blocks()
        except ValueError as exc:
            raise BenchError(f"--train-encoders with {option} {name}: {exc}") from exc
        if train_encoders > blocks:
            raise BenchError(f"--train-encoders {train_encoders}: {option} {name} has only {blocks} blocks "
                             f"(choose 1..{blocks})")


# --------------------------------------------------------------------------------------
# The untrained tails' outputs (the statistics' source)
# --------------------------------------------------------------------------------------
@torch.no_grad()
def untrained_image_tokens(tail: nn.Module, tail_inputs: Tensor, grid: int | None, *, device: torch.device,
                           batch_size: int = 256, progress: bool = True, prefix_tokens: int = 0
                           ) -> tuple[Tensor, list[int]]:
    """The (untrained) image tail over every cached row, pooled to ``grid`` as the run's features are.

    Args:
        tail: :meth:`VisionEncoder.tail` of the run's frozen encoder, on ``device``.
        tail_inputs: (U, ...) float16 tail inputs, one row per image.
        grid: :func:`pool_image_tokens`' grid, applied per batch (the full grid is never held).
    Returns:
        tokens (U, G, Di) float16 on CPU -- the frozen encoder's pooled tokens, up to the
        float16 rounding of the stored tail inputs -- and the shape (N, Di) of the tail's
        tokens before pooling.
    """
    out: Tensor | None = None
    shape: list[int] = []
    with tqdm(total=len(tail_inputs), desc="untrained image tail", unit="img", disable=not progress,
              leave=False) as bar:
        for begin in range(0, len(tail_inputs), batch_size):
            x = tail_inputs[begin: begin + batch_size].to(device, torch.float32)
            tokens = tail(x).float()  # (b, N, Di)
            shape = list(tokens.shape[1:])
            pooled = pool_image_tokens(tokens, grid, prefix_tokens=prefix_tokens).cpu()  # (b, G, Di)
            if out is None:
                out = torch.from_numpy(np.empty((len(tail_inputs), *pooled.shape[1:]), dtype=FEATURE_DTYPE))
            out[begin: begin + len(x)] = pooled.to(out.dtype)
            bar.update(len(x))
    if out is None:
        raise BenchError("--train-encoders: no images to encode")
    return out, shape


@torch.no_grad()
def untrained_text_states(tail: nn.Module, tail_inputs: Tensor, mask: Tensor, *, device: torch.device,
                          batch_size: int = 256, progress: bool = True) -> Tensor:
    """The (untrained) text tail over every cached text: (U, T, Dt) float16 states on CPU, padding as zeros.

    Texts run longest first, each batch trimmed to its longest text, as
    :func:`~fusionzoo.bench.features.text_features` extracts; the states are the frozen
    encoder's, up to the float16 rounding of the stored tail inputs.
    """
    lengths = mask.sum(dim=1)  # (U,)
    order = torch.argsort(lengths, descending=True)
    states = torch.zeros(tail_inputs.shape, dtype=tail_inputs.dtype)  # (U, T, Dt) float16
    with tqdm(total=len(order), desc="untrained text tail", unit="text", disable=not progress, leave=False) as bar:
        for begin in range(0, len(order), batch_size):
            rows = order[begin: begin + batch_size]  # (b,)
            width = int(lengths[rows].max())
            batch_mask = mask[rows, :width].to(device)  # (b, width)
            out = tail(tail_inputs[rows, :width].to(device, torch.float32), batch_mask)  # (b, width, Dt)
            out = out * batch_mask[..., None].to(out)  # padding positions as zeros
            states[rows, :width] = out.cpu().to(states.dtype)
            bar.update(len(rows))
    return states


# --------------------------------------------------------------------------------------
# The model a row trains
# --------------------------------------------------------------------------------------
class EncoderTailsModel(nn.Module):
    """A :class:`~fusionzoo.model.FusionModel` fed through trainable encoder tails.

    ``forward`` takes the cached tail inputs (:class:`~fusionzoo.bench.loop.FeatureView`
    batches them as ``image_tail_inputs`` / ``text_tail_inputs``), runs the tails, finishes
    the image tokens as the run's frozen features are finished (pooling to ``image_grid``,
    ``image_positions`` position channels) and hands the states to ``model``.

    Args:
        model: the row's fusion model around the run's frozen encoders (which never run here).
        vision_tail: the row's own copy of :meth:`VisionEncoder.tail` (trainable).
        text_tail: the row's own copy of :meth:`TextEncoder.tail` (trainable).
        image_grid: the suite's token grid (None / 0 = every token).
        image_positions: position-channel frequencies per axis (0 = none).
        image_prefix_tokens: the image encoder's prefix tokens, dropped before pooling to the grid.
        replaced_parameters: parameters of the frozen encoders' blocks that the tails stand in
            for (they are in ``model`` but never run), left out of the row's total.
        lora: the tails carry LoRA adapters (``--train-encoders lora:N``): their base weights stay in
            eval mode in training, as :func:`~fusionzoo.lora.keep_base_in_eval` keeps them.
    """

    #: Parameter-name prefixes of the tails: the optimiser's encoder group, at a tenth of the lr.
    ENCODER_PREFIXES = ("vision_tail.", "text_tail.")

    def __init__(self, model: FusionModel, vision_tail: nn.Module, text_tail: nn.Module,
                 image_grid: int | None = None, image_positions: int = 0, replaced_parameters: int = 0,
                 image_prefix_tokens: int = 0, lora: LoraSpec | None = None) -> None:
        super().__init__()
        self.lora = lora
        self.model = model
        self.vision_tail = vision_tail
        self.text_tail = text_tail
        self.image_grid = image_grid
        self.image_positions = image_positions
        self.image_prefix_tokens = image_prefix_tokens
        self.replaced_parameters = replaced_parameters

    def image_states(self, image_tail_inputs: Tensor) -> Tensor:
        """(B, ...) image tail inputs -> the image tokens (B, G, Di) the fusion is fed."""
        tokens = self.vision_tail(image_tail_inputs)  # (B, N, Di)
        pooled = pool_image_tokens(tokens, self.image_grid, prefix_tokens=self.image_prefix_tokens)
        return add_position_channels(pooled, self.image_positions)

    def text_states(self, text_tail_inputs: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, Dt) text tail inputs and their (B, T) mask -> states (B, T, Dt), padding as zeros (as cached)."""
        states = self.text_tail(text_tail_inputs, attention_mask)  # (B, T, Dt)
        return states * attention_mask[..., None].to(states.dtype)

    def forward(self, *, image_tail_inputs: Tensor, text_tail_inputs: Tensor, input_ids: Tensor,
                attention_mask: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """As :meth:`FusionModel.forward` with ``image_states`` and ``text_states`` computed by the tails.

        Args:
            image_tail_inputs: (B, ...) :meth:`VisionEncoder.tail_inputs` of the images.
            text_tail_inputs: (B, T, Dt) :meth:`TextEncoder.tail_inputs` of the texts.
            input_ids, attention_mask: (B, T) the texts' ids and 1/True = real mask.
            labels: as :meth:`FusionModel.forward`.
        """
        return self.model(image_states=self.image_states(image_tail_inputs), input_ids=input_ids,
                          attention_mask=attention_mask,
                          text_states=self.text_states(text_tail_inputs, attention_mask), labels=labels)

    def train(self, mode: bool = True) -> EncoderTailsModel:
        """``nn.Module.train``, with the image tail's BatchNorm statistics kept (see the module docstring)."""
        super().train(mode)
        if self.lora is not None:  # the adapted tails' own weights compute what they did untrained
            keep_base_in_eval(self.vision_tail)
            keep_base_in_eval(self.text_tail)
        for module in self.vision_tail.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(False)
        return self


def with_encoder_tails(model: FusionModel, vision_tail: nn.Module, text_tail: nn.Module,
                       image_grid: int | None = None, image_positions: int = 0,
                       image_prefix_tokens: int = 0, lora: LoraSpec | None = None) -> EncoderTailsModel:
    """``model`` behind trainable deep copies of the run's (frozen, shared) tails.

    Call it under the row's seed, where the model is built; the shared tails are not touched.
    With ``lora``, the copies get LoRA adapters and only those train (``--train-encoders lora:N``).
    """
    copies = []
    for name, tail in (("image", vision_tail), ("text", text_tail)):
        own = copy.deepcopy(tail)
        own.requires_grad_(lora is None)
        if lora is not None and not adapt_module(own, lora):
            raise BenchError(f"--train-encoders lora: the {name} encoder's last blocks have no Linear or "
                             "1-group Conv2d layer to adapt; train their weights (--train-encoders N)")
        copies.append(own)
    replaced = sum(p.numel() for tail in (vision_tail, text_tail) for p in tail.parameters())
    tails = EncoderTailsModel(model, copies[0], copies[1], image_grid, image_positions, replaced, image_prefix_tokens,
                              lora)
    return tails.train(model.training)
