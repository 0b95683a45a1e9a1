"""Frozen-encoder features for the benchmark: image tokens per distinct image, text states per distinct text.

Both functions go through :class:`~fusionzoo.bench.cache.FeatureCache`: the first
run extracts and stores, later runs memory-map what is stored.

* :func:`image_features` -- ``VisionEncoder(pixels).tokens`` (U, N, Di) for U
  distinct image files, preprocessed with the given timm data config (the
  benchmark uses the encoder's own mean/std and interpolation at a chosen size,
  without a centre crop). Decoding runs in a DataLoader worker while the encoder
  runs in the main process, channels-last (about 2x faster for EfficientNet's
  depthwise convolutions on CPU than the default layout).
* :func:`text_features` -- token ids, mask and ``TextEncoder`` states
  (U, T, Dt) for U distinct strings, so a question asked of 1,000 images is
  encoded once. Texts are sorted by length before batching (little padding).
  A causal encoder's states of a caption depend only on that caption's own
  prefix, so they are the states teacher forcing needs and can be cached the
  same way; generation still runs the text encoder live.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..encoders import TextEncoder, VisionEncoder
from ..tasks.common import open_image
from .cache import CacheEntry, FeatureCache, cache_key, fingerprint_files, fingerprint_module, fingerprint_texts

#: Stored dtype of feature arrays (see :mod:`fusionzoo.bench.cache` for why half precision).
FEATURE_DTYPE = np.float16

# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ImageFiles(Dataset):
    """Decodes image files with a transform: index -> (3, H, W) tensor."""

    paths: Sequence[str]
    transform: Any

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_image(self.paths[index], entry=f"image #{index}"))  # (3, H, W)


def image_preprocessing(vision: VisionEncoder, image_size: int | None, crop: bool = False) -> dict[str, Any]:
    """The encoder's data config at ``image_size`` (None = its own), with or without its centre crop."""
    config = dict(vision.data_config)
    if image_size is not None:
        config["input_size"] = (int(config["input_size"][0]), int(image_size), int(image_size))
    if not crop:
        config["crop_pct"] = 1.0  # resize the whole image to the input size; nothing cut off
    return config


def image_features(
    cache: FeatureCache,
    vision: VisionEncoder,
    paths: Sequence[str],
    data_config: dict[str, Any],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    progress: bool = True,
    stage: int | None = None,
) -> CacheEntry:
    """Image tokens of every file in ``paths`` (in that order), cached.

    Args:
        cache: where to look and store.
        vision: the frozen image encoder.
        paths: distinct image files; row ``i`` of the result is ``paths[i]``.
        data_config: timm data config of the preprocessing (:func:`image_preprocessing`).
        batch_size: images per encoder call.
        device: where the encoder runs.
        workers: DataLoader workers decoding images (default 1 when there are
            several CPU cores, else 0).
        progress: show a progress bar.
        stage: None = the encoder's last feature map (``VisionEncoder(pixels).tokens``);
            an index = that intermediate stage's map (:meth:`VisionEncoder.stage_tokens`).
    Returns:
        an entry with ``tokens`` (U, N, Di) float16.
    """
    paths = list(paths)
    if len(set(paths)) != len(paths):
        raise ValueError("image_features expects distinct paths (one row per image file)")
    output = "tokens" if stage is None else f"stage-{stage}"
    preprocessing = {"data_config": data_config, "dtype": np.dtype(FEATURE_DTYPE).name, "output": output}
    key = cache_key({"weights": fingerprint_module(vision), "spec": vision.spec, "class": type(vision.model).__name__},
                    preprocessing, fingerprint_files(paths))
    name = f"image-{_slug(vision.spec)}-{data_config['input_size'][-1]}px" + ("" if stage is None else f"-stage{stage}")

    def build(write) -> dict[str, Any]:
        saved_config = vision.data_config
        vision.data_config = data_config
        transform = vision.transform(train=False)
        vision.data_config = saved_config
        n_workers = workers if workers is not None else (1 if (os.cpu_count() or 1) > 1 else 0)
        loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=n_workers)
        model = vision.to(device=device, memory_format=torch.channels_last)
        out: np.ndarray | None = None
        start, row = time.perf_counter(), 0
        with torch.inference_mode(), tqdm(total=len(paths), desc=f"extract {name}", unit="img",
                                          disable=not progress, leave=False) as bar:
            for pixels in loader:  # (B, 3, H, W)
                pixels = pixels.to(device).contiguous(memory_format=torch.channels_last)
                tokens = model(pixels).tokens if stage is None else model.stage_tokens(pixels, stage)  # (B, N, Di)
                if out is None:
                    out = np.empty((len(paths), *tokens.shape[1:]), dtype=FEATURE_DTYPE)
                out[row: row + len(tokens)] = tokens.float().cpu().numpy()
                row += len(tokens)
                bar.update(len(tokens))
        vision.to(memory_format=torch.contiguous_format)
        seconds = time.perf_counter() - start
        write("tokens", out)
        return {"images": len(paths), "tokens_per_image": int(out.shape[1]), "width": int(out.shape[2]),
                "images_per_second": round(len(paths) / max(seconds, 1e-9), 2)}

    return cache.get_or_build(name, key, build, {"encoder": vision.spec, "data_config": data_config,
                                                 "images": len(paths), "first": paths[:3]})


# --------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------
def text_preprocessing(text: TextEncoder, max_length: int) -> dict[str, Any]:
    """What decides the token ids and states besides the weights: tokenizer, length, causality."""
    tokenizer = text.tokenizer
    vocab = tokenizer.get_vocab()
    vocab_digest = fingerprint_texts(f"{token}\t{index}" for token, index in sorted(vocab.items()))
    return {
        "tokenizer": type(tokenizer).__name__,
        "vocab": vocab_digest,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", tokenizer.init_kwargs.get("do_lower_case", False))),
        "max_length": int(max_length),
        "causal": bool(text.causal),
        "dtype": np.dtype(FEATURE_DTYPE).name,
    }


def text_features(
    cache: FeatureCache,
    text: TextEncoder,
    texts: Sequence[str],
    *,
    max_length: int = 32,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> CacheEntry:
    """Token ids, mask and states of every string in ``texts`` (in that order), cached.

    Args:
        cache: where to look and store.
        text: the frozen text encoder (bidirectional or causal).
        texts: distinct strings; row ``i`` of the result is ``texts[i]``.
        max_length: tokens kept per text ([CLS] and [SEP] included).
        batch_size: texts per encoder call.
        device: where the encoder runs.
        progress: show a progress bar.
    Returns:
        an entry with ``input_ids`` (U, T) int32, ``mask`` (U, T) bool and
        ``states`` (U, T, Dt) float16, padded to the longest text T.
    """
    texts = list(texts)
    if len(set(texts)) != len(texts):
        raise ValueError("text_features expects distinct texts (each is encoded once)")
    preprocessing = text_preprocessing(text, max_length)
    key = cache_key({"weights": fingerprint_module(text), "spec": text.spec,
                     "config": text.model.config.to_json_string(use_diff=False)},
                    preprocessing, fingerprint_texts(texts))
    name = f"text-{_slug(text.spec)}{'-causal' if text.causal else ''}"

    def build(write) -> dict[str, Any]:
        batch = text.tokenize(texts, max_length=max_length) if texts else None
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # (U, T)
        lengths = mask.sum(dim=1)  # (U,)
        order = torch.argsort(lengths, descending=True)
        states = np.zeros((len(texts), ids.shape[1], text.out_dim), dtype=FEATURE_DTYPE)
        text.to(device)
        start = time.perf_counter()
        with torch.inference_mode(), tqdm(total=len(texts), desc=f"extract {name}", unit="text",
                                          disable=not progress, leave=False) as bar:
            for begin in range(0, len(texts), batch_size):
                rows = order[begin: begin + batch_size]  # (b,)
                width = int(lengths[rows].max())
                out = text(ids[rows, :width].to(device), mask[rows, :width].to(device)).states  # (b, width, Dt)
                out = out * mask[rows, :width, None].to(out)  # padding positions stored as zeros
                states[rows.numpy(), :width] = out.float().cpu().numpy()
                bar.update(len(rows))
        seconds = time.perf_counter() - start
        write("input_ids", ids.numpy().astype(np.int32))
        write("mask", mask.numpy())
        write("states", states)
        return {"texts": len(texts), "max_tokens": int(ids.shape[1]),
                "texts_per_second": round(len(texts) / max(seconds, 1e-9), 2)}

    return cache.get_or_build(name, key, build, {"encoder": text.spec, "preprocessing": preprocessing,
                                                 "texts": len(texts), "first": texts[:3]})


def _slug(spec: dict[str, Any]) -> str:
    name = str(spec.get("preset") or spec.get("name") or "encoder")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
