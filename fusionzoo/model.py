"""FusionModel: image encoder + text encoder + fusion + task head, and what it returns.

The composition follows TorchMultimodal (built modules passed in) with the thin
task heads and ``save_pretrained`` / ``from_pretrained`` round trip of
transformers (ViLT, BLIP)::

    pixel_values --vision--> image tokens (B, N, Di) --+
                                                       +--fusion--> FusionOutput --head--> logits
    input_ids ----text-----> text states (B, T, Dt) ---+

* :class:`FusionModel` takes the built modules and a plain ``config`` dict (the model
  config of :mod:`fusionzoo.model_config`) that :meth:`FusionModel.save_pretrained`
  writes to ``config.json``; :func:`fusionzoo.factory.create_model` builds both from
  hyperparameters (names and keyword dicts).
* :meth:`FusionModel.forward` is the training/evaluation pass and returns a
  :class:`ModelOutput`; inference lives in :meth:`~FusionModel.predict` (VQA and
  classification: strings from the model's vocabulary) and
  :meth:`~FusionModel.generate` (captioning: greedy or beam search, with or without
  key/value caches, both giving the same captions).
* :meth:`~FusionModel.save_pretrained`, :meth:`~FusionModel.from_pretrained` and
  :func:`load_model` delegate to :mod:`fusionzoo.model_folder`, which owns the saved
  folder: its atomic writing and its reading as untrusted data.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from .alignment import Alignment
from .decoding import Decoded, DecodingOptions, beam_search
from .encoders import TextEncoder, VisionEncoder
from .fusions.base import FusionModule, FusionOutput
from .layers import KVCache
from .losses import IGNORE_INDEX, itc_loss
from .explain import Explanation, explain
from .hub import upload_model_folder
from .lora import LoraSpec, add_lora, merge_lora as fold_lora
from .model_card import write_model_card
from .model_folder import load_folder, save_folder
from .quantize import check_quantize, quantize_model, saved_quantized
from .registry import TASKS


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
        config: plain dict describing the model, as :func:`~fusionzoo.factory.create_model` builds it
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
    @property
    def output_names(self) -> list[str]:
        """What each of the head's outputs stands for: :attr:`vocabulary`, or an ITM head's labels."""
        return list(self.vocabulary or getattr(self.head, "labels", ()))

    def choice_logits(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """(B, C) float32 logits over :attr:`output_names` of B image-text pairs (eval mode, no gradients).

        Args:
            images: B PIL images (any mode; converted to RGB).
            texts: B questions or texts.
        """
        if self.head.causal:
            raise TypeError(f"a {self.task} model writes text; use generate(images) instead of predict")
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; predict takes one text per image")
        if not len(images):
            return torch.empty(0, len(self.output_names), device=self.device)
        with _eval_mode(self):
            batch = self.text.tokenize(list(texts), max_length=self.max_text_len)
            return self(
                pixel_values=self._pixels(images),  # (B, 3, H, W)
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ).logits.float()  # (B, C)

    def predict(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[str]:
        """The most likely answer / label for each image-text pair (eval mode, no gradients).

        Args:
            images: B PIL images (any mode; converted to RGB).
            texts: B questions or texts.
        Returns:
            B strings from :attr:`output_names`.
        """
        names = self.output_names
        return [names[i] for i in self.choice_logits(images, texts).argmax(dim=-1).tolist()]

    # -- inference: captioning ------------------------------------------------
    def generate(self, images: Sequence[Image.Image], use_cache: bool = True, **decoding: Any) -> list[str]:
        """Caption images: greedy (``num_beams=1``) or beam search; ``decoding``: the
        :class:`~fusionzoo.decoding.DecodingOptions` (``max_new_tokens``, ``num_beams``, ...).

        Returns:
            one caption per image, special tokens removed.
        """
        if not len(images):
            return []
        ids = self.generate_ids(self.vision.preprocess(list(images)), use_cache=use_cache, **decoding)
        return [c.strip() for c in self.text.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

    def generate_ids(self, pixel_values: Tensor | None = None, *, image_states: Tensor | None = None,
                     image_mask: Tensor | None = None, use_cache: bool = True, **decoding: Any) -> Tensor:
        """(B, 1 + L) long caption token ids: :meth:`decode`'s ``ids``."""
        return self.decode(pixel_values, image_states=image_states, image_mask=image_mask, use_cache=use_cache,
                           **decoding).ids

    def decode(self, pixel_values: Tensor | None = None, *, image_states: Tensor | None = None,
               image_mask: Tensor | None = None, use_cache: bool = True, **decoding: Any) -> Decoded:
        """Captions by :func:`~fusionzoo.decoding.beam_search`, with their scores.

        The image is encoded once. With ``use_cache`` the text encoder keeps its HF
        ``past_key_values`` and the fusion its :class:`~fusionzoo.layers.KVCache`, so each step
        processes one new position; without it the whole prefix is recomputed each step. Both give
        the same tokens (up to float rounding in near-ties).

        Args:
            pixel_values: (B, 3, H, W) preprocessed images, or
            image_states: (B, N, Di) precomputed image tokens.
            image_mask: (B, N) bool, True = real image token; None = all real.
            use_cache: reuse past keys/values instead of recomputing the prefix.
            decoding: the fields of :class:`~fusionzoo.decoding.DecodingOptions` (``num_beams``,
                ``max_new_tokens``, ``min_new_tokens``, ``length_penalty``, ``no_repeat_ngram_size``,
                ``repetition_penalty``), with the meanings transformers gives them.
        Returns:
            :class:`~fusionzoo.decoding.Decoded`: ids (B, 1 + L) -- [CLS], the caption, [SEP] and
            padding after it -- and each caption's score (B,).
        """
        if not self.head.causal:
            raise TypeError(f"a {self.task} model does not write text; use predict(images, texts)")
        options = DecodingOptions(**decoding)
        if options.max_new_tokens + 1 > self.text.max_length:
            raise ValueError(
                f"max_new_tokens={options.max_new_tokens} plus [CLS] exceeds the {self.text.max_length} positions "
                "of the text encoder"
            )
        bos, eos, pad = self.text.bos_token_id, self.text.eos_token_id, self.text.pad_token_id
        if bos is None or eos is None:
            raise ValueError(f"text encoder {self.text.spec}: generation needs BOS/[CLS] and EOS/[SEP] tokens")
        with _eval_mode(self):
            if pixel_values is not None:
                pixel_values = pixel_values.to(self.device, self.dtype)
            image = self.encode_image(pixel_values, image_states)  # (B, N, Di)
            k = options.num_beams
            image = image.repeat_interleave(k, dim=0)  # (B*K, N, Di), beams of an image adjacent
            if image_mask is not None:
                image_mask = image_mask.repeat_interleave(k, dim=0)  # (B*K, N)
            cache = KVCache() if use_cache else None
            state: dict[str, Any] = {"past": None}

            def next_logits(ids: Tensor) -> Tensor:
                logits, state["past"] = self._next_token_logits(ids, image, image_mask, cache, state["past"])
                return logits

            def reorder(rows: Tensor) -> None:
                if cache is not None:
                    cache.reorder(rows)
                    state["past"] = self.text.reorder_cache(state["past"], rows)

            return beam_search(next_logits, len(image) // k, options, bos=bos, eos=eos, pad=pad,
                               device=image.device, reorder=reorder)

    def _next_token_logits(
        self,
        ids: Tensor,
        image: Tensor,
        image_mask: Tensor | None,
        cache: KVCache | None,
        past: Any,
    ) -> tuple[Tensor, Any]:
        """Logits (B', V) float64 of the token after ``ids`` (B', t), and the updated HF cache.

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
        return logits.double(), past

    # -- checkpoints ----------------------------------------------------------
    def add_lora(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: Sequence[str] = ("vision", "text")) -> "FusionModel":
        """Add LoRA adapters to ``targets`` and freeze their base weights; see :func:`fusionzoo.lora.add_lora`."""
        return add_lora(self, LoraSpec(r, alpha, dropout, LoraSpec.parse_targets(targets)))

    def save_pretrained(self, directory: str | os.PathLike, *, merge_lora: bool = False) -> Path:
        """Write config.json, model.safetensors, text_encoder/ and tokenizer/ into ``directory``.

        A model with LoRA adapters writes ``adapters.safetensors`` instead of model.safetensors
        (the adapters, fusion and head; the encoders' base weights come from their presets,
        or ``base.safetensors`` where a preset does not rebuild them: :mod:`fusionzoo.lora`);
        ``merge_lora=True`` writes an ordinary folder with the adapters folded into the weights.

        The files are written into a temporary folder next to ``directory`` and
        moved in afterwards, ``config.json`` last (an existing one is removed
        first), so a crash never leaves a folder that loads as a half-written
        model. Other files already in ``directory`` are left alone. Every file
        gets the mode the umask allows (0644 under umask 022).

        Returns:
            the folder, as a Path.
        """
        if merge_lora and self.config.get("lora"):
            merged = fold_lora(copy.deepcopy(self))
            return save_folder(directory, merged, merged.text, merged.config)
        return save_folder(directory, self, self.text, self.config)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        allow_download: bool = False,
        quantize: str | None = None,
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
            quantize: ``"int8"``: quantise the loaded model's Linear layers for CPU inference
                (:func:`fusionzoo.quantize.quantize_model`). A folder saved quantised loads quantised
                whatever this says (its config.json has ``quantization``).
        Returns:
            the model, in eval mode (call ``.train()`` to fine-tune it further; not a quantised one).
        Raises:
            ModelFolderError: config.json is not JSON, misses a key, holds a value of the wrong
                kind, comes from a newer checkpoint format, gives timm a keyword it may not, names
                a path outside the folder or a hub model without ``allow_download``; a file is a
                symlink to outside the folder; the tokenizer does not fit the text encoder; the
                weights do not fit the architecture. A missing folder or file is also a
                ``FileNotFoundError``. Each message names the file and the key.
            RegistryError: config.json names a fusion, head, task or encoder that is not registered.
        """
        quantize = check_quantize(quantize)
        model = load_folder(directory, saved_quantized(cls, f"{directory}/config.json"), allow_download=allow_download)
        if quantize is not None:
            model = quantize_model(model, quantize, inplace=True, source=directory)
        if device is not None:
            model.to(device)
        return model.eval()

    # -- explaining and sharing (fusionzoo.explain, fusionzoo.hub) -------------
    def explain(self, image: Image.Image, question: str | None = None, **options: Any) -> Explanation:
        """Map how much the answer (or each caption word) depends on each image region; see
        :func:`fusionzoo.explain.explain` (``method``, and for a caption the decoding options:
        ``num_beams``, ``max_new_tokens``, ...)."""
        return explain(self, image, question, **options)

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Save this model (card included) and upload it to the Hub repo ``repo_id``; see
        :func:`fusionzoo.hub.upload_model_folder` (``private``, ``token``, ``commit_message``)."""
        with tempfile.TemporaryDirectory(prefix="fusionzoo-push-") as staging:
            folder = self.save_pretrained(Path(staging) / "model")
            write_model_card(folder, repo_id)
            return upload_model_folder(folder, repo_id, **options)


def _last_position(fused: FusionOutput) -> FusionOutput:
    """The fusion output restricted to its last text position (for next-token scoring)."""
    per_modality = fused.modality_text_tokens
    return dataclasses.replace(
        fused,
        text_tokens=fused.text_tokens[:, -1:],  # (B, 1, D)
        modality_text_tokens=None if per_modality is None else per_modality[:, :, -1:],  # (B, K, 1, D)
    )


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    allow_download: bool = False,
    quantize: str | None = None,
) -> FusionModel:
    """Load a model saved by :meth:`FusionModel.save_pretrained` (see :meth:`FusionModel.from_pretrained`).

    The folder's files are treated as untrusted data; nothing is downloaded unless
    ``allow_download=True`` (only an ``hf-hub:`` image encoder name needs it); ``quantize="int8"``
    gives an INT8 model for the CPU (:mod:`fusionzoo.quantize`).
    """
    return FusionModel.from_pretrained(directory, device=device, allow_download=allow_download, quantize=quantize)
