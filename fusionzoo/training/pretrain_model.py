"""The ALBEF pretraining model: encoders, an ITC-capable fusion, the ITM / MLM heads, their losses and the export.

Follows Li et al., "Align before Fuse: Vision and Language Representation
Learning with Momentum Distillation" (NeurIPS 2021). The model is the zoo's
vision encoder, a bidirectional text encoder, any fusion, the ITC alignment
(the fusion's own when it aligns its streams, as ``albef`` does, whose output
carries ``aux["image_embed"]`` / ``aux["text_embed"]``; otherwise an
:class:`~fusionzoo.alignment.Alignment` on the unimodal states, saved as
``align.*``), an ITM head and an MLM head. For a batch of B local pairs
(G = B x processes pairs in the global batch), one forward pass is:

1. **Encode.** Image tokens (B, N, Di); text states (B, T, Dt) of the caption
   and of its masked copy (BERT's 15% masking, 80/10/10, drawn before the
   forward pass from an explicit generator: :meth:`PretrainModel.mask_text`).
2. **ITC.** The fusion runs once on the clean pairs; its unit-norm embeddings
   are compared with the G embeddings of the global batch (and, with
   ``momentum_distill``, those of a queue): a symmetric cross-entropy over
   similarity / temperature (the fusion's learnable temperature, or one owned
   here when the fusion has none). With ``momentum_distill`` the columns are
   the features of momentum (EMA) copies of the encoders, the fusion and the
   MLM head, a queue of ``queue_size`` past features is appended, and the
   targets are ALBEF's ``alpha * softmax(momentum similarities) + (1 - alpha) *
   one-hot``, ``alpha`` ramped from 0 to ``distill_alpha`` over the first epoch
   (by the recipe, :mod:`fusionzoo.training.pretrain`).
   Captions of the same image (COCO has five) are positives of each other: the
   hard targets spread uniformly over the columns of the row's image id (as
   BLIP does), which is one-hot when no image repeats.
3. **ITM.** For each image a hard-negative text, and for each text a
   hard-negative image, is drawn from the global batch with probability
   ``softmax(similarity)`` over the pairs of other images. The ITM head scores
   the pooled fused state of the B positives (the ITC pass) and of the 2B
   negatives.
4. **MLM.** The fusion runs on the masked text with the image; the MLM head
   predicts the original tokens at the selected positions (distilled towards
   the momentum model's predictions with weight ``alpha`` when
   ``momentum_distill``, as ALBEF does).

``loss = itc_weight * itc + itm_weight * itm + mlm_weight * mlm``; each part is
logged on its own.

Several processes. Each process keeps to its own B pairs: its ITC rows, its
masked texts and its 3B ITM pairs; what crosses processes is gathered
(``ProcessView``):

* the ITC embeddings, with a differentiable all-gather
  (``torch.distributed.nn.functional.all_gather``): each process contrasts its
  rows with the G columns of the global batch, and as DDP averages gradients
  the update is exactly that of one process holding the global batch;
* the momentum features (no gradient), which also fill the queue, so the queue
  is the same on every process;
* for ITM, the image tokens and the text states with their masks (texts
  padded to the longest), with ``accelerator.gather`` and no gradient. A
  negative drawn from another process's batch is taken from this copy, while
  the local rows keep their gradient; so the ITM forward runs on local pairs
  only, a remote negative trains the fusion and the ITM head here, and each
  example's encoders get their gradient on the process that owns it.

Batches are full (``drop_last``), so every process gathers the same shapes.

The same losses on N processes as on one (frozen encoders, no dropout): ITC
contrasts every row with the gathered global batch; ITM's negatives are drawn
per row from the gathered similarities; MLM divides each process's summed token
loss by the global number of masked positions per process, so the average DDP
takes is the global mean. (With trainable encoders a negative drawn from another
process's batch trains the fusion and the ITM head but not that text's or image's
encoder, which it reaches only as a gathered copy.)

Output. :meth:`PretrainModel.save_pretrained` writes ``model.safetensors`` whose
encoder and fusion tensors have FusionModel's names (``vision.*``, ``text.*``,
``fusion.*``), so ``fusionzoo train ... init_from=<output_dir>`` starts any
task from them, plus the heads (``itm.head.*``, ``mlm.head.*``), a
``config.json`` saying what it is, and the tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders import TextEncoder, VisionEncoder, build_text_encoder, build_vision_encoder
from ..alignment import MAX_TEMPERATURE, MIN_TEMPERATURE, Alignment, clamp_straight_through
from ..fusions.base import FusionModule
from ..factory import fusion_kwargs_for_tokens
from ..losses import (
    IGNORE_INDEX,
    Generators,
    ITMLoss,
    MLMLoss,
    contrastive_loss,
    hard_negative_candidates,
    itc_similarities,
    itc_targets,
    mask_tokens,
    sample_hard_negatives,
)
from ..registry import FUSIONS
from ..version import __version__
from .config import TrainConfig
from ..processes import ProcessView

__all__ = ["PRETRAIN_KIND", "PretrainModel", "PretrainOutput", "build_pretrain_model"]

#: ``kind`` in the config.json of a pretraining export.
PRETRAIN_KIND = "fusionzoo-pretraining"
ITC_KEYS = ("image_embed", "text_embed")


@dataclass
class PretrainOutput:
    """What :meth:`PretrainModel.forward` returns.

    Attributes:
        loss: scalar to backpropagate, the weighted sum of ``losses``.
        losses: the unweighted objectives: ``"itc"``, ``"itm"``, ``"mlm"`` (an
            objective whose weight is 0 is skipped, except ITC, which ITM needs).
        metrics: scalars for logging only: ``"temperature"`` and
            ``"itm_accuracy"`` (fraction of the 3B ITM pairs classified right).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _probe_aux(fusion: FusionModule, name: str) -> dict[str, Tensor]:
    """Run ``fusion`` on two dummy pairs and return its aux, or fail saying what pretraining needs."""
    was_training = fusion.training
    fusion.eval()
    try:
        with torch.no_grad():
            text = torch.zeros(2, 3, fusion.text_dim)  # (2, T, Dt)
            image = torch.zeros(2, 4, fusion.image_dim)  # (2, N, Di)
            aux = fusion(text, torch.ones(2, 3, dtype=torch.bool), image).aux
    finally:
        fusion.train(was_training)
    missing = [k for k in ITC_KEYS if k not in aux]
    if missing:
        raise ValueError(
            f"pretraining needs a fusion whose output aux has ITC embeddings {list(ITC_KEYS)} (as 'albef' "
            f"does); fusion {name!r} gives aux keys {sorted(aux)}, missing {missing}. Use fusion=albef."
        )
    if aux["image_embed"].shape != aux["text_embed"].shape or aux["image_embed"].dim() != 2:
        raise ValueError(
            f"fusion {name!r}: expected aux image_embed and text_embed of one shape (B, E), got "
            f"{tuple(aux['image_embed'].shape)} and {tuple(aux['text_embed'].shape)}"
        )
    return aux


class PretrainModel(nn.Module):
    """Encoders, an ITC-capable fusion and the ITM / MLM heads, trained with ALBEF's three objectives.

    Args:
        vision: image encoder (``tokens`` (B, N, Di)).
        text: bidirectional text encoder (with a mask token for MLM).
        fusion: any fusion; without ``align`` its aux must have ``image_embed`` /
            ``text_embed`` (B, E) (as ``albef`` does).
        itm: the ITM head (``ITMLoss(fusion.out_dim)``; its ``head`` is used, the
            negatives are drawn here from the global batch).
        mlm: the MLM head (``MLMLoss(fusion.out_dim, text.vocab_size)``); None when
            ``mlm_weight`` is 0.
        config: JSON-safe description written to ``config.json``.
        align: the :class:`~fusionzoo.alignment.Alignment` that embeds images and
            texts for ITC when the fusion does not (``fusion.aligns`` False).
        itc_weight, itm_weight, mlm_weight: loss weights (>= 0); an ITM or MLM
            weight of 0 skips that objective and freezes its head.
        momentum_distill: keep EMA copies and distil ITC and MLM towards them.
        momentum: EMA decay of the momentum copies (ALBEF: 0.995).
        queue_size: past momentum features kept as extra ITC negatives (0: none).
    """

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        fusion: FusionModule,
        itm: ITMLoss,
        mlm: MLMLoss | None,
        config: dict[str, Any],
        *,
        align: Alignment | None = None,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        momentum_distill: bool = False,
        momentum: float = 0.995,
        queue_size: int = 0,
    ) -> None:
        super().__init__()
        if text.causal:
            raise ValueError("pretraining needs a bidirectional text encoder (MLM reads both sides); got a causal one")
        if mlm_weight > 0 and (mlm is None or text.mask_token_id is None):
            raise ValueError(f"MLM needs an MLM head and a tokenizer with a mask token; text encoder {text.spec} "
                             f"has {'none' if text.mask_token_id is None else 'one'}")
        if min(itc_weight, itm_weight, mlm_weight) < 0 or max(itc_weight, itm_weight, mlm_weight) == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not all 0, got itc={itc_weight}, itm={itm_weight}, mlm={mlm_weight}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if queue_size < 0 or (queue_size and not momentum_distill):
            raise ValueError(f"queue_size={queue_size}: the queue holds momentum features; it needs "
                             "momentum_distill=true and queue_size >= 0")
        self.vision, self.text, self.fusion, self.itm, self.mlm = vision, text, fusion, itm, mlm
        self.align = align
        self.config = json.loads(json.dumps(config))
        self.itc_weight, self.itm_weight, self.mlm_weight = itc_weight, itm_weight, mlm_weight
        self.momentum_decay = momentum
        self.queue_size = queue_size
        for weight, head in ((itm_weight, itm), (mlm_weight, mlm)):
            if weight == 0 and head is not None:
                head.requires_grad_(False)  # unused: no gradient, not in the optimizer

        self.itc_temperature = None
        if align is not None:
            self.embed_dim = align.embed_dim
        else:
            aux = _probe_aux(fusion, config.get("fusion", {}).get("name", type(fusion).__name__))
            self.embed_dim = int(aux["image_embed"].shape[-1])
            # A fusion without its own temperature gets one here (ALBEF's initial 0.07, clamped the same way).
            if "temperature" not in aux:
                self.itc_temperature = nn.Parameter(torch.tensor(0.07))
        special = sorted(set(text.tokenizer.all_special_ids) | {text.pad_token_id})
        self.register_buffer("special_ids", torch.tensor(special, dtype=torch.long), persistent=False)

        # Momentum copies: of the fusion and MLM head always, of an encoder only when it trains
        # (a frozen one is its own momentum copy).
        self.momentum: nn.ModuleDict | None = None
        if momentum_distill:
            copies = {"fusion": fusion}
            if mlm is not None:
                copies["mlm"] = mlm
            if align is not None:
                copies["align"] = align
            if not vision.frozen:
                copies["vision"] = vision
            if not text.frozen:
                copies["text"] = text
            self.momentum = nn.ModuleDict({k: copy.deepcopy(m) for k, m in copies.items()})
            self.momentum.requires_grad_(False)
            self.momentum.train(False)
        if queue_size:
            self.register_buffer("image_queue", torch.zeros(queue_size, self.embed_dim))  # (Q, E)
            self.register_buffer("text_queue", torch.zeros(queue_size, self.embed_dim))  # (Q, E)
            self.register_buffer("id_queue", torch.full((queue_size,), -1, dtype=torch.long))  # (Q,) image ids
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to write
            self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))  # rows filled so far

    # -- modes, momentum, queue ---------------------------------------------------
    def train(self, mode: bool = True) -> "PretrainModel":
        """As ``nn.Module.train``; the momentum copies always stay in eval mode (no dropout in the targets)."""
        super().train(mode)
        if self.momentum is not None:
            self.momentum.train(False)
        return self

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.momentum is None:
            return []
        return [(getattr(self, name), copy_) for name, copy_ in self.momentum.items()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``ema = momentum * ema + (1 - momentum) * online`` for every momentum parameter; buffers copied."""
        for online, ema in self._momentum_pairs():
            ema_params = list(ema.parameters())
            online_params = [p.detach() for p in online.parameters()]
            torch._foreach_lerp_(ema_params, online_params, 1.0 - self.momentum_decay)
            for ema_buffer, buffer in zip(ema.buffers(), online.buffers()):
                ema_buffer.copy_(buffer)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Make the momentum copies equal to the online modules (after loading weights) and empty the queue."""
        for online, ema in self._momentum_pairs():
            ema.load_state_dict(online.state_dict())
        if self.queue_size:
            self.queue_ptr.zero_()
            self.queue_len.zero_()
            self.id_queue.fill_(-1)

    @torch.no_grad()
    def _enqueue(self, image_embed: Tensor, text_embed: Tensor, image_ids: Tensor | None) -> None:
        """Write the (G, E) momentum features of the global batch (and their (G,) image ids) into the queue."""
        rows = image_embed.shape[0]
        keep = min(rows, self.queue_size)
        index = (self.queue_ptr + torch.arange(keep, device=self.queue_ptr.device)) % self.queue_size  # (keep,)
        self.image_queue[index] = image_embed[rows - keep:].float()
        self.text_queue[index] = text_embed[rows - keep:].float()
        self.id_queue[index] = -1 if image_ids is None else image_ids[rows - keep:]  # -1: never a positive
        self.queue_ptr.copy_((self.queue_ptr + keep) % self.queue_size)
        self.queue_len.copy_(torch.clamp(self.queue_len + keep, max=self.queue_size))

    # -- masking (outside forward: it draws random numbers) --------------------------
    def mask_text(self, input_ids: Tensor, attention_mask: Tensor, generator: "Generators",
                  probability: float = 0.15) -> tuple[Tensor, Tensor]:
        """BERT's 80/10/10 masking of the non-special tokens; ``(masked_ids, labels)``, each (B, T).

        ``generator``: one for the batch, or one per row (each row then draws ``max_text_len``
        numbers of each kind, so its mask does not depend on the batch's padding).
        """
        special = torch.isin(input_ids, self.special_ids.to(input_ids.device))  # (B, T)
        width = max(input_ids.shape[1], int(self.config.get("max_text_len", 0)))
        return mask_tokens(input_ids, mask_token_id=self.text.mask_token_id, vocab_size=self.text.vocab_size,
                           special_tokens_mask=special, generator=generator, probability=probability,
                           attention_mask=attention_mask, width=width)

    # -- the three objectives --------------------------------------------------------
    def _embeddings(self, aux: dict[str, Tensor] | None, image: Tensor, text: Tensor,
                    text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ITC image and text embeddings (B, E), float32, and the clamped temperature ().

        From ``align`` when there is one, else from the fusion output's ``aux``.
        """
        if self.align is not None:
            return (self.align.embed_images(image).float(), self.align.embed_texts(text, text_mask).float(),
                    self.align.itc_temperature().float())
        if self.itc_temperature is not None:
            temperature = clamp_straight_through(self.itc_temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        else:
            temperature = aux["temperature"]
        return aux["image_embed"].float(), aux["text_embed"].float(), temperature.float()

    def forward(
        self,
        *,
        pixel_values: Tensor | None = None,
        image_states: Tensor | None = None,
        input_ids: Tensor,
        attention_mask: Tensor,
        text_states: Tensor | None = None,
        masked_ids: Tensor | None = None,
        mlm_labels: Tensor | None = None,
        generator: "Generators" = None,
        image_ids: Tensor | None = None,
        alpha: float = 0.0,
        processes: ProcessView | None = None,
    ) -> PretrainOutput:
        """One pretraining pass over B local image-caption pairs (see the module docstring).

        Args:
            pixel_values: (B, 3, H, W) images, or
            image_states: (B, N, Di) their tokens from the frozen vision encoder (cached).
            input_ids: (B, T) caption ids; attention_mask: (B, T) 1 = real token.
            text_states: (B, T, Dt) the captions' states from the frozen text encoder (cached),
                instead of encoding ``input_ids`` (the masked copy for MLM is still encoded).
            masked_ids: (B, T) the captions after :meth:`mask_text`; mlm_labels:
                (B, T) their targets, -100 where not selected (both unused, and may be
                None, when ``mlm_weight`` is 0).
            generator: randomness of the hard-negative draws: one generator, or one per row
                (a row's negatives then depend only on its own similarities to the global batch).
            image_ids: (B,) long ids of the images. Pairs that share an image
                (two captions of one photo) are then positives of each other in
                ITC, never each other's ITM negatives (as in BLIP); without ids
                only the pair itself is.
            alpha: distillation weight of this step (0 without ``momentum_distill``).
            processes: the other processes' batches (default: this one alone).
        Returns:
            :class:`PretrainOutput`.
        """
        procs = processes or ProcessView()
        b = input_ids.shape[0]
        text_mask = attention_mask.bool()  # (B, T)
        distill = self.momentum is not None and self.training  # evaluation scores the online model alone

        # 1. Encode and fuse the clean pairs (ITC embeddings and the ITM positives).
        if (pixel_values is None) == (image_states is None):
            raise ValueError("pass exactly one of pixel_values (B, 3, H, W) or image_states (B, N, Di)")
        if image_states is not None and not self.vision.frozen:
            raise ValueError("image_states (cached image tokens) bypass the vision encoder; it must be frozen")
        image = self.vision(pixel_values).tokens if image_states is None else image_states  # (B, N, Di)
        if text_states is not None and not self.text.frozen:
            raise ValueError("text_states (cached caption states) bypass the text encoder; it must be frozen")
        text = self.text(input_ids, attention_mask).states if text_states is None else text_states  # (B, T, Dt)
        # The fused clean pairs are the ITM positives (and carry the ITC embeddings of an aligning fusion).
        fused = self.fusion(text, text_mask, image) if (self.align is None or self.itm_weight > 0) else None
        image_embed, text_embed, temperature = self._embeddings(
            None if fused is None else fused.aux, image, text, text_mask)  # (B, E), (B, E), ()

        momentum_image = None
        if distill:
            with torch.no_grad():
                m = self.momentum
                momentum_image = m["vision"](pixel_values).tokens if "vision" in m else image.detach()  # (B, N, Di)
                m_text = m["text"](input_ids, attention_mask).states if "text" in m else text.detach()  # (B, T, Dt)
                if "align" in m:
                    m_image_embed = m["align"].embed_images(momentum_image).float()  # (B, E)
                    m_text_embed = m["align"].embed_texts(m_text, text_mask).float()  # (B, E)
                else:
                    m_aux = m["fusion"](m_text, text_mask, momentum_image).aux
                    m_image_embed, m_text_embed = m_aux["image_embed"].float(), m_aux["text_embed"].float()

        # 2. ITC: local rows against the global batch (momentum features and the queue when distilling).
        offset = procs.index * b
        positives = torch.arange(offset, offset + b, device=input_ids.device)  # (B,) columns of the positives
        if distill:
            image_columns = procs.gather(m_image_embed)  # (G, E)
            text_columns = procs.gather(m_text_embed)  # (G, E)
            if self.queue_size:
                filled = int(self.queue_len)
                image_columns = torch.cat([image_columns, self.image_queue[:filled]])  # (G + Q', E)
                text_columns = torch.cat([text_columns, self.text_queue[:filled]])  # (G + Q', E)
        else:
            image_columns = procs.gather_with_grad(image_embed)  # (G, E), every row with its gradient
            text_columns = procs.gather_with_grad(text_embed)  # (G, E)
        g = procs.count * b
        sim_i2t, sim_t2i = itc_similarities(image_embed, text_embed, temperature, image_columns=image_columns,
                                            text_columns=text_columns)  # (B, C) each
        momentum_i2t = momentum_t2i = None
        if distill:
            with torch.no_grad():
                momentum_i2t, momentum_t2i = itc_similarities(
                    m_image_embed, m_text_embed, temperature.detach(), image_columns=image_columns,
                    text_columns=text_columns)  # (B, C) each
        columns = sim_i2t.shape[1]
        if image_ids is None:
            same_image = F.one_hot(positives, columns).bool()  # (B, C) only the pair itself
            column_ids = None
        else:
            column_ids = procs.gather(image_ids)  # (G,)
            queued = self.id_queue[: columns - g] if columns > g else column_ids[:0]  # (Q',)
            same_image = image_ids[:, None] == torch.cat([column_ids, queued])[None, :]  # (B, C)
        losses = {"itc": contrastive_loss(sim_i2t, sim_t2i, itc_targets(same_image, momentum_i2t, alpha),
                                          itc_targets(same_image, momentum_t2i, alpha))}
        metrics = {"temperature": temperature.detach()}
        if not procs.all_finite(losses["itc"]):
            # No negatives can be drawn from non-finite similarities: return the loss as it is,
            # on every process alike, and let the caller stop.
            return PretrainOutput(loss=self.itc_weight * losses["itc"], losses=losses, metrics=metrics)

        # 3. ITM: B positives (the pass above) and 2B hard negatives drawn from the global batch.
        if self.itm_weight > 0:
            candidates_i2t = hard_negative_candidates(sim_i2t[:, :g], same_image[:, :g], positives)  # (B, G)
            candidates_t2i = hard_negative_candidates(sim_t2i[:, :g], same_image[:, :g], positives)  # (B, G)
            neg_text = sample_hard_negatives(candidates_i2t, generator, positives)  # (B,) a wrong text per image
            neg_image = sample_hard_negatives(candidates_t2i, generator, positives)  # (B,) a wrong image per text
            all_text = procs.gather(text, pad_dim=1)  # (G, T', Dt)
            all_mask = procs.gather(text_mask, pad_dim=1)  # (G, T')
            all_image = procs.gather(image)  # (G, N, Di)
            own_text, own_mask = all_text[offset:offset + b], all_mask[offset:offset + b]  # (B, T', Dt), (B, T')
            # Pairs (text_neg(i), image_i) then (text_i, image_neg(i)).
            negatives = self.fusion(
                torch.cat([all_text[neg_text], own_text]),  # (2B, T', Dt)
                torch.cat([all_mask[neg_text], own_mask]),  # (2B, T')
                torch.cat([image, all_image[neg_image]]),  # (2B, N, Di)
            )
            itm = self.itm(fused.pooled, negatives.pooled)  # B positives, 2B negatives
            losses["itm"] = itm.loss
            metrics["itm_accuracy"] = itm.accuracy

        # 4. MLM: the masked caption through the text encoder and the fusion, predicted where selected.
        if self.mlm_weight > 0:
            selected = mlm_labels != IGNORE_INDEX  # (B, T)
            masked = self.text(masked_ids, attention_mask).states  # (B, T, Dt)
            fused_masked = self.fusion(masked, text_mask, image)
            soft = None
            if distill and alpha > 0 and bool(selected.any()):
                with torch.no_grad():
                    m = self.momentum
                    m_masked = m["text"](masked_ids, attention_mask).states if "text" in m else masked.detach()
                    m_tokens = m["fusion"](m_masked, text_mask, momentum_image).text_tokens[selected]  # (M, D)
                    soft = m["mlm"].head(m_tokens).float().softmax(dim=-1)  # (M, V)
            # Divided by the global batch's labelled positions per process, so that DDP's average over
            # processes is the mean over every labelled position, as on one process.
            count = selected.sum()
            if procs.count > 1:
                count = procs.gather(count.reshape(1)).sum() / procs.count
            # Selected positions only: the vocabulary product runs for M rows, not B x T.
            losses["mlm"] = self.mlm(fused_masked.text_tokens[selected], mlm_labels[selected], soft, alpha,
                                     count=count).loss

        if distill and self.queue_size:
            self._enqueue(image_columns[:g], text_columns[:g], column_ids)
        weights = {"itc": self.itc_weight, "itm": self.itm_weight, "mlm": self.mlm_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        return PretrainOutput(loss=loss, losses=losses, metrics=metrics)

    # -- export -----------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, Tensor]:
        """Online weights under FusionModel's names (vision.*, text.*, fusion.*) plus itm.* and mlm.*.

        Momentum copies and the queue are training state (in the checkpoints), not part of the export.
        """
        from ..lora import lora_layers, merge_lora

        skip = ("momentum.", "image_queue", "text_queue", "id_queue", "queue_ptr", "queue_len")
        # LoRA adapters (peft=lora) are folded into a copy's weights: the export is a plain model's names
        state = (merge_lora(copy.deepcopy(self)) if lora_layers(self) else self).state_dict()
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items() if not k.startswith(skip)}

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (last), ``text_encoder/`` and ``tokenizer/``, atomically."""
        from ..model_folder import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, publish_folder

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, "fusionzoo_version": __version__, **self.config, **(extra or {})}
        if "lora" in config:  # exported with the adapters folded in (export_state_dict)
            config["lora_merged"] = config.pop("lora")
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
        try:
            safetensors.torch.save_file(self.export_state_dict(), str(staging / WEIGHTS_NAME),
                                        metadata={"kind": PRETRAIN_KIND})
            self.text.save_config(staging)
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            publish_folder(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory


def build_pretrain_model(config: TrainConfig, pretrained: bool = True) -> PretrainModel:
    """Build the encoders, the fusion named by ``config.fusion`` and the ITM / MLM heads.

    Args:
        config: a run config (``vision``, ``text``, ``fusion``, ``fusion_kwargs``,
            ``freeze_encoders``, ``max_text_len``, the loss weights, ``momentum_distill``,
            ``momentum``, ``queue_size``).
        pretrained: load the encoders' pretrained weights.
    Raises:
        ValueError: the fusion has no ITC embeddings, the tokenizer no mask token, ...
    """
    vision = build_vision_encoder(config.vision, pretrained=pretrained)
    text = build_text_encoder(config.text, pretrained=pretrained, causal=False)
    if config.max_text_len > text.max_length:
        raise ValueError(f"max_text_len={config.max_text_len} exceeds the {text.max_length} positions of "
                         f"text encoder {text.spec}")
    fusion_cls = FUSIONS.get(config.fusion)
    fusion = fusion_cls(text.out_dim, vision.out_dim, **fusion_kwargs_for_tokens(fusion_cls, vision,
                                                                                 dict(config.fusion_kwargs)))
    align = None if fusion.aligns else Alignment(text.out_dim, vision.out_dim, **dict(config.align_kwargs))
    if config.freeze_encoders:
        vision.freeze()
        text.freeze()
    itm = ITMLoss(fusion.out_dim)
    mlm = MLMLoss(fusion.out_dim, text.vocab_size) if config.mlm_weight > 0 else None
    model_config = {
        "kind": PRETRAIN_KIND,
        "fusion": {"name": config.fusion, "config": fusion.config},
        "align": None if align is None else align.config,
        "vision": {"spec": vision.spec, "data_config": vision.data_config},
        "text": {"spec": text.spec},
        "max_text_len": config.max_text_len,
        "freeze_encoders": config.freeze_encoders,
        "objectives": {
            "itc_weight": config.itc_weight, "itm_weight": config.itm_weight, "mlm_weight": config.mlm_weight,
            "momentum_distill": config.momentum_distill, "momentum": config.momentum,
            "queue_size": config.queue_size, "distill_alpha": config.distill_alpha,
        },
        "weights": {
            "vision.*, text.*, fusion.*": "FusionModel's names: `fusionzoo train ... init_from=<this folder>` "
                                          "loads them into a model of any task",
            "align.*": "ITC projections and temperature (fusions that do not align their own streams)",
            "itm.head.*": "image-text matching head (Linear(dim, 2))",
            "mlm.head.*": "masked-language-modelling head",
        },
    }
    return PretrainModel(
        vision, text, fusion, itm, mlm, model_config, align=align,
        itc_weight=config.itc_weight, itm_weight=config.itm_weight, mlm_weight=config.mlm_weight,
        momentum_distill=config.momentum_distill, momentum=config.momentum, queue_size=config.queue_size,
    )
