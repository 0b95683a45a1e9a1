"""Frozen-encoder features for the cache: image tokens per distinct image, text states per distinct text.

Both functions go through :class:`~fusionzoo.features.cache.FeatureCache`: the first
run extracts and stores, later runs memory-map what is stored. Each extraction is a
:class:`~fusionzoo.features.build.RowBuilder`, so it shows a progress bar, resumes
where an interrupted one stopped and, with a cache given the run's processes, is
shared out between them.

* :func:`image_features` -- ``VisionEncoder(pixels).tokens`` (U, N, Di) for U
  distinct image files, preprocessed with the given timm data config (the
  benchmark uses the encoder's own mean/std and interpolation at a chosen size,
  without a centre crop; training uses the encoder's evaluation preprocessing as it
  is, :func:`image_preprocessing` with ``image_size=None, crop=True``). Decoding runs
  in DataLoader workers while the encoder runs in the main process, channels-last
  (the memory layout PyTorch's CPU kernels for EfficientNet's depthwise convolutions
  are fastest in).
* :func:`text_features` -- token ids, mask and ``TextEncoder`` states
  (U, T, Dt) for U distinct strings, so a question asked of 1,000 images is
  encoded once. Within a block, texts are sorted by length before batching (little
  padding). A causal encoder's states of a caption depend only on that caption's own
  prefix, so they are the states teacher forcing needs and can be cached the
  same way; generation still runs the text encoder live.

With ``tail=n`` (``fusionzoo bench --train-encoders n``) both store instead what the frozen
part of the encoder computes: the inputs of its last ``n`` blocks
(:meth:`VisionEncoder.tail_inputs`, :meth:`TextEncoder.tail_inputs`), as the array
``tail_inputs``, under a key and a name of their own (``output: tail-inputs-<n>``), so they
never meet the final outputs of the same encoder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..encoders import TextEncoder, VisionEncoder
from ..data.checks import DataError
from ..data.common import open_image
from .build import Block, Layout, RowBuilder
from .cache import FeatureCache
from .keys import cache_key, fingerprint_files, fingerprint_module, fingerprint_texts
from .layout import CacheEntry

#: Stored dtype of feature arrays (see :mod:`fusionzoo.features.cache` for why half precision).
FEATURE_DTYPE = np.float16


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ImageFiles(Dataset):
    """Decodes image files with a transform: index -> (index, (3, H, W) tensor or None, why not or None)."""

    paths: Sequence[str]
    transform: Any
    skip_bad: bool = False
    opener: Any = None  # opens references that are not files (see image_features' ``images``)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        try:
            image = (self.opener or open_image)(self.paths[index], entry=f"image #{index}")
        except DataError as error:
            if not self.skip_bad:
                raise DataError(error.problem, file=error.file, entry=error.entry, expected=error.expected,
                                hint="Pass skip_bad=true to leave out unreadable images") from error
            return index, None, str(error)
        return index, self.transform(image), None  # (3, H, W)


def _collate_images(items: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], Tensor | None,
                                                                                 dict[int, str]]:
    """(rows of the decoded images, their pixels (b, 3, H, W) or None, {row: why} of those that did not decode)."""
    good = [(row, pixels) for row, pixels, _ in items if pixels is not None]
    bad = {row: why for row, pixels, why in items if pixels is None}
    return [row for row, _ in good], (torch.stack([p for _, p in good]) if good else None), bad


def image_preprocessing(vision: VisionEncoder, image_size: int | None, crop: bool = False) -> dict[str, Any]:
    """The encoder's data config at ``image_size`` (None = its own), with or without its centre crop."""
    config = dict(vision.data_config)
    if image_size is not None:
        config["input_size"] = (int(config["input_size"][0]), int(image_size), int(image_size))
    if not crop:
        config["crop_pct"] = 1.0  # resize the whole image to the input size; nothing cut off
    return config


class _ImageBlocks(RowBuilder):
    """The image tokens (or stage maps, or tail inputs) of ``paths``, a block of images at a time."""

    def __init__(self, vision: VisionEncoder, paths: list[str], data_config: dict[str, Any], *, name: str,
                 array: str, stage: int | None, tail: int | None, batch_size: int, device: torch.device | str,
                 workers: int | None, progress: bool, skip_bad: bool, block_rows: int, opener: Any = None) -> None:
        self.vision, self.paths, self.data_config, self.opener = vision, paths, data_config, opener
        self.name, self.array, self.stage, self.tail = name, array, stage, tail
        self.batch_size, self.device, self.progress, self.skip_bad = batch_size, device, progress, skip_bad
        self.workers = workers if workers is not None else (1 if (os.cpu_count() or 1) > 1 else 0)
        self.rows, self.block_rows = len(paths), max(1, block_rows)
        self.seconds, self.computed = 0.0, 0
        self._shape: tuple[int, ...] | None = None

    def _encode(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        if self.tail is not None:
            return self.vision.tail_inputs(pixels, self.tail)  # (B, C, h, w) or (B, N, D)
        if self.stage is not None:
            return self.vision.stage_tokens(pixels, self.stage)  # (B, h*w, C_stage)
        return self.vision(pixels).tokens  # (B, N, Di)

    def _row_shape(self) -> tuple[int, ...]:
        """The shape of one image's output, from one blank image of the input size."""
        if self._shape is None:
            self.vision.to(device=self.device, memory_format=torch.channels_last)
            try:
                with torch.inference_mode():
                    probe = torch.zeros(1, *(int(s) for s in self.data_config["input_size"]))  # (1, 3, H, W)
                    self._shape = tuple(self._encode(probe).shape[1:])
            finally:
                self.vision.to(memory_format=torch.contiguous_format)
        return self._shape

    def layout(self) -> Layout:
        return {self.array: ((self.rows, *self._row_shape()), np.dtype(FEATURE_DTYPE).name)}

    def compute(self, blocks: Sequence[tuple[int, int]], show_progress: bool) -> Iterator[Block]:
        saved_config = self.vision.data_config
        self.vision.data_config = self.data_config
        transform = self.vision.transform(train=False)
        self.vision.data_config = saved_config
        batches = [list(range(begin, min(begin + self.batch_size, stop)))
                   for start, stop in blocks for begin in range(start, stop, self.batch_size)]
        # Its own generator: iterating a loader otherwise draws a seed from the global RNG, and a run that
        # extracts would then draw other dropout masks than one that finds its features in the cache.
        loader = DataLoader(_ImageFiles(self.paths, transform, self.skip_bad, self.opener), batch_sampler=batches,
                            num_workers=self.workers, collate_fn=_collate_images, generator=torch.Generator())
        batch_iter = iter(loader)
        self.vision.to(device=self.device, memory_format=torch.channels_last)
        started = time.perf_counter()
        try:
            with torch.inference_mode(), tqdm(total=sum(stop - start for start, stop in blocks), unit="img",
                                              desc=f"extract {self.name}", leave=False,
                                              disable=not (self.progress and show_progress)) as bar:
                for start, stop in blocks:
                    out: np.ndarray | None = None
                    bad: dict[int, str] = {}
                    for _ in range(math.ceil((stop - start) / self.batch_size)):
                        rows, pixels, batch_bad = next(batch_iter)
                        bad.update(batch_bad)
                        if pixels is not None:
                            tokens = self._encode(pixels).float().cpu().numpy()  # (b, ...)
                            self._shape = self._shape or tuple(tokens.shape[1:])
                            if out is None:
                                out = np.zeros((stop - start, *self._shape), dtype=FEATURE_DTYPE)
                            out[np.asarray(rows) - start] = tokens
                        bar.update(len(rows) + len(batch_bad))
                    if out is None:  # every image of the block was bad: zero rows of the encoder's shape
                        out = np.zeros((stop - start, *self._row_shape()), dtype=FEATURE_DTYPE)
                    self.computed += stop - start
                    self.seconds = time.perf_counter() - started
                    yield {self.array: out}, bad
        finally:
            self.vision.to(memory_format=torch.contiguous_format)

    def info(self) -> dict[str, Any]:
        shape = self._row_shape()
        described = ({"shape": list(shape)} if self.tail is not None
                     else {"tokens_per_image": int(shape[0]), "width": int(shape[-1])})
        return {"images": self.rows, **described,
                "images_per_second": round(self.computed / max(self.seconds, 1e-9), 2)}


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
    skip_bad: bool = False,
    block_rows: int = 256,
    images: Any = None,
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
        progress: show a progress bar (on the first process of a run).
        stage: None = the encoder's last feature map (``VisionEncoder(pixels).tokens``);
            an index = that intermediate stage's map (:meth:`VisionEncoder.stage_tokens`).
        tail: None, or ``n``: the inputs of the encoder's last ``n`` blocks instead
            (:meth:`VisionEncoder.tail_inputs`; not with ``stage``).
        skip_bad: an image that does not decode leaves its row zero and is named in the
            entry's :attr:`~fusionzoo.features.layout.CacheEntry.bad_rows` instead of failing
            the extraction.
        block_rows: images per block (what an interrupted extraction may have to redo).
        images: None (``paths`` are image files), or the opener of images that are not files
            (a dataset's ``images``: ``images(path, entry=...)`` decodes one, ``images.read_bytes(path)``
            gives the bytes it is keyed by), as for images stored in a ``datasets`` table or a tar shard.
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
                    preprocessing, fingerprint_files(paths, None if images is None else images.read_bytes))
    name = (f"image-{_slug(vision.spec)}-{data_config['input_size'][-1]}px"
            + ("" if stage is None else f"-stage{stage}") + ("" if tail is None else f"-tail{tail}-inputs"))
    builder = _ImageBlocks(vision, paths, data_config, name=name, array="tokens" if tail is None else "tail_inputs",
                           stage=stage, tail=tail, batch_size=batch_size, device=device, workers=workers,
                           progress=progress, skip_bad=skip_bad, block_rows=block_rows, opener=images)
    return cache.get_or_build(name, key, builder, {"encoder": vision.spec, "data_config": data_config,
                                                   "output": output, "images": len(paths), "first": paths[:3]})


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


class _TextBlocks(RowBuilder):
    """Token ids, mask and states (or tail inputs) of ``texts``, a block of texts at a time."""

    def __init__(self, text: TextEncoder, texts: list[str], *, name: str, array: str, max_length: int,
                 tail: int | None, batch_size: int, device: torch.device | str, progress: bool,
                 block_rows: int) -> None:
        self.text, self.texts, self.name, self.array = text, texts, name, array
        self.max_length, self.tail, self.batch_size = max_length, tail, batch_size
        self.device, self.progress = device, progress
        self.rows, self.block_rows = len(texts), max(1, block_rows)
        self.seconds, self.computed = 0.0, 0
        self._tokens: tuple[Tensor, Tensor] | None = None

    def tokens(self) -> tuple[Tensor, Tensor]:
        """(U, T) token ids and bool mask of every text, padded to the longest (tokenized once)."""
        if self._tokens is None:
            batch = self.text.tokenize(self.texts, max_length=self.max_length)
            self._tokens = batch["input_ids"], batch["attention_mask"].bool()
        return self._tokens

    def layout(self) -> Layout:
        ids, _ = self.tokens()
        rows, width = ids.shape
        return {"input_ids": ((rows, width), "int32"), "mask": ((rows, width), "bool"),
                self.array: ((rows, width, self.text.out_dim), np.dtype(FEATURE_DTYPE).name)}

    def compute(self, blocks: Sequence[tuple[int, int]], show_progress: bool) -> Iterator[Block]:
        ids, mask = self.tokens()  # (U, T)
        lengths = mask.sum(dim=1)  # (U,)
        self.text.to(self.device)
        started = time.perf_counter()
        with torch.inference_mode(), tqdm(total=sum(stop - start for start, stop in blocks), unit="text",
                                          desc=f"extract {self.name}", leave=False,
                                          disable=not (self.progress and show_progress)) as bar:
            for start, stop in blocks:
                states = np.zeros((stop - start, ids.shape[1], self.text.out_dim), dtype=FEATURE_DTYPE)
                order = start + torch.argsort(lengths[start:stop], descending=True)  # (b,) long texts first
                for begin in range(0, stop - start, self.batch_size):
                    rows = order[begin: begin + self.batch_size]  # (b,)
                    width = max(1, int(lengths[rows].max()))
                    batch_ids, batch_mask = ids[rows, :width].to(self.device), mask[rows, :width].to(self.device)
                    if self.tail is None:
                        out = self.text(batch_ids, batch_mask).states  # (b, width, Dt)
                    else:
                        out = self.text.tail_inputs(batch_ids, batch_mask, self.tail)  # (b, width, Dt)
                    out = out * batch_mask[..., None].to(out)  # padding positions stored as zeros
                    states[(rows - start).numpy(), :width] = out.float().cpu().numpy()
                    bar.update(len(rows))
                self.computed += stop - start
                self.seconds = time.perf_counter() - started
                yield {"input_ids": ids[start:stop].numpy().astype(np.int32), "mask": mask[start:stop].numpy(),
                       self.array: states}, {}

    def info(self) -> dict[str, Any]:
        return {"texts": self.rows, "max_tokens": int(self.tokens()[0].shape[1]),
                "texts_per_second": round(self.computed / max(self.seconds, 1e-9), 2)}


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
    block_rows: int = 2048,
) -> CacheEntry:
    """Token ids, mask and states of every string in ``texts`` (in that order), cached.

    Args:
        cache: where to look and store.
        text: the frozen text encoder (bidirectional or causal).
        texts: distinct strings (at least one); row ``i`` of the result is ``texts[i]``.
        max_length: tokens kept per text ([CLS] and [SEP] included).
        batch_size: texts per encoder call.
        device: where the encoder runs.
        progress: show a progress bar (on the first process of a run).
        tail: None, or ``n``: the hidden states entering the encoder's last ``n`` layers
            instead (:meth:`TextEncoder.tail_inputs`).
        block_rows: texts per block (what an interrupted extraction may have to redo).
    Returns:
        an entry with ``input_ids`` (U, T) int32, ``mask`` (U, T) bool and
        ``states`` (U, T, Dt) float16 (with ``tail``: ``tail_inputs`` (U, T, Dt) float16),
        padded to the longest text T, padding positions zero.
    """
    texts = list(texts)
    if len(set(texts)) != len(texts):
        raise ValueError("text_features expects distinct texts (each is encoded once)")
    if not texts:
        raise ValueError("text_features needs at least one text")
    preprocessing = text_preprocessing(text, max_length)
    if tail is not None:
        preprocessing["output"] = f"tail-inputs-{tail}"  # only then: the keys of final states stay as they were
    key = cache_key({"weights": fingerprint_module(text), "spec": text.spec,
                     "config": text.model.config.to_json_string(use_diff=False)},
                    preprocessing, fingerprint_texts(texts))
    name = f"text-{_slug(text.spec)}{'-causal' if text.causal else ''}{'' if tail is None else f'-tail{tail}-inputs'}"
    builder = _TextBlocks(text, texts, name=name, array="states" if tail is None else "tail_inputs",
                          max_length=max_length, tail=tail, batch_size=batch_size, device=device, progress=progress,
                          block_rows=block_rows)
    return cache.get_or_build(name, key, builder, {"encoder": text.spec, "preprocessing": preprocessing,
                                                   "texts": len(texts), "first": texts[:3]})


def _slug(spec: dict[str, Any]) -> str:
    name = str(spec.get("preset") or spec.get("name") or "encoder")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
