"""The bench's driver of the training step over cached encoder features: one process, many small rows.

Why not :func:`fusionzoo.training.loop.run`: that loop decodes images, runs the encoders
and carries Accelerate's distributed machinery, checkpoints and resumption -- what
fine-tuning needs. With frozen encoders and features already in memory a benchmark step
is only "gather rows, run fusion + head, step", and the per-step bookkeeping of a data
loader shows in a small row's wall time. So this driver batches by indexing tensors into
the memory-mapped feature arrays, and takes everything else from
:mod:`fusionzoo.training.step`, the step ``fusionzoo train`` takes: the precision rule and
autocast, the seeds, the step counts and warmup-cosine rates, the non-finite check, and the
step itself (backward, clipping, AdamW with the project's decay groups,
:func:`~fusionzoo.training.optim.build_optimizer`). The models it trains are ordinary :class:`~fusionzoo.model.FusionModel` s
fed through ``forward(image_states=..., text_states=...)``, or, with ``--train-encoders``,
:class:`~fusionzoo.bench.tails.EncoderTailsModel` s fed the encoders' cached tail inputs
(``forward(image_tail_inputs=..., text_tail_inputs=...)``), which run trainable copies of
the encoders' last blocks first.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hardware import RssSampler
from ..model import FusionModel
from ..tasks.passes import Stopwatch, caption_pass, logits_pass
from ..training.modality_dropout import EmptyText, drop_modalities, modality_drops
from ..training.optim import ENCODER_PREFIXES, build_optimizer
from ..training.step import (  # noqa: F401  (PRECISIONS, autocast: the bench's names for them)
    PRECISIONS,
    CompiledModules,
    LearningRates,
    LocalAccelerator,
    autocast,
    check_finite,
    optimizer_step,
    plan_steps,
    seed_everything,
)
from ..training.step import resolve_precision as _resolve_precision


# --------------------------------------------------------------------------------------
# Batches from cached features
# --------------------------------------------------------------------------------------
@dataclass
class FeatureView:
    """The samples of one split as rows of the cached feature arrays.

    Attributes:
        image_tokens: (U_img, N, Di) float16, one row per distinct image (memory-mapped); with
            ``--train-encoders``, the image encoder's tail inputs (U_img, ...) instead.
        image_rows: (S,) long, the image row of each sample.
        text_states: (U_txt, T, Dt) float16 text states, or None (captioning evaluation); with
            ``--train-encoders``, the text encoder's tail inputs (U_txt, T, Dt) instead.
        text_ids: (U_txt, T) token ids of the same texts.
        text_mask: (U_txt, T) bool, True = real token.
        text_rows: (S,) long, the text row of each sample.
        labels: (S, A) soft scores (VQA), (S,) label ids (classification) or None.
        image_input, text_input: the model inputs the two arrays are batched as: ``image_states``
            and ``text_states`` (a :class:`~fusionzoo.model.FusionModel`), or ``image_tail_inputs``
            and ``text_tail_inputs`` (an :class:`~fusionzoo.bench.tails.EncoderTailsModel`), so
            tail inputs never reach a model that would take them for final states.
    """

    image_tokens: Tensor
    image_rows: Tensor
    text_states: Tensor | None = None
    text_ids: Tensor | None = None
    text_mask: Tensor | None = None
    text_rows: Tensor | None = None
    labels: Tensor | None = None
    image_input: str = "image_states"
    text_input: str = "text_states"

    def __len__(self) -> int:
        return len(self.image_rows)

    def batch(self, index: Tensor, device: torch.device) -> dict[str, Tensor]:
        """Model inputs of samples ``index`` (B,): image states (or tail inputs), trimmed text, labels."""
        out = {self.image_input: self.image_tokens[self.image_rows[index]].to(device, torch.float32)}  # (B, N, Di)
        if self.text_rows is not None:
            rows = self.text_rows[index]  # (B,)
            mask = self.text_mask[rows]  # (B, T)
            width = int(mask.sum(dim=1).max())  # drop padding every text of the batch has
            out["attention_mask"] = mask[:, :width].to(device)  # (B, t)
            out["input_ids"] = self.text_ids[rows, :width].to(device, torch.long)  # (B, t)
            out[self.text_input] = self.text_states[rows, :width].to(device, torch.float32)  # (B, t, Dt)
        if self.labels is not None:
            out["labels"] = self.labels[index].to(device)
        return out


def as_tensor(array: np.ndarray) -> Tensor:
    """A tensor sharing memory with a (memory-mapped, copy-on-write) numpy array."""
    return torch.from_numpy(array) if array.flags.writeable else torch.from_numpy(np.array(array))


# --------------------------------------------------------------------------------------
# Precision and memory
# --------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """``--mixed-precision`` made concrete on ``device``: the rule of ``fusionzoo train``'s ``mixed_precision``."""
    return _resolve_precision(precision, device.type, key="--mixed-precision")


#: Held while a row seeds torch's global RNG and builds its model (rows on several GPUs run in threads).
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch's RNG with ``seed`` and hold it for the block: the model's initial weights.

    Rows trained at once in threads (one per GPU) build their models in turn, so each gets
    the weights its seed gives alone. The shuffling and the retrieval draws come from
    explicit generators; the heads' dropout draws from the device's generator, so on a CUDA
    ``device`` only that GPU's generator is seeded (with the CPU's), leaving the streams of
    rows training on the other GPUs alone. On CPU the dropout of rows trained at once in
    threads would share one generator; the CPU runs rows in processes instead.
    """
    with _BUILD_LOCK:
        seed_everything(seed, device)
        yield


class PeakMemory:
    """Peak *extra* memory while the block runs, in MB.

    CUDA: ``max_memory_allocated`` over what was allocated at the start. CPU: the
    process's resident memory (:class:`fusionzoo.hardware.RssSampler`) over what it was
    at the start -- the block's own working memory (weights, optimiser state,
    activations), not the cached features already in memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self._base = 0
        self._sampler: RssSampler | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._sampler = RssSampler().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            extra = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            assert self._sampler is not None
            self._sampler.__exit__(*exc)
            extra = self._sampler.increase()
        self.peak_mb = max(0.0, extra / 2**20)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@dataclass
class TrainStats:
    """What one training run reports: wall seconds, optimiser steps, the mean loss of the last 10% of steps,
    the loss of every step, and with ``compile`` the seconds torch spent compiling (not in ``seconds``)."""

    seconds: float
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator,
             drop_last: bool = False) -> Iterator[Tensor]:
    """``steps`` index batches: epochs of shuffled indices, the last partial batch of each kept (or dropped)."""
    done = 0
    end = count - count % batch_size if drop_last and count >= batch_size else count
    while done < steps:
        order = torch.randperm(count, generator=generator)
        for begin in range(0, end, batch_size):
            if done == steps:
                return
            yield order[begin: begin + batch_size]
            done += 1


def train_model(
    model: FusionModel,
    view: FeatureView,
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    precision: str,
    device: torch.device,
    seed: int,
    desc: str = "train",
    progress: bool = True,
    extra_inputs: Callable[[int, Tensor], dict[str, Any]] | None = None,
    drop_last: bool = False,
    encoder_prefixes: tuple[str, ...] = ENCODER_PREFIXES,
    max_grad_norm: float = 1.0,
    compile: bool = False,
    modality_dropout: float = 0.0,
    empty_text: EmptyText | None = None,
) -> TrainStats:
    """Train the trainable parameters of ``model`` on ``view``: its fusion and head (the frozen encoders
    never run), and with ``--train-encoders`` the encoder tails of an
    :class:`~fusionzoo.bench.tails.EncoderTailsModel`.

    Args:
        epochs: passes over the split (fractions allowed; at least one step).
        batch_size: samples per step.
        lr, weight_decay: AdamW settings (no decay on biases, norms, embeddings' tables).
        warmup_ratio: fraction of the steps spent warming the learning rate up, then cosine to 0.
        precision: a resolved precision (``no``, ``bf16``, ``fp16``).
        device: where the model and batches live.
        seed: seeds the shuffling (the model was built under its own seed).
        desc: progress bar label.
        extra_inputs: ``(step, index) -> more keyword inputs`` of the model for the batch of samples
            ``index`` at optimiser step ``step`` (retrieval: image ids and per-row generators).
        drop_last: drop each epoch's last partial batch (retrieval's ITC and hard negatives want
            full batches), unless the split is smaller than one batch.
        encoder_prefixes: name prefixes of the encoder parameters, trained at a tenth of ``lr``
            (:func:`~fusionzoo.training.optim.parameter_groups`); by default a FusionModel's
            ``vision.`` and ``text.``, frozen here.
        max_grad_norm: gradients are clipped to this norm (0: not clipped), as ``fusionzoo train``'s
            ``max_grad_norm``.
        compile: compile the modules that train (``fusionzoo train``'s ``compile=true``,
            :class:`~fusionzoo.training.step.CompiledModules`): eager again if compiling fails, and
            eager when this returns; the seconds spent compiling are ``compile_seconds``, not ``seconds``.
        modality_dropout: per sample, the chance that its image or its question is removed
            (``fusionzoo train``'s ``modality_dropout``: :func:`~fusionzoo.training.modality_dropout.modality_drops`,
            seeded by ``seed``, the step and the sample's place in the batch); ``empty_text`` is the removed question.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (a :class:`~fusionzoo.errors.FusionZooError`).
    """
    full = drop_last and len(view) >= batch_size
    plan = plan_steps(len(view) // batch_size if full else math.ceil(len(view) / batch_size), epochs=epochs,
                      warmup_ratio=warmup_ratio)
    steps = plan.total
    accelerator = LocalAccelerator(precision, device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, encoder_prefixes=encoder_prefixes)
    rates = LearningRates(optimizer, plan)
    optimizer = accelerator.prepare_optimizer(optimizer)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    compiled = CompiledModules(model, compile)

    def take(inputs: dict[str, Any]) -> Any:
        with accelerator.autocast():
            out = model(**inputs)
        check_finite(out.loss, out.losses, where=f"at step {len(losses)} of {desc}",
                     advice="Lower the learning rate or use --mixed-precision no.")
        optimizer_step(accelerator, model, optimizer, out.loss, max_grad_norm)
        return out

    start = time.perf_counter()
    try:
        with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
            for index in _batches(len(view), batch_size, steps, generator, drop_last):
                rates.set(len(losses))
                inputs = view.batch(index, device)
                if modality_dropout > 0:
                    drops = modality_drops(seed, len(losses), 0, 0, len(index), modality_dropout)
                    inputs = drop_modalities(inputs, drops, empty_text)
                if extra_inputs is not None:
                    inputs.update(extra_inputs(len(losses), index))
                out = compiled.step(functools.partial(take, inputs))
                losses.append(float(out.loss.detach()))
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    finally:
        compiled.release()
    seconds = time.perf_counter() - start - compiled.compile_seconds
    tail = losses[-max(1, len(losses) // 10):]
    return TrainStats(seconds=seconds, steps=len(losses), final_loss=float(np.mean(tail)), losses=losses,
                      compile_seconds=compiled.compile_seconds)


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------
def _batches_of(view: FeatureView, batch_size: int, device: torch.device) -> Iterator[dict[str, Tensor]]:
    """``view`` in order, ``batch_size`` samples a batch, on ``device``."""
    for begin in range(0, len(view), batch_size):
        yield view.batch(torch.arange(begin, min(begin + batch_size, len(view))), device)


def _without_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in batch.items() if key != "labels"}


@torch.inference_mode()
def predict_logits(model: FusionModel, view: FeatureView, *, batch_size: int, precision: str,
                   device: torch.device) -> tuple[Tensor, float]:
    """Logits (S, C) of every sample of ``view`` (float32, CPU) and the seconds the forward passes took
    (the tasks' evaluation pass, :func:`fusionzoo.tasks.passes.logits_pass`, over the cached features)."""
    model.eval()
    watch = Stopwatch(device)
    batches = _batches_of(view, batch_size, device)
    outputs = [logits.cpu() for _, logits in logits_pass(model, batches, LocalAccelerator(precision, device).autocast,
                                                          inputs=_without_labels, stopwatch=watch)]
    return torch.cat(outputs), watch.seconds


@torch.inference_mode()
def generate_captions(model: FusionModel, view: FeatureView, *, batch_size: int, precision: str,
                      device: torch.device, max_new_tokens: int = 20, num_beams: int = 1,
                      **decoding: Any) -> tuple[list[str], float]:
    """A caption per sample (image) of ``view`` and the seconds generation took (text encoder run live;
    the captioning task's pass, :func:`fusionzoo.tasks.passes.caption_pass`); ``decoding``: the other
    :class:`~fusionzoo.decoding.DecodingOptions`."""
    model.eval()
    watch = Stopwatch(device)
    batches = ({"image_states": batch["image_states"]} for batch in _batches_of(view, batch_size, device))
    captions: list[str] = []
    for _, ids in caption_pass(model, batches, LocalAccelerator(precision, device).autocast,
                               max_new_tokens=max_new_tokens, num_beams=num_beams, stopwatch=watch, **decoding):
        texts = model.text.tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=True)
        captions.extend(text.strip() for text in texts)
    return captions, watch.seconds
