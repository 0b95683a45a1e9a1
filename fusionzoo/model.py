"""FusionModel: image encoder + text encoder + fusion + task head, its factory and checkpoints.

The composition follows TorchMultimodal (built modules passed in) with the thin
task heads and ``save_pretrained`` / ``from_pretrained`` round trip of
transformers (ViLT, BLIP)::

    pixel_values --vision--> image tokens (B, N, Di) --+
                                                       +--fusion--> FusionOutput --head--> logits
    input_ids ----text-----> text states (B, T, Dt) ---+

* :func:`create_model` takes hyperparameters (names and keyword dicts) and builds
  the modules; :class:`FusionModel` takes the built modules and a plain ``config``
  dict that :meth:`FusionModel.save_pretrained` writes to ``config.json``.
* :meth:`FusionModel.forward` is the training/evaluation pass and returns a
  :class:`ModelOutput`; inference lives in :meth:`~FusionModel.predict` (VQA and
  classification: strings from the model's vocabulary) and
  :meth:`~FusionModel.generate` (captioning: greedy or beam search, with or without
  key/value caches, both giving the same captions).

A checkpoint folder holds ``config.json`` (written last: its presence marks a
complete save), ``model.safetensors`` (every weight, never a pickle),
``text_encoder/config.json`` and ``tokenizer/``; :func:`load_model` rebuilds the
architecture from those without downloading anything and loads the weights strictly.
It reads a folder as untrusted data: timm gets only allow-listed architecture keywords
from ``config.json``, every file must lie inside the folder (symlinks included), the
tokenizer must fit the text encoder, and a hub name needs ``allow_download=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import safetensors.torch
import torch
from PIL import Image
from torch import Tensor, nn

from .alignment import Alignment
from .encoders import TextEncoder, VisionEncoder, build_text_encoder, build_vision_encoder
from .encoders.text import CONFIG_DIR, TOKENIZER_DIR
from .encoders.saved_vision import rebuild_saved_vision_encoder
from .errors import MissingModelFileError, ModelFolderError
from .fusions.base import FusionModule, FusionOutput
from .layers import KVCache
from .losses import IGNORE_INDEX, itc_loss
from .registry import FUSIONS, HEADS, TASKS, RegistryError

#: Version of the checkpoint layout written by :meth:`FusionModel.save_pretrained`.
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelOutput:
    """What :meth:`FusionModel.forward` returns.

    Attributes:
        loss: scalar to backpropagate (task loss plus the fusion's auxiliary
            losses), or ``None`` when no labels were given (VQA, classification).
        logits: (B, C) label logits (classification), (B, A) answer logits (VQA)
            or (B, T, V) next-token logits (captioning; position t scores token t+1).
        losses: the parts of ``loss`` for logging: the task loss under the head's
            name (``"ce"``, ``"vqa"``, ``"lm"``) and the fusion's auxiliary losses
            (e.g. ALBEF's ``"itc"``). Empty when ``loss`` is None.
    """

    loss: Tensor | None
    logits: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


class FusionModel(nn.Module):
    """An image encoder, a text encoder, a fusion module and a task head.

    Args:
        vision: image encoder; ``vision(pixel_values).tokens`` is (B, N, Di).
        text: text encoder (causal for captioning); ``text(ids, mask).states`` is (B, T, Dt).
        fusion: a :class:`~fusionzoo.fusions.base.FusionModule` built for (Dt, Di).
        head: a task head from :data:`~fusionzoo.registry.HEADS`, built for ``fusion``.
        config: plain dict describing the model, as :func:`create_model` builds it
            (``task``, ``fusion``, ``vision``, ``text``, ``head``, the ``answers`` or
            ``labels`` vocabulary, ``max_text_len``, ``freeze_encoders``, ``align``); it is
            what ``config.json`` stores.
        align: the :class:`~fusionzoo.alignment.Alignment` that embeds images and texts
            apart (retrieval), for a fusion that does not align its own streams.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        fusion: FusionModule,
        head: nn.Module,
        config: dict[str, Any],
        align: Alignment | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, dict) or config.get("task") not in TASKS:
            raise ValueError(
                f"config must be a dict whose 'task' is a registered task ({', '.join(TASKS.list())}); "
                "create_model builds one"
            )
        if getattr(head, "causal", False) and not text.causal:
            raise ValueError(
                f"the {type(head).__name__} decodes text left to right and needs a causal text encoder "
                "(build_text_encoder(..., causal=True)); this one is bidirectional"
            )
        if getattr(head, "in_dim", fusion.out_dim) != fusion.out_dim:
            raise ValueError(f"the head reads {head.in_dim}-wide features but the fusion gives {fusion.out_dim}")
        if align is not None and fusion.aligns:
            raise ValueError(f"fusion {type(fusion).__name__} aligns its own streams; pass no Alignment")
        self.vision = vision
        self.text = text
        self.fusion = fusion
        self.head = head
        self.align = align
        try:
            self.config: dict[str, Any] = json.loads(json.dumps(config))  # a plain, JSON-safe copy
        except TypeError as exc:
            raise TypeError(f"the model config must be JSON-serialisable (it is saved as config.json): {exc}") from exc
        vocabulary = self.vocabulary
        num_classes = getattr(head, "num_classes", None)
        if vocabulary is not None and num_classes is not None and len(vocabulary) != num_classes:
            raise ValueError(f"the vocabulary has {len(vocabulary)} entries but the head predicts {num_classes}")

    def set_output_ids(self, output_ids: Sequence[int]) -> None:
        """Give a text-generating head a new output vocabulary: it scores only ``output_ids`` from now on.

        The head is built again for the same fusion and text encoder with ``output_ids`` (its
        own layers freshly initialised; the word embeddings it scores with are the text
        encoder's), and the model's config records the ids, so a saved model loads with them.
        """
        if not getattr(self.head, "causal", False):
            raise ValueError(f"output_ids are for a head that writes text; {type(self.head).__name__} does not")
        kwargs = {**self.config["head"]["kwargs"], "output_ids": sorted({int(i) for i in output_ids})}
        self.head = type(self.head).from_parts(self.fusion, self.text, None, **kwargs).to(self.device)
        self.config["head"]["kwargs"] = kwargs

    # -- properties -----------------------------------------------------------
    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def vocabulary(self) -> list[str] | None:
        """The answers (VQA) or labels (classification) the head's outputs stand for; None for captioning."""
        key = TASKS.get(self.config["task"]).vocabulary_key
        return self.config.get(key) if key else None

    @property
    def max_text_len(self) -> int:
        return int(self.config.get("max_text_len", 32))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def init_aliases(self) -> dict[str, str]:
        """Saved-weight name prefixes -> this model's, for ``init_from`` (pretraining's ``itm.head.`` -> ``head.linear.``)."""
        return {source: f"head.{target}" for source, target in getattr(self.head, "init_aliases", {}).items()}

    def _vote(self) -> Callable[..., Tensor] | None:
        """The fusion's vote for a decision-level fusion, else None."""
        return self.fusion.vote if self.fusion.decision_level else None

    # -- training / evaluation pass -------------------------------------------
    def encode_image(self, pixel_values: Tensor | None = None, image_states: Tensor | None = None) -> Tensor:
        """Image token states (B, N, Di): encoded from pixels, or ``image_states`` as given (precomputed)."""
        if (pixel_values is None) == (image_states is None):
            raise ValueError("pass exactly one of pixel_values (B, 3, H, W) or image_states (B, N, Di)")
        if image_states is not None:
            return image_states
        return self.vision(pixel_values).tokens  # (B, N, Di)

    def forward(
        self,
        *,
        pixel_values: Tensor | None = None,
        image_states: Tensor | None = None,
        image_mask: Tensor | None = None,
        input_ids: Tensor,
        attention_mask: Tensor,
        text_states: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> ModelOutput:
        """Encode, fuse and predict; compute the loss when there are targets.

        Args:
            pixel_values: (B, 3, H, W) preprocessed images (``vision.preprocess``).
            image_states: (B, N, Di) precomputed image tokens instead of pixels
                (e.g. cached features of a frozen encoder).
            image_mask: (B, N) bool, True = real image token; None = all real.
            input_ids: (B, T) question / text ids; for captioning, the caption
                ([CLS] caption [SEP] padding).
            attention_mask: (B, T) 1/True = real token.
            text_states: (B, T, Dt) precomputed text states instead of running the
                text encoder (``input_ids`` are then only used as caption targets).
            labels: classification: label ids (B,) long; VQA: soft scores (B, A)
                float; retrieval: ITM labels (B,) long, 1 = the pair matches (the
                alignment's in-batch ITC over the matching rows is added as ``"itc"``); captioning: target ids (B, T) long with -100 where ignored,
                defaulting to ``input_ids`` with padding ignored, so a captioning
                forward always has a loss.
        Returns:
            :class:`ModelOutput`.
        """
        image = self.encode_image(pixel_values, image_states)  # (B, N, Di)
        text_mask = attention_mask.bool()  # (B, T)
        if text_states is None:
            text_states = self.text(input_ids, attention_mask).states  # (B, T, Dt)
        # A feature-level classification / VQA head reads only `pooled`; fusions that can, skip the rest.
        pooled_only = self.fusion.supports_pooled_only and getattr(self.head, "reads_pooled_only", False)
        extra = {"pooled_only": True} if pooled_only else {}
        fused = self.fusion(text_states, text_mask, image, image_mask, causal=self.head.causal, **extra)
        logits = self.head(fused, vote=self._vote())

        if labels is None and self.head.causal:
            labels = input_ids.masked_fill(~text_mask, IGNORE_INDEX)  # teacher forcing on the caption itself
        if labels is None:
            return ModelOutput(loss=None, logits=logits)
        losses = {self.head.loss_name: self.head.loss(logits, labels)}
        for name, value in self.fusion.aux_loss(fused).items():
            if name in losses:
                raise ValueError(f"the fusion's auxiliary loss {name!r} clashes with the task loss name")
            losses[name] = value
        if self.align is not None:
            losses["itc"] = self._in_batch_itc(image, image_mask, text_states, text_mask, labels)
        return ModelOutput(loss=sum(losses.values()), logits=logits, losses=losses)

    def _in_batch_itc(self, image: Tensor, image_mask: Tensor | None, text: Tensor, text_mask: Tensor,
                      labels: Tensor) -> Tensor:
        """In-batch ITC of the alignment over the matching rows (ITM label 1); 0 with fewer than two.

        A plain forward then trains the alignment too; ``fusionzoo train task=retrieval``
        trains ITC over the global batch with hard-negative ITM instead.
        """
        matched = labels == 1 if labels.dim() == 1 else torch.ones(len(image), dtype=torch.bool, device=image.device)
        if int(matched.sum()) < 2:
            return image.new_zeros(()) + 0.0 * self.align.temperature
        image_embed = self.align.embed_images(image[matched], None if image_mask is None else image_mask[matched])
        text_embed = self.align.embed_texts(text[matched], text_mask[matched])
        return itc_loss(image_embed, text_embed, self.align.itc_temperature())

    # -- alignment and matching (retrieval) -----------------------------------
    @property
    def aligner(self) -> nn.Module:
        """What embeds images and texts apart: the fusion when it aligns itself, else :attr:`align`."""
        if self.fusion.aligns:
            return self.fusion
        if self.align is None:
            raise TypeError(f"this {self.task} model has no alignment (no ITC projections): embeddings come from "
                            "a retrieval model (create_model('retrieval', ...), fusionzoo train task=retrieval)")
        return self.align

    @property
    def embed_dim(self) -> int:
        """Width E of the ITC embeddings."""
        return int(self.aligner.embed_dim)

    # The *_states methods are the building blocks of training and evaluation: they keep the
    # module's mode and gradients as the caller set them. embed_images / embed_texts / match
    # are for inference: eval mode, no gradients, PIL images or strings in.
    def embed_image_states(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """(B, N, Di) image tokens -> (B, E) unit-norm ITC embeddings."""
        return self.aligner.embed_images(image, image_mask)

    def embed_text_states(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """(B, T, Dt) text states and their (B, T) mask -> (B, E) unit-norm ITC embeddings."""
        return self.aligner.embed_texts(text, text_mask.bool())

    def match_states(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None
                     ) -> Tensor:
        """ITM log-odds (B,) of B (text, image) pairs: ``log p(match) - log p(no match)``."""
        log_odds = getattr(self.head, "log_odds", None)
        if log_odds is None:
            raise TypeError(f"this {self.task} model has no image-text matching head; train task=retrieval")
        extra = {"pooled_only": True} if self.fusion.supports_pooled_only else {}
        fused = self.fusion(text, text_mask.bool(), image, image_mask, **extra)
        return log_odds(self.head(fused).float())

    def _pixels(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        if isinstance(images, Tensor):
            return images.to(self.device, self.dtype)  # (B, 3, H, W) already preprocessed
        return self.vision.preprocess(list(images)).to(self.device, self.dtype)

    def _text_batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = self.text.tokenize(list(texts), max_length=self.max_text_len)
        mask = batch["attention_mask"].to(self.device)
        return self.text(batch["input_ids"].to(self.device), mask).states, mask.bool()  # (B, T, Dt), (B, T)

    def embed_images(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """(B, E) unit-norm embeddings of B PIL images (or preprocessed (B, 3, H, W) pixels); eval mode."""
        if not len(images):
            return torch.empty(0, self.embed_dim, device=self.device)
        with _eval_mode(self):
            return self.embed_image_states(self.vision(self._pixels(images)).tokens).float()

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """(B, E) unit-norm embeddings of B texts; eval mode, no gradients."""
        if not len(texts):
            return torch.empty(0, self.embed_dim, device=self.device)
        with _eval_mode(self):
            return self.embed_text_states(*self._text_batch(texts)).float()

    def match(self, images: Sequence[Image.Image] | Tensor, texts: Sequence[str]) -> Tensor:
        """(B,) ITM probability that text i describes image i; eval mode, no gradients."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; match scores one text per image")
        if not len(texts):
            return torch.empty(0, device=self.device)
        with _eval_mode(self):
            image = self.vision(self._pixels(images)).tokens  # (B, N, Di)
            return torch.sigmoid(self.match_states(*self._text_batch(texts), image))

    # -- inference: VQA and classification ------------------------------------
    def predict(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[str]:
        """The most likely answer / label for each image-text pair (eval mode, no gradients).

        Args:
            images: B PIL images (any mode; converted to RGB).
            texts: B questions or texts.
        Returns:
            B strings from :attr:`vocabulary`.
        """
        if self.head.causal:
            raise TypeError(f"a {self.task} model writes text; use generate(images) instead of predict")
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; predict takes one text per image")
        if not len(images):
            return []
        with _eval_mode(self):
            pixel_values = self.vision.preprocess(list(images)).to(self.device, self.dtype)  # (B, 3, H, W)
            batch = self.text.tokenize(list(texts), max_length=self.max_text_len)
            logits = self(
                pixel_values=pixel_values,
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ).logits  # (B, C)
        vocabulary = self.vocabulary or list(getattr(self.head, "labels", ()))  # ITM: "no match" / "match"
        return [vocabulary[i] for i in logits.argmax(dim=-1).tolist()]

    # -- inference: captioning ------------------------------------------------
    def generate(
        self,
        images: Sequence[Image.Image],
        max_new_tokens: int = 20,
        num_beams: int = 1,
        use_cache: bool = True,
        length_penalty: float = 1.0,
    ) -> list[str]:
        """Caption images: greedy (``num_beams=1``) or beam search; see :meth:`generate_ids`.

        Returns:
            one caption per image, special tokens removed.
        """
        if not len(images):
            return []
        pixel_values = self.vision.preprocess(list(images))  # (B, 3, H, W)
        ids = self.generate_ids(
            pixel_values,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            use_cache=use_cache,
            length_penalty=length_penalty,
        )
        captions = self.text.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        return [c.strip() for c in captions]

    def generate_ids(
        self,
        pixel_values: Tensor | None = None,
        *,
        image_states: Tensor | None = None,
        image_mask: Tensor | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        use_cache: bool = True,
        length_penalty: float = 1.0,
    ) -> Tensor:
        """Caption token ids by beam search (greedy decoding is the one-beam case).

        The image is encoded once. Each step scores the next token of every beam;
        a beam that produced EOS ([SEP]) is finished and only extends with padding
        at no cost. Beams are ranked by ``sum log p / length ** length_penalty``
        (length = generated tokens, EOS included), which for unfinished beams of
        equal length is the plain sum, so one beam is exactly greedy decoding.

        With ``use_cache`` the text encoder keeps its HF ``past_key_values`` and the
        fusion its :class:`~fusionzoo.layers.KVCache`, so each step processes one new
        position; without it the whole prefix is recomputed each step. Both give
        the same tokens (up to float rounding in near-ties).

        Args:
            pixel_values: (B, 3, H, W) preprocessed images, or
            image_states: (B, N, Di) precomputed image tokens.
            image_mask: (B, N) bool, True = real image token; None = all real.
            max_new_tokens: most tokens generated after [CLS].
            num_beams: beams per image; 1 = greedy.
            use_cache: reuse past keys/values instead of recomputing the prefix.
            length_penalty: exponent of the length normalisation (> 0 favours longer captions).
        Returns:
            (B, 1 + L) long: [CLS], the caption, [SEP] and padding after it.
        """
        if not self.head.causal:
            raise TypeError(f"a {self.task} model does not write text; use predict(images, texts)")
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"need num_beams >= 1 and max_new_tokens >= 1, got {num_beams} and {max_new_tokens}")
        if max_new_tokens + 1 > self.text.max_length:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} plus [CLS] exceeds the {self.text.max_length} positions "
                "of the text encoder"
            )
        bos, eos, pad = self.text.bos_token_id, self.text.eos_token_id, self.text.pad_token_id
        if bos is None or eos is None:
            raise ValueError(f"text encoder {self.text.spec}: generation needs BOS/[CLS] and EOS/[SEP] tokens")
        with _eval_mode(self):
            if pixel_values is not None:
                pixel_values = pixel_values.to(self.device, self.dtype)
            image = self.encode_image(pixel_values, image_states)  # (B, N, Di)
            b, k, device = image.shape[0], num_beams, image.device
            image = image.repeat_interleave(k, dim=0)  # (B*K, N, Di), beams of an image adjacent
            if image_mask is not None:
                image_mask = image_mask.repeat_interleave(k, dim=0)  # (B*K, N)

            ids = torch.full((b * k, 1), bos, dtype=torch.long, device=device)  # (B*K, 1)
            scores = torch.zeros(b, k, dtype=torch.float64, device=device)  # (B, K) summed log-probabilities
            scores[:, 1:] = float("-inf")  # all beams start identical: expand the first only
            lengths = torch.zeros(b * k, dtype=torch.float64, device=device)  # (B*K,) tokens generated so far
            finished = torch.zeros(b * k, dtype=torch.bool, device=device)  # (B*K,)
            cache = KVCache() if use_cache else None
            past: Any = None

            for _ in range(max_new_tokens):
                log_probs, past = self._next_token_log_probs(ids, image, image_mask, cache, past)  # (B*K, V)
                vocab = log_probs.shape[-1]
                # A finished beam may only append padding, at no cost (one candidate per finished beam).
                pad_only = torch.full_like(log_probs[:1], float("-inf"))
                pad_only[0, pad] = 0.0
                log_probs = torch.where(finished[:, None], pad_only, log_probs)
                candidates = scores.reshape(b * k, 1) + log_probs  # (B*K, V)
                new_lengths = lengths + (~finished).to(lengths.dtype)  # (B*K,)
                ranked = candidates / new_lengths.clamp_min(1.0)[:, None] ** length_penalty  # (B*K, V)
                best = ranked.reshape(b, k * vocab).topk(k, dim=-1).indices  # (B, K), best first
                beam, token = best // vocab, best % vocab  # (B, K) source beam, appended token
                rows = (torch.arange(b, device=device)[:, None] * k + beam).reshape(-1)  # (B*K,)
                scores = candidates.reshape(b, k * vocab).gather(1, best)  # (B, K)
                ids = torch.cat([ids[rows], token.reshape(-1, 1)], dim=1)  # (B*K, t+1)
                lengths = new_lengths[rows]
                finished = finished[rows] | (token.reshape(-1) == eos)
                if cache is not None and k > 1:
                    cache.reorder(rows)
                    past = self.text.reorder_cache(past, rows)
                if bool(finished.all()):
                    break
            # Beams are sorted by their normalised score: the first of each image is the best.
            return ids.reshape(b, k, -1)[:, 0]  # (B, 1 + L)

    def _next_token_log_probs(
        self,
        ids: Tensor,
        image: Tensor,
        image_mask: Tensor | None,
        cache: KVCache | None,
        past: Any,
    ) -> tuple[Tensor, Any]:
        """Log-probabilities (B', V) of the token after ``ids`` (B', t), and the updated HF cache.

        With a cache only the positions not yet processed are encoded and fused
        (the text encoder's HF cache length says how many were); without one the
        whole prefix is.
        """
        mask = torch.ones_like(ids)  # (B', t): generated positions are all real
        if cache is None:
            states = self.text(ids, mask).states  # (B', t, Dt)
            fused = self.fusion(states, mask.bool(), image, image_mask, causal=True)
        else:
            new = ids[:, cache.offset:]  # (B', t - offset): [CLS] at the first step, then one token
            out = self.text(new, mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            fused = self.fusion(out.states, mask.bool(), image, image_mask, causal=True, cache=cache)
        last = _last_position(fused)  # the head only needs the newest position
        logits = self.head(last, vote=self._vote())[:, -1]  # (B', V), or (B', V') over the head's output_ids
        if hasattr(self.head, "full_vocabulary"):
            logits = self.head.full_vocabulary(logits)  # (B', V)
        return logits.double().log_softmax(dim=-1), past

    # -- checkpoints ----------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors, text_encoder/ and tokenizer/ into ``directory``.

        The files are written into a temporary folder next to ``directory`` and
        moved in afterwards, ``config.json`` last (an existing one is removed
        first), so a crash never leaves a folder that loads as a half-written
        model. Other files already in ``directory`` are left alone. Every file
        gets the mode the umask allows (0644 under umask 022).

        Returns:
            the folder, as a Path.
        """
        from .version import __version__

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"cannot save a model to {directory}: it exists and is not a folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, "fusionzoo_version": __version__, **self.config}
        # load_model checks the tokenizer it finds against this (a lost tokenizer.json leaves 5 tokens)
        config["text"] = {**config.get("text", {}), "tokenizer_size": len(self.text.tokenizer)}
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
        try:
            safetensors.torch.save_model(self, str(staging / WEIGHTS_NAME), force_contiguous=True)
            self.text.save_config(staging)
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            _publish(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        allow_download: bool = False,
    ) -> "FusionModel":
        """Rebuild a model saved by :meth:`save_pretrained` and load its weights strictly.

        The folder is data, never a list of places to read or things to run: timm gets only
        the architecture keywords of :data:`~fusionzoo.encoders.saved_vision.SAVED_TIMM_KWARGS`
        from config.json (a recorded ``checkpoint`` is never opened), every file read must
        resolve (symlinks followed) inside the folder, the tokenizer must fit the text
        encoder's embedding table, and nothing goes to the network unless ``allow_download``.

        Args:
            directory: the saved folder.
            device: where to put the model (default CPU).
            allow_download: let an ``hf-hub:`` image encoder name in config.json fetch its timm
                config from the Hugging Face hub. Without it nothing is downloaded, and such a
                folder is refused with an error that says so.
        Returns:
            the model, in eval mode (call ``.train()`` to fine-tune it further).
        Raises:
            ModelFolderError: config.json is not JSON, misses a key, holds a value of the wrong
                kind, comes from a newer checkpoint format, gives timm a keyword it may not, names
                a path outside the folder or a hub model without ``allow_download``; a file is a
                symlink to outside the folder; the tokenizer does not fit the text encoder; the
                weights do not fit the architecture. A missing folder or file is also a
                ``FileNotFoundError``. Each message names the file and the key.
            RegistryError: config.json names a fusion, head, task or encoder that is not registered.
        """
        folder = Path(directory)
        config_path = folder / CONFIG_NAME
        config = _read_config(folder)

        def get(key: str, kind: type | tuple[type, ...] | None = None, expected: str = "") -> Any:
            return _get(config, config_path, key, kind, expected)

        version = get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise ModelFolderError(
                f"{config_path}: format_version {version!r} is newer than this fusionzoo reads "
                f"({FORMAT_VERSION}); upgrade fusionzoo (the model was saved by fusionzoo "
                f"{config.get('fusionzoo_version', '?')})"
            )
        task_spec = _lookup(TASKS, get("task"), config_path, "task")
        fusion_cls = _lookup(FUSIONS, get("fusion.name"), config_path, "fusion.name")
        head_cls = _lookup(HEADS, get("head.name"), config_path, "head.name")
        fusion_config = get("fusion.config", dict, "an object")
        head_kwargs = get("head.kwargs", dict, "an object")
        vocabulary = _saved_vocabulary(config, config_path, task_spec)
        _check_optional(config, config_path)

        vision = rebuild_saved_vision_encoder(
            get("vision.spec"), get("vision.data_config"),
            folder=folder, config_path=config_path, allow_download=allow_download,
        )
        text = _load_text_encoder(folder, config_path, get("text.spec", (dict, str), "an object"),
                                  get("text", dict, "an object").get("tokenizer_size"))
        with _as_folder_error(config_path, "fusion.config", "does not build the fusion"):
            fusion = fusion_cls(text.out_dim, vision.out_dim, **fusion_config)
        with _as_folder_error(config_path, "head.kwargs", "does not build the head"):
            head = head_cls.from_parts(fusion, text, vocabulary, **head_kwargs)
        align = None
        if config.get("align") is not None:
            align_config = get("align", dict, "an object or null")
            with _as_folder_error(config_path, "align", "does not build the alignment"):
                align = Alignment(text.out_dim, vision.out_dim, **align_config)
        model_config = {k: v for k, v in config.items() if k not in ("format_version", "fusionzoo_version")}
        with _as_folder_error(config_path, "task", "does not describe a model that fits together"):
            model = cls(vision, text, fusion, head, model_config, align=align)
        _load_weights(model, folder / WEIGHTS_NAME, config_path)
        if config.get("freeze_encoders"):
            model.vision.freeze()
            model.text.freeze()
        if device is not None:
            model.to(device)
        return model.eval()


def _last_position(fused: FusionOutput) -> FusionOutput:
    """The fusion output restricted to its last text position (for next-token scoring)."""
    per_modality = fused.modality_text_tokens
    return dataclasses.replace(
        fused,
        text_tokens=fused.text_tokens[:, -1:],  # (B, 1, D)
        modality_text_tokens=None if per_modality is None else per_modality[:, :, -1:],  # (B, K, 1, D)
    )


def _lookup(registry: Any, name: Any, config_path: Path, key: str) -> Any:
    """``registry.get(name)`` with an error that names the checkpoint file and key."""
    if not isinstance(name, str):
        raise ModelFolderError(
            f"{config_path}: key {key!r} must be the name of a registered {registry.kind}, got {name!r}"
        )
    try:
        return registry.get(name)
    except RegistryError as exc:
        raise RegistryError(
            f"{config_path}: key {key!r} names {registry.kind} {name!r}, which is not registered. {exc} "
            f"If it comes from a plug-in, import that module (or pass --import) before loading."
        ) from exc


# -- reading a model folder as data -------------------------------------------------------------
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"  # the vocabulary of a tokenizers-backed ("fast") tokenizer


def _check_inside(folder: Path, path: Path) -> None:
    """A ModelFolderError unless ``path`` resolves (symlinks followed) inside ``folder``."""
    root, resolved = folder.resolve(), path.resolve()
    if not resolved.is_relative_to(root):
        raise ModelFolderError(
            f"{path} resolves to {resolved}, outside the model folder {root}: a model folder holds its own "
            "files (a symlink in it may only point inside it)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a ModelFolderError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_config(folder: Path) -> dict[str, Any]:
    """config.json of ``folder``, once it and model.safetensors are known to be files inside it."""
    if not folder.is_dir():
        raise MissingModelFileError(f"no saved fusionzoo model at {folder}: the folder does not exist")
    for path in (folder / CONFIG_NAME, folder / WEIGHTS_NAME):
        if not path.is_file():
            raise MissingModelFileError(
                f"{path} not found: a model saved by FusionModel.save_pretrained has {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (a folder without {CONFIG_NAME} is an incomplete save)"
            )
        _check_inside(folder, path)
    return _read_json(folder / CONFIG_NAME)


def _get(config: dict[str, Any], config_path: Path, key: str, kind: type | tuple[type, ...] | None = None,
         expected: str = "") -> Any:
    """``config[a][b]`` for ``key="a.b"``; a ModelFolderError naming the key if it is missing or not ``kind``."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ModelFolderError(f"{config_path}: missing key {key!r}")
        value = value[part]
    if kind is not None and not isinstance(value, kind):
        raise ModelFolderError(f"{config_path}: key {key!r} must be {expected}, got {value!r}")
    return value


def _saved_vocabulary(config: dict[str, Any], config_path: Path, task_spec: Any) -> list[str] | None:
    """The ``answers`` / ``labels`` of config.json for the task, checked as create_model checks them."""
    key = task_spec.vocabulary_key
    if not key:
        return None
    value = _get(config, config_path, key, list, "a list of strings")
    with _as_folder_error(config_path, key, "is not a valid output vocabulary"):
        return _check_vocabulary(config["task"], key, {key: value})


def _check_optional(config: dict[str, Any], config_path: Path) -> None:
    """``max_text_len`` (an int >= 2) and ``freeze_encoders`` (a bool), where config.json has them."""
    max_text_len = config.get("max_text_len", 32)
    if not isinstance(max_text_len, int) or isinstance(max_text_len, bool) or max_text_len < 2:
        raise ModelFolderError(f"{config_path}: key 'max_text_len' must be an int >= 2, got {max_text_len!r}")
    if not isinstance(config.get("freeze_encoders", False), bool):
        raise ModelFolderError(f"{config_path}: key 'freeze_encoders' must be true or false, "
                               f"got {config['freeze_encoders']!r}")


@contextlib.contextmanager
def _as_folder_error(config_path: Path, key: str, what: str) -> Iterator[None]:
    """Turn a ValueError / TypeError raised while building from ``key`` into a ModelFolderError naming it."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ModelFolderError):
            raise
        raise ModelFolderError(f"{config_path}: key {key!r} {what}: {exc}") from exc


def _check_text_files(folder: Path) -> None:
    """text_encoder/ and tokenizer/ hold their files, all inside the folder, and name no file elsewhere.

    A tokenizer_config.json may not point the tokenizer at a vocabulary outside tokenizer/
    (transformers opens a string under ``vocab``, ``merges`` or a ``*_file`` key as a path).
    """
    for name in (CONFIG_DIR, TOKENIZER_DIR):
        path = folder / name
        if not path.is_dir():
            raise MissingModelFileError(
                f"{path} not found: a model saved by FusionModel.save_pretrained has the folders "
                f"{CONFIG_DIR}/ and {TOKENIZER_DIR}/ (written by TextEncoder.save_config)"
            )
        _check_inside(folder, path)
        for entry in sorted(path.rglob("*")):
            _check_inside(folder, entry)
    tokenizer_dir = folder / TOKENIZER_DIR
    expected = [folder / CONFIG_DIR / CONFIG_NAME, tokenizer_dir / TOKENIZER_CONFIG]
    for path in expected:
        if not path.is_file():
            raise MissingModelFileError(f"{path} not found: TextEncoder.save_config writes it into every saved model")
    _read_json(folder / CONFIG_DIR / CONFIG_NAME)
    tokenizer_config = _read_json(tokenizer_dir / TOKENIZER_CONFIG)
    backend = tokenizer_config.get("backend", "tokenizers")
    if backend == "tokenizers" and not (tokenizer_dir / TOKENIZER_FILE).is_file():
        raise MissingModelFileError(
            f"{tokenizer_dir / TOKENIZER_FILE} not found: {tokenizer_dir / TOKENIZER_CONFIG} describes a "
            f"tokenizers-backed tokenizer, whose vocabulary is that file (without it every word would be [UNK])"
        )
    inside = tokenizer_dir.resolve()
    for key, value in tokenizer_config.items():
        if key in ("vocab", "merges") or key.endswith("_file"):
            paths = [value]
        elif key.endswith("_files"):
            paths = value if isinstance(value, list) else [value]
        else:
            continue
        for item in paths:
            if isinstance(item, str) and item and not Path(item).resolve().is_relative_to(inside):
                raise ModelFolderError(
                    f"{tokenizer_dir / TOKENIZER_CONFIG}: key {key!r} names the file {item!r}, outside {inside}; "
                    f"a saved tokenizer keeps its files in {TOKENIZER_DIR}/ under their standard names"
                )


def _load_text_encoder(folder: Path, config_path: Path, spec: Any, tokenizer_size: Any) -> TextEncoder:
    """The text encoder of text_encoder/ and tokenizer/, its tokenizer checked against the embedding table.

    ``tokenizer_size`` (config.json's ``text.tokenizer_size``, written since it was added) is the
    tokenizer length saved with the model; folders without it must have exactly one embedding
    row per token.
    """
    if tokenizer_size is not None and not (type(tokenizer_size) is int and tokenizer_size > 0):
        raise ModelFolderError(
            f"{config_path}: key 'text.tokenizer_size' must be a positive int, got {tokenizer_size!r}"
        )
    _check_text_files(folder)
    config_dir, tokenizer_dir = folder / CONFIG_DIR, folder / TOKENIZER_DIR
    try:
        text = TextEncoder.from_saved(folder, spec)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(
            f"{config_dir / CONFIG_NAME} and {tokenizer_dir}/ do not rebuild a text encoder: {exc}"
        ) from exc
    tokens, rows = len(text.tokenizer), text.vocab_size
    expected = rows if tokenizer_size is None else tokenizer_size
    if tokens != expected:
        if tokenizer_size is None:
            said = f"the embedding table of {config_dir / CONFIG_NAME} has {rows} rows"
        else:
            said = f"{config_path} key 'text.tokenizer_size' says {tokenizer_size} (embedding table: {rows} rows)"
        raise ModelFolderError(
            f"{tokenizer_dir}/: the tokenizer has {tokens} tokens but {said}; a tokenizer file is missing or "
            "comes from another model (save_pretrained writes the tokenizer the model was trained with)"
        )
    return text


def _load_weights(model: nn.Module, weights_path: Path, config_path: Path) -> None:
    """Load model.safetensors strictly; a ModelFolderError if it does not fit the architecture."""
    try:
        safetensors.torch.load_model(model, str(weights_path), strict=True)
    except (RuntimeError, safetensors.SafetensorError) as exc:
        raise ModelFolderError(
            f"{weights_path} does not fit the architecture {config_path} describes: {exc}"
        ) from exc


def _apply_umask(staging: Path) -> None:
    """Give every folder 0777 and every file 0666 less the umask, as ``mkdir`` and ``open`` would.

    ``mkdtemp`` makes the staging folder private (0700) and safetensors writes its file 0600.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _publish(staging: Path, target: Path) -> None:
    """Move the files of ``staging`` into ``target`` so that a crash leaves no loadable half-model.

    A new folder is one atomic rename. Into an existing folder, its old
    config.json is removed first, the other entries are replaced one by one
    (each an atomic rename), and the new config.json comes last. Every file and
    folder gets the mode the umask allows.
    """
    _apply_umask(staging)
    if not target.exists():
        os.rename(staging, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        if (target / CONFIG_NAME).exists():
            os.replace(target / CONFIG_NAME, trash / CONFIG_NAME)
        for entry in sorted(staging.iterdir()):
            if entry.name == CONFIG_NAME:
                continue
            destination = target / entry.name
            if destination.exists() or destination.is_symlink():
                os.replace(destination, trash / entry.name)
            os.replace(entry, destination)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _check_vocabulary(task: str, vocabulary_key: str | None, given: dict[str, Any]) -> list[str] | None:
    """Validate the ``answers`` / ``labels`` argument of :func:`create_model` for ``task``."""
    for key, value in given.items():
        if value is not None and key != vocabulary_key:
            wanted = f"{vocabulary_key}=[...]" if vocabulary_key else "no output vocabulary (the tokenizer is)"
            raise ValueError(f"task {task!r} takes {wanted}, not {key}=")
    if vocabulary_key is None:
        return None
    value = given.get(vocabulary_key)
    if value is None:
        raise ValueError(f"task {task!r} needs {vocabulary_key}=[...]: the list of output strings the head predicts")
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{vocabulary_key} must be a list of strings, got {type(value).__name__}")
    value = list(value)
    if not value:
        raise ValueError(f"{vocabulary_key} must not be empty")
    not_str = [v for v in value if not isinstance(v, str)]
    if not_str:
        raise TypeError(f"{vocabulary_key} must hold strings only, got {not_str[:3]!r}")
    seen: set[str] = set()
    duplicates = sorted({v for v in value if v in seen or seen.add(v)})
    if duplicates:
        raise ValueError(f"{vocabulary_key} must be unique, got duplicates {duplicates[:5]!r}")
    return value


def _fusion_kwargs_for_head(fusion_cls: type[FusionModule], head_cls: type, given: dict[str, Any] | None
                            ) -> dict[str, Any]:
    """``given`` plus, for a fusion with ``supports_head_reads``, ``head_reads`` = what ``head_cls`` reads."""
    kwargs = dict(given or {})
    if not getattr(fusion_cls, "supports_head_reads", False):
        return kwargs
    reads = getattr(head_cls, "reads", "all")
    head_reads = kwargs.setdefault("head_reads", reads)
    if head_reads not in ("all", reads):
        raise ValueError(
            f"fusion_kwargs head_reads={head_reads!r} would leave out what the {head_cls.__name__} reads "
            f"({reads!r}); leave it out (the default is what the head reads) or pass 'all'"
        )
    return kwargs


def create_model(
    task: str,
    fusion: str,
    vision: str | dict[str, Any] = "tiny",
    text: str | dict[str, Any] = "tiny",
    *,
    pretrained: bool = True,
    freeze_encoders: bool = False,
    answers: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    fusion_kwargs: dict[str, Any] | None = None,
    head_kwargs: dict[str, Any] | None = None,
    align_kwargs: dict[str, Any] | None = None,
    max_text_len: int = 32,
) -> FusionModel:
    """Build a model for ``task`` with the named fusion and encoders.

    Args:
        task: a registered task (``fusionzoo.list_tasks()``): ``"vqa"``,
            ``"captioning"`` or ``"classification"``.
        fusion: a registered fusion (``fusionzoo.list_fusions()``).
        vision: image encoder preset, timm name or spec dict (``build_vision_encoder``).
        text: text encoder preset, folder, hub id or spec dict (``build_text_encoder``);
            built causal for captioning.
        pretrained: load the encoders' pretrained weights (False: random, e.g. for tests).
        freeze_encoders: freeze both encoders (no gradients, eval mode).
        answers: VQA answer vocabulary (required for ``vqa``; unique strings).
        labels: classification label names (required for ``classification``).
        fusion_kwargs: hyperparameters of the fusion (its constructor keywords). A fusion
            with ``supports_head_reads`` also gets ``head_reads``, what the task head reads
            (``head.reads``, ``"all"`` for a head that does not say), unless given here:
            it then builds only the parameters that feed that head, so every trainable
            parameter gets a gradient (DDP needs no ``find_unused_parameters``); the
            value is saved in the fusion's config. ``head_reads="all"`` builds every part.
        head_kwargs: hyperparameters of the head (e.g. ``dropout``).
        align_kwargs: hyperparameters of the :class:`~fusionzoo.alignment.Alignment` a task
            that embeds images and texts apart (``retrieval``) builds when the fusion does not
            align its own streams (``embed_dim``, ``temperature``, ``text_summary``, ``image_summary``).
        max_text_len: tokens kept per question / text in ``predict``.
    Raises:
        RegistryError: unknown task or fusion (lists what exists).
        ValueError / TypeError: a missing, empty, duplicated or misplaced vocabulary, or a
            ``head_reads`` in ``fusion_kwargs`` that leaves out what the head reads.
    """
    task_spec = TASKS.get(task)
    fusion_cls = FUSIONS.get(fusion)
    head_cls = HEADS.get(task_spec.head)
    vocabulary = _check_vocabulary(task, task_spec.vocabulary_key, {"answers": answers, "labels": labels})
    if not isinstance(max_text_len, int) or max_text_len < 2:
        raise ValueError(f"max_text_len must be an int >= 2 ([CLS] and [SEP] count), got {max_text_len!r}")
    head_kwargs = dict(head_kwargs or {})

    vision_encoder = build_vision_encoder(vision, pretrained=pretrained)
    text_encoder = build_text_encoder(text, pretrained=pretrained, causal=bool(getattr(head_cls, "causal", False)))
    if max_text_len > text_encoder.max_length:
        raise ValueError(
            f"max_text_len={max_text_len} exceeds the {text_encoder.max_length} positions of text encoder "
            f"{text_encoder.spec}"
        )
    fusion_kwargs = _fusion_kwargs_for_head(fusion_cls, head_cls, fusion_kwargs)
    fusion_module = fusion_cls(text_encoder.out_dim, vision_encoder.out_dim, **fusion_kwargs)
    head = head_cls.from_parts(fusion_module, text_encoder, vocabulary, **head_kwargs)
    align = None
    if task_spec.aligns and not fusion_module.aligns:
        align = Alignment(text_encoder.out_dim, vision_encoder.out_dim, **dict(align_kwargs or {}))
    elif align_kwargs and not task_spec.aligns:
        raise ValueError(f"align_kwargs are for a task that embeds images and texts apart (retrieval), not {task!r}")
    if freeze_encoders:
        vision_encoder.freeze()
        text_encoder.freeze()

    config: dict[str, Any] = {
        "task": task,
        "fusion": {"name": fusion, "config": fusion_module.config},
        "vision": {"spec": vision_encoder.spec, "data_config": vision_encoder.data_config},
        "text": {"spec": text_encoder.spec},
        "head": {"name": task_spec.head, "kwargs": head_kwargs},
        "max_text_len": max_text_len,
        "freeze_encoders": bool(freeze_encoders),
    }
    if task_spec.vocabulary_key:
        config[task_spec.vocabulary_key] = vocabulary
    if task_spec.aligns:
        config["align"] = None if align is None else align.config  # None: the fusion aligns itself
    return FusionModel(vision_encoder, text_encoder, fusion_module, head, config, align=align)


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    allow_download: bool = False,
) -> FusionModel:
    """Load a model saved by :meth:`FusionModel.save_pretrained` (see :meth:`FusionModel.from_pretrained`).

    The folder's files are treated as untrusted data; nothing is downloaded unless
    ``allow_download=True`` (only an ``hf-hub:`` image encoder name needs it).
    """
    return FusionModel.from_pretrained(directory, device=device, allow_download=allow_download)
