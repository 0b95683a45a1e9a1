"""Iterable image-text sources: shards read front to back, split over processes and DataLoader workers.

The map-style loaders (``caption_data``, ``image_text_jsonl``) keep every row's image path in a
``datasets.Dataset``. Sources of millions of pairs -- webdataset shards, ``datasets`` in
streaming mode -- are read instead, by an :class:`ImageTextStream` (a
``torch.utils.data.IterableDataset``), in six steps:

1. **Shards.** A source is a list of shards (tar files, dataset shards). A :class:`Shard`
   yields :class:`RawSample` s (an undecoded image with its captions) and :class:`BadSample` s
   (a member without an image or a caption, named by its shard and key).
2. **Splitting.** The readers of a pass are the global workers ``r = rank * W + worker``
   (``P`` processes times ``W`` DataLoader workers, ``R = P * W`` readers). With at least ``R``
   shards, reader ``r`` reads shards ``r, r + R, ...`` of the pass's shard order; with fewer,
   every reader reads every shard and keeps samples ``r, r + R, ...``. Either way each sample
   of a pass is read by exactly one reader.
3. **Mixing.** Samples of several sources are interleaved: the next one comes from a source
   drawn with probability proportional to its weight, among the sources not yet exhausted.
4. **Shuffling** (``shuffle=True``). The shard order of each pass is a permutation drawn from
   ``(seed, source, pass)``; samples then go through a buffer of ``shuffle_buffer`` samples
   from which each output is drawn uniformly (``(seed, pass, reader)`` seeds it). A reader's
   samples depend on its index ``r`` and on ``R`` only, not on how ``R`` splits into
   processes and workers: the same seed and ``R`` give the same samples, run after run (the
   training loop's ``StreamBatches`` builds each step's batch from every reader alike).
5. **Decoding.** A sample's image is decoded when it leaves the buffer (the buffer holds
   bytes), converted to RGB and given to the transform (``pixel_values``). An image that does
   not decode is skipped and counted with the bad members; each pass's first few are named
   in a warning; more than ``max_bad_fraction`` of the samples read bad is a
   :class:`DataError` (checked once ``MIN_SAMPLES_CHECKED`` samples were read, and at the end).
   A repeated stream (step 6) warns in its first passes only; it keeps counting and checking.
6. **Passes.** ``repeat=False``: one pass, an epoch (``set_epoch(e)`` chooses pass ``e``'s
   order). ``repeat=True``: pass after pass without end (training by ``max_steps``); each
   source starts its next pass when it runs out, so the weights are the proportions of
   samples. In one pass every sample is read once and the weights only set the interleaving.

Items are image rows (``image_id``, ``captions``, ``caption_ids``) or, from :meth:`ImageTextStream.pairs`,
one item per caption (``image_id``, ``caption``, ``caption_id``), with ``key`` and ``shard``
naming the sample, and ``pixel_values`` (3, H, W) with a transform, else ``image`` (a PIL image).
:class:`StreamData` holds the splits with the methods a caption task asks of its data.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset

from .checks import SHOW_FIRST, SHOW_FILES, DataError
from .common import IMAGE_ERRORS, SplitsByName, Tokenize, open_image

#: Samples a reader must have read before the bad fraction is checked (it is always checked at the end).
MIN_SAMPLES_CHECKED: int = 100


# --------------------------------------------------------------------------------------
# Samples and shards
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawSample:
    """One image and its captions as a shard stores them (not decoded).

    Attributes:
        shard: the shard's name (a tar file's path, ``<dataset>/<split>#<k>``).
        key: the sample's key in its shard (webdataset's ``__key__``, a row number).
        image: encoded image bytes, a PIL image, or the path of an image file.
        captions: the sample's captions (at least one).
    """

    shard: str
    key: str
    image: bytes | Image.Image | str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class BadSample:
    """A sample a shard could not give (no image, no caption, unreadable metadata): ``problem`` says why."""

    shard: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.shard}, {self.key}: {self.problem}"


class Shard(Protocol):
    """What a stream reads: a named, re-readable sequence of samples."""

    name: str

    def read(self) -> Iterator[RawSample | BadSample]:
        """The shard's samples in their stored order."""
        ...


@dataclass(frozen=True)
class StreamSource:
    """One source of a stream: its shards and its mixing weight.

    Attributes:
        name: for messages and seeds (a shard pattern, a dataset name).
        shards: the shards in their natural order.
        weight: relative share of samples when sources are mixed (> 0).
    """

    name: str
    shards: tuple[Shard, ...]
    weight: float = 1.0


def derive_seed(*parts: int | str) -> int:
    """A 63-bit integer from its parts, the same on every machine and run.

    Seeds (``(seed, "buffer", epoch, reader)``) and the image ids of streamed samples
    (``(shard, key)``); pretraining seeds its per-row generators with it too.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def decode_image(image: bytes | Image.Image | str, *, shard: str, key: str) -> Image.Image:
    """The sample's image decoded as RGB; a :class:`DataError` naming shard and key when it cannot be."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str):
        return open_image(image, entry=f"{shard}, {key}")
    try:
        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")  # convert() forces the decode, so truncation shows here
    except IMAGE_ERRORS as exc:
        raise DataError(f"cannot decode image ({type(exc).__name__}: {exc})", file=shard, entry=key,
                        expected="a valid JPEG/PNG/WebP image") from exc


# --------------------------------------------------------------------------------------
# Counting bad samples
# --------------------------------------------------------------------------------------
@dataclass
class StreamStats:
    """What one reader of a stream read: samples, bad ones and the first few of them by name.

    Two kinds of bad samples: ``bad_members`` (no image or no caption, unreadable metadata, an
    unreadable shard) and ``bad_images`` (an image that does not decode). Read the stats after
    iterating a stream in the main process (``num_workers=0``), as ``fusionzoo data check`` does;
    DataLoader workers keep their own copies.
    """

    samples: int = 0
    bad_members: int = 0
    bad_images: int = 0
    member_examples: list[str] = field(default_factory=list)
    image_examples: list[str] = field(default_factory=list)
    _unreported: list[str] = field(default_factory=list, repr=False)
    _unreported_count: int = field(default=0, repr=False)

    @property
    def bad(self) -> int:
        return self.bad_members + self.bad_images

    def add_bad(self, what: str, *, image: bool = False) -> None:
        """Count one bad sample (``image``: its image did not decode) and keep its name among the first ones."""
        if image:
            self.bad_images += 1
            examples = self.image_examples
        else:
            self.bad_members += 1
            examples = self.member_examples
        if len(examples) < SHOW_FILES:
            examples.append(what)
        self._unreported_count += 1
        if len(self._unreported) < SHOW_FIRST:
            self._unreported.append(what)

    def warn(self, split: str) -> None:
        """One warning naming the bad samples found since the last one (none when there were none)."""
        if self._unreported_count:
            warnings.warn(f"split {split!r}: skipped {self._unreported_count} bad samples ({self.bad} of "
                          f"{self.samples} read so far); first: {'; '.join(self._unreported)}", stacklevel=2)
        self._unreported, self._unreported_count = [], 0

    def check(self, split: str, max_bad_fraction: float, *, final: bool) -> None:
        """A :class:`DataError` when more than ``max_bad_fraction`` of the samples read are bad."""
        if not self.bad or (not final and self.samples < MIN_SAMPLES_CHECKED):
            return
        if self.bad > max_bad_fraction * self.samples:
            first = (self.member_examples + self.image_examples)[:SHOW_FIRST]
            raise DataError(
                f"{self.bad} of {self.samples} samples read from split {split!r} are bad, more than "
                f"max_bad_fraction={max_bad_fraction}; first: {'; '.join(first)}",
                expected="images that decode, each with a caption",
                hint="Fix or rewrite the shards, or raise data_kwargs.max_bad_fraction",
            )


# --------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamOptions:
    """How an :class:`ImageTextStream` reads (see the module docstring).

    Attributes:
        shuffle: shuffle the shard order of each pass and the samples (through the buffer).
        shuffle_buffer: samples held for shuffling (1: shard order only).
        seed: seeds the shard orders, the buffer and the mixing draws.
        repeat: pass after pass without end (True), or one pass (False).
        max_bad_fraction: more bad samples than this fraction of those read is an error.
        pairs: one item per caption instead of one per image.
        rank, world_size: this process among the readers; None: from ``torch.distributed``
            when it is initialised, else one process.
    """

    shuffle: bool = False
    shuffle_buffer: int = 1000
    seed: int = 0
    repeat: bool = False
    max_bad_fraction: float = 0.1
    pairs: bool = False
    rank: int | None = None
    world_size: int | None = None


_PASS_END = object()  # marks the end of one source's pass in the raw sample stream


class ImageTextStream(IterableDataset):
    """Image-text samples of one split, read from shards (see the module docstring).

    Args:
        sources: the split's sources (one, or several mixed by weight).
        split: the split's name, for messages.
        options: how to read (:class:`StreamOptions`).
        transform: ``PIL.Image -> Tensor (3, H, W)``; None leaves the decoded image under ``image``.
        epoch: the first pass's number (``set_epoch``).
    """

    def __init__(self, sources: Sequence[StreamSource], *, split: str, options: StreamOptions = StreamOptions(),
                 transform: Callable[[Image.Image], Tensor] | None = None, epoch: int = 0) -> None:
        if not sources:
            raise DataError(f"split {split!r} has no sources", expected="at least one source of shards")
        for source in sources:
            if not source.shards:
                raise DataError(f"source {source.name!r} of split {split!r} has no shards", expected="shard files")
            if not source.weight > 0:
                raise DataError(f"source {source.name!r} has weight {source.weight}", expected="a weight > 0")
        if options.shuffle_buffer < 1:
            raise DataError(f"shuffle_buffer={options.shuffle_buffer}", expected="a buffer of at least 1 sample")
        if not 0.0 <= options.max_bad_fraction <= 1.0:
            raise DataError(f"max_bad_fraction={options.max_bad_fraction}", expected="a fraction in [0, 1]")
        self.sources = tuple(sources)
        self.split = split
        self.options = options
        self.transform = transform
        self.epoch = epoch
        self.stats = StreamStats()

    # -- copies with other settings ---------------------------------------------------
    def with_options(self, **changes: Any) -> "ImageTextStream":
        """A copy reading with ``changes`` to its :class:`StreamOptions` (``shuffle=True``, ``seed=3`` ...)."""
        return ImageTextStream(self.sources, split=self.split, options=replace(self.options, **changes),
                               transform=self.transform, epoch=self.epoch)

    def with_transform(self, transform: Callable[[Image.Image], Tensor] | None) -> "ImageTextStream":
        """A copy whose items carry ``pixel_values`` = ``transform(image)`` instead of the PIL ``image``."""
        return ImageTextStream(self.sources, split=self.split, options=self.options, transform=transform,
                               epoch=self.epoch)

    def pairs(self) -> "ImageTextStream":
        """A copy that gives one item per caption (``caption``, ``caption_id``)."""
        return self.with_options(pairs=True)

    def for_process(self, rank: int, world_size: int) -> "ImageTextStream":
        """A copy that reads process ``rank``'s share of ``world_size`` processes."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        return self.with_options(rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Read pass ``epoch`` next (its shard order and buffer draws); DataLoader and Accelerate call it."""
        self.epoch = epoch

    @property
    def num_shards(self) -> int:
        return sum(len(source.shards) for source in self.sources)

    def __repr__(self) -> str:
        names = ", ".join(f"{s.name} ({len(s.shards)} shards, weight {s.weight:g})" for s in self.sources)
        return f"ImageTextStream(split={self.split!r}, sources=[{names}], {self.options})"

    # -- reading -------------------------------------------------------------------------
    def reader(self) -> tuple[int, int]:
        """``(this reader's index, number of readers)`` over processes and DataLoader workers."""
        rank, world = self.options.rank, self.options.world_size
        if rank is None or world is None:
            rank, world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _one_pass(self, source: StreamSource, number: int, reader: int, readers: int) -> Iterator[Any]:
        """This reader's samples of pass ``number`` of ``source`` (see "Splitting")."""
        shards = list(source.shards)
        if self.options.shuffle:
            random.Random(derive_seed(self.options.seed, "shards", source.name, number)).shuffle(shards)
        if len(shards) >= readers:
            for shard in shards[reader::readers]:
                yield from shard.read()
            return
        position = 0
        for shard in shards:
            for sample in shard.read():
                if position % readers == reader:
                    yield sample
                position += 1

    def _passes(self, source: StreamSource, reader: int, readers: int) -> Iterator[Any]:
        """Pass after pass of ``source`` (one without ``repeat``), each followed by ``_PASS_END``."""
        number = self.epoch
        while True:
            good = 0
            for sample in self._one_pass(source, number, reader, readers):
                good += isinstance(sample, RawSample)
                yield sample
            yield _PASS_END
            if not self.options.repeat:
                return
            if good == 0:
                raise DataError(f"source {source.name!r} gave reader {reader} of {readers} no usable sample in "
                                f"pass {number}", expected="shards with images and captions")
            number += 1

    def _mixed(self, reader: int, readers: int) -> Iterator[Any]:
        """Samples of every source, interleaved by weight (see "Mixing")."""
        streams = [self._passes(source, reader, readers) for source in self.sources]
        weights = [source.weight for source in self.sources]
        active = list(range(len(streams)))
        rng = random.Random(derive_seed(self.options.seed, "mix", self.epoch, reader))
        while active:
            pick = active[0] if len(active) == 1 else rng.choices(active, weights=[weights[i] for i in active])[0]
            try:
                yield next(streams[pick])
            except StopIteration:
                active.remove(pick)

    def _expanded(self, raw: Iterable[Any], stats: StreamStats) -> Iterator[tuple[RawSample, int | None]]:
        """``(sample, caption index)`` per caption in pair mode, ``(sample, None)`` per image otherwise."""
        passes = 0
        for sample in raw:
            if sample is _PASS_END:
                passes += 1
                if not self.options.repeat or passes <= 2 * len(self.sources):  # a repeated stream warns early only
                    stats.warn(self.split)
                stats.check(self.split, self.options.max_bad_fraction, final=False)
                continue
            stats.samples += 1
            if isinstance(sample, BadSample):
                stats.add_bad(str(sample))
                stats.check(self.split, self.options.max_bad_fraction, final=False)
                continue
            if self.options.pairs:
                for k in range(len(sample.captions)):
                    yield sample, k
            else:
                yield sample, None

    def _shuffled(self, items: Iterator[Any], reader: int) -> Iterator[Any]:
        """Items through a buffer of ``shuffle_buffer``; each output drawn uniformly from it."""
        size = self.options.shuffle_buffer
        if not self.options.shuffle or size <= 1:
            yield from items
            return
        rng = random.Random(derive_seed(self.options.seed, "buffer", self.epoch, reader))
        buffer: list[Any] = []
        for item in items:
            if len(buffer) < size:
                buffer.append(item)
                continue
            k = rng.randrange(size)
            yield buffer[k]
            buffer[k] = item
        rng.shuffle(buffer)
        yield from buffer

    def _item(self, sample: RawSample, caption: int | None, image: Image.Image) -> dict[str, Any]:
        image_id = derive_seed(sample.shard, sample.key)
        item: dict[str, Any] = {"image_id": image_id, "key": sample.key, "shard": sample.shard}
        if caption is None:
            item["captions"] = list(sample.captions)
            item["caption_ids"] = [derive_seed(sample.shard, sample.key, k) for k in range(len(sample.captions))]
        else:
            item["caption"] = sample.captions[caption]
            item["caption_id"] = derive_seed(sample.shard, sample.key, caption)
        if self.transform is None:
            item["image"] = image
        else:
            item["pixel_values"] = self.transform(image)  # (3, H, W)
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self.reader()
        stats = self.stats = StreamStats()
        items = self._shuffled(self._expanded(self._mixed(reader, readers), stats), reader)
        decoded: tuple[str, str, Image.Image | None] = ("", "", None)  # consecutive pairs of an image: one decode
        failed: set[tuple[str, str]] = set()  # images that did not decode, counted once whatever their captions
        for sample, caption in items:
            name = (sample.shard, sample.key)
            if name in failed:
                continue
            if decoded[:2] != name:
                try:
                    decoded = (*name, decode_image(sample.image, shard=sample.shard, key=sample.key))
                except DataError as error:
                    failed.add(name)
                    stats.add_bad(str(error), image=True)
                    stats.check(self.split, self.options.max_bad_fraction, final=False)
                    continue
            yield self._item(sample, caption, decoded[2])
        stats.warn(self.split)
        stats.check(self.split, self.options.max_bad_fraction, final=True)

    def raw(self) -> Iterator[RawSample]:
        """This reader's samples in one pass, neither decoded nor shuffled (bad members left out)."""
        reader, readers = self.reader()
        plain = self.with_options(repeat=False, shuffle=False)
        for sample in plain._mixed(reader, readers):
            if isinstance(sample, RawSample):
                yield sample


# --------------------------------------------------------------------------------------
# The loaded splits
# --------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class StreamData(SplitsByName):
    """Streamed caption splits, with what the caption tasks ask of their data.

    Answers like :class:`~fusionzoo.data.captions.CaptionData` where it can: ``data[split]``
    (one item per image), :meth:`pairs` (one per caption), :meth:`references`,
    :meth:`with_image_transform` and :meth:`collator`. It has no length and no random access:
    a trainer reads it with ``max_steps`` (see :attr:`iterable`).

    Attributes:
        name: registry name of the loader.
        splits: split name -> its stream (one item per image).
        image_root: the folder of the shards (for messages).
    """

    name: str
    splits: dict[str, ImageTextStream]
    image_root: Path | None = None
    task: str = "captioning"
    metric: str = "cider"
    id_key: str = "image_id"
    #: Streamed data: no ``len``, no random access; training needs ``max_steps``.
    iterable: bool = True

    def pairs(self, split: str) -> ImageTextStream:
        """One item per caption of ``split``."""
        return self[split].pairs()

    def references(self, split: str) -> dict[int, list[str]]:
        """``image_id -> captions`` of ``split``, read once without decoding an image (for caption metrics)."""
        whole = self[split].with_options(rank=0, world_size=1)  # every process needs every reference
        return {derive_seed(s.shard, s.key): list(s.captions) for s in whole.raw()}

    def with_options(self, **changes: Any) -> "StreamData":
        """A copy whose every split reads with ``changes`` (see :class:`StreamOptions`)."""
        return replace(self, splits={k: s.with_options(**changes) for k, s in self.splits.items()})

    def with_image_transform(
        self,
        transform: Callable[[Image.Image], Tensor],
        train_transform: Callable[[Image.Image], Tensor] | None = None,
        train_splits: Sequence[str] = ("train",),
        skip_bad: bool = False,
    ) -> "StreamData":
        """A copy whose items carry ``pixel_values`` (3, H, W); undecodable images are always skipped and counted."""
        splits = {}
        for split, stream in self.splits.items():
            chosen = train_transform if (train_transform is not None and split in train_splits) else transform
            splits[split] = stream.with_transform(chosen)
        return replace(self, splits=splits)

    def collator(self, tokenize: Tokenize, max_length: int = 32) -> Any:
        """The caption batch function (:class:`~fusionzoo.data.captions.CaptionCollator`)."""
        from .captions import CaptionCollator

        return CaptionCollator(tokenize, max_length)

    def describe(self) -> str:
        parts = "; ".join(f"{split}: {stream.num_shards} shards" for split, stream in self.splits.items())
        return f"{self.name} ({self.task}, streamed): {parts}"
