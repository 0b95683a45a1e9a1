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

With ``tail=n`` (``--train-encoders n``, :mod:`fusionzoo.bench.tails`) both store instead what
the frozen part of the encoder computes: the inputs of its last ``n`` blocks
(:meth:`VisionEncoder.tail_inputs`, :meth:`TextEncoder.tail_inputs`), as the array
``tail_inputs``, under a key and a name of their own (``output: tail-inputs-<n>``), so they
never meet the final outputs of the same encoder.

After the cache, :func:`pool_image_tokens` and :func:`add_position_channels` give the image
tokens the fusions are fed.
"""

from __future__ import annotations

import math
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
from .loop import as_tensor
from .suites import BenchError

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
    tail: int | None = None,
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
        tail: None, or ``n``: the inputs of the encoder's last ``n`` blocks instead
            (:meth:`VisionEncoder.tail_inputs`; not with ``stage``).
    Returns:
        an entry with ``tokens`` (U, N, Di) float16; with ``tail``, ``tail_inputs`` (U, ...)
        float16 (EfficientNet: feature maps (U, C, h, w); ViT: tokens (U, N, D)).
    """
    paths = list(paths)
    if len(set(paths)) != len(paths):
        raise ValueError("image_features expects distinct paths (one row per image file)")
    if stage is not None and tail is not None:
        raise ValueError("image_features takes a stage or a tail, not both")
    output = "tokens"  # the encoder's output stored, part of the key
    if stage is not None:
        output = f"stage-{stage}"
    if tail is not None:
        output = f"tail-inputs-{tail}"
    preprocessing = {"data_config": data_config, "dtype": np.dtype(FEATURE_DTYPE).name, "output": output}
    key = cache_key({"weights": fingerprint_module(vision), "spec": vision.spec, "class": type(vision.model).__name__},
                    preprocessing, fingerprint_files(paths))
    name = (f"image-{_slug(vision.spec)}-{data_config['input_size'][-1]}px"
            + ("" if stage is None else f"-stage{stage}") + ("" if tail is None else f"-tail{tail}-inputs"))
    array = "tokens" if tail is None else "tail_inputs"

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
                if tail is not None:
                    tokens = model.tail_inputs(pixels, tail)  # (B, C, h, w) or (B, N, D)
                elif stage is not None:
                    tokens = model.stage_tokens(pixels, stage)  # (B, h*w, C_stage)
                else:
                    tokens = model(pixels).tokens  # (B, N, Di)
                if out is None:
                    out = np.empty((len(paths), *tokens.shape[1:]), dtype=FEATURE_DTYPE)
                out[row: row + len(tokens)] = tokens.float().cpu().numpy()
                row += len(tokens)
                bar.update(len(tokens))
        vision.to(memory_format=torch.contiguous_format)
        seconds = time.perf_counter() - start
        write(array, out)
        shape = {"shape": list(out.shape[1:])} if tail is not None else {"tokens_per_image": int(out.shape[1]),
                                                                         "width": int(out.shape[2])}
        return {"images": len(paths), **shape, "images_per_second": round(len(paths) / max(seconds, 1e-9), 2)}

    return cache.get_or_build(name, key, build, {"encoder": vision.spec, "data_config": data_config, "output": output,
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
    tail: int | None = None,
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
        tail: None, or ``n``: the hidden states entering the encoder's last ``n`` layers
            instead (:meth:`TextEncoder.tail_inputs`).
    Returns:
        an entry with ``input_ids`` (U, T) int32, ``mask`` (U, T) bool and
        ``states`` (U, T, Dt) float16 (with ``tail``: ``tail_inputs`` (U, T, Dt) float16),
        padded to the longest text T.
    """
    texts = list(texts)
    if len(set(texts)) != len(texts):
        raise ValueError("text_features expects distinct texts (each is encoded once)")
    preprocessing = text_preprocessing(text, max_length)
    if tail is not None:
        preprocessing["output"] = f"tail-inputs-{tail}"  # only then: the keys of final states stay as they were
    key = cache_key({"weights": fingerprint_module(text), "spec": text.spec,
                     "config": text.model.config.to_json_string(use_diff=False)},
                    preprocessing, fingerprint_texts(texts))
    name = f"text-{_slug(text.spec)}{'-causal' if text.causal else ''}{'' if tail is None else f'-tail{tail}-inputs'}"
    array = "states" if tail is None else "tail_inputs"

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
                batch_ids, batch_mask = ids[rows, :width].to(device), mask[rows, :width].to(device)
                if tail is None:
                    out = text(batch_ids, batch_mask).states  # (b, width, Dt)
                else:
                    out = text.tail_inputs(batch_ids, batch_mask, tail)  # (b, width, Dt)
                out = out * mask[rows, :width, None].to(out)  # padding positions stored as zeros
                states[rows.numpy(), :width] = out.float().cpu().numpy()
                bar.update(len(rows))
        seconds = time.perf_counter() - start
        write("input_ids", ids.numpy().astype(np.int32))
        write("mask", mask.numpy())
        write(array, states)
        return {"texts": len(texts), "max_tokens": int(ids.shape[1]),
                "texts_per_second": round(len(texts) / max(seconds, 1e-9), 2)}

    return cache.get_or_build(name, key, build, {"encoder": text.spec, "preprocessing": preprocessing,
                                                 "texts": len(texts), "first": texts[:3]})


# --------------------------------------------------------------------------------------
# After the cache: pooling and position channels
# --------------------------------------------------------------------------------------
def pool_image_tokens(tokens: np.ndarray | torch.Tensor, grid: int | None, chunk: int = 1024) -> torch.Tensor:
    """Average-pool square token grids (U, h*w, D) to (U, grid*grid, D), in the input's dtype.

    The cache keeps every token of the encoder's feature map; a run that wants
    fewer (easy-VQA's shapes fill the image, so where a colour sits does not
    matter) pools them once here, in memory. Pooling is the CNN's own global
    average pool done per region: ``grid=1`` gives its pooled vector as one token.

    With ``--train-encoders`` the same pooling runs inside the model, after the trained tail
    of the image encoder (:class:`~fusionzoo.bench.tails.EncoderTailsModel`): the result is on
    the device of ``tokens`` and carries gradients back to them.

    Args:
        tokens: image tokens, row-major over an h x h grid (the vision encoder's layout).
        grid: output side; None or 0, or a grid not smaller than h, returns the tokens unchanged.
        chunk: images pooled per step (bounds the float32 temporary).
    """
    tokens = as_tensor(tokens) if isinstance(tokens, np.ndarray) else tokens
    count, side = tokens.shape[1], math.isqrt(tokens.shape[1])
    if not grid or grid >= side:
        return tokens
    if side * side != count:
        raise BenchError(f"cannot pool {count} image tokens to a {grid}x{grid} grid: they are not a square grid "
                         "(a ViT with prefix tokens?); use --image-grid 0")
    out = torch.empty(tokens.shape[0], grid * grid, tokens.shape[2], dtype=tokens.dtype, device=tokens.device)
    for begin in range(0, tokens.shape[0], chunk):
        block = tokens[begin: begin + chunk].float()  # (u, h*w, D)
        block = block.transpose(1, 2).reshape(len(block), -1, side, side)  # (u, D, h, w)
        pooled = torch.nn.functional.adaptive_avg_pool2d(block, grid)  # (u, D, g, g)
        out[begin: begin + chunk] = pooled.flatten(2).transpose(1, 2).to(tokens.dtype)  # (u, g*g, D)
    return out


def add_position_channels(tokens: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Append fixed 2-D position channels to square token grids: (U, g*g, D) -> (U, g*g, D + 4F).

    A token at column ``i`` and row ``j`` of a ``g`` x ``g`` grid has centre
    ``x = (i + 0.5) / g`` and ``y = (j + 0.5) / g`` in [0, 1]; it gets
    ``sin(2^k pi x), cos(2^k pi x), sin(2^k pi y), cos(2^k pi y)`` for
    ``k = 0 .. F-1`` (Transformer-style sinusoids over the image, lowest frequency a
    half period across it). The lowest pair already orders tokens left to right
    (``cos(pi x)`` falls monotonically) and the dot product of two tokens' channels is
    ``sum_k cos(2^k pi dx) + cos(2^k pi dy)``, a function of their offset alone: what
    "left of", "closest to" and "furthest from" need. The same channels for every
    fusion, so a fusion without position embeddings of its own (co-attention, ALBEF,
    early concatenation) is fed the grid as well as one that has them (the merged
    Transformer). ``frequencies=0`` returns ``tokens`` unchanged.
    """
    if frequencies <= 0:
        return tokens
    count = tokens.shape[1]
    side = math.isqrt(count)
    if side * side != count:
        raise BenchError(f"cannot add 2-D positions to {count} image tokens: they are not a square grid")
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side  # (g,)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (g, g): row j, column i
    angles = (2.0 ** torch.arange(frequencies, dtype=torch.float64)) * math.pi  # (F,)
    ax, ay = x.reshape(-1, 1) * angles, y.reshape(-1, 1) * angles  # (g*g, F)
    channels = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).to(tokens.device, tokens.dtype)  # (g*g, 4F)
    return torch.cat([tokens, channels.expand(tokens.shape[0], -1, -1)], dim=2)



def _slug(spec: dict[str, Any]) -> str:
    name = str(spec.get("preset") or spec.get("name") or "encoder")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
