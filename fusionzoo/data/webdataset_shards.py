"""webdataset shards: image-text samples in ``.tar`` files, streamed or indexed for random access.

The layout open_clip and LAVIS read, and ``img2dataset --output_format webdataset`` writes:
tar files of about a thousand samples, the members of a sample consecutive and sharing a
key (the member name up to the first dot of its file name): ``000012.jpg`` with
``000012.txt`` (the caption) and/or ``000012.json`` (its ``caption`` string or list, or a
``captions`` list). The image is the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp``; the
caption is the ``.txt`` member when there is one, else the ``.json`` one's; other members are
ignored.

Two forms:

* ``streaming=True`` (default): an :class:`ImageTextStream` per split. A sample without an
  image or a caption, one whose image does not decode and a key seen twice in a shard are
  skipped and counted (:mod:`fusionzoo.data.streaming`).
* ``streaming=False``: map-style :class:`~fusionzoo.data.captions.CaptionData`, what
  ``fusionzoo train`` tasks need. Every shard is read once, front to back, at load time
  (:meth:`TarShard.index`): one row per sample with all its captions, image and caption ids
  numbered in order of appearance over the splits loaded, and ``image_path`` the reference
  ``<shard path>#<key>`` (:func:`shard_reference`). :class:`ShardImages` opens a row's image
  by seeking to the member's bytes, so shards must be plain ``.tar`` files (a compressed one
  is an error) and a split's shards are the union of its patterns (weights are an error).
  Bad samples are errors naming shard and key, or skipped and counted with ``skip_bad``,
  as in the other map-style loaders (:mod:`fusionzoo.data.common`).

``files`` (``data_files=`` on the command line) names the shards:

* a path, a glob (``shards/*.tar``) or a brace list (``shards/{0000..0331}.tar``, zero-padded
  like its bounds; ``{a,b}`` alternatives), relative to ``root`` when it is given;
* several of them separated by commas outside braces (``a/{0..3}.tar,b/x.tar``) or in a list:
  one source of all their shards;
* sources mixed by weight: each part ends in ``::<weight>``
  (``a/{0..3}.tar::0.7,b/{0..1}.tar::0.3``), or a list of ``{"shards": ..., "weight": ...}``
  mappings. Either every part has a weight or none has;
* ``{split: any of the above}`` for several splits.

Without ``files`` the shards are found in ``root``: the ``*.tar`` of its ``train/``, ``val/``
... subfolders, else its own ``*.tar`` files, split by a name that starts with a split
(``train-0000.tar``), else all of them as ``train``.

The shards are read with the standard library's ``tarfile``, not the ``webdataset`` package
(the README's data sources section says why).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fusionzoo.registry import register_dataset

from .captions import CaptionData, ParsedCaptions, build_caption_data
from .checks import DataError, MissingRootError, PathLike, ProblemLog
from .common import KNOWN_SPLITS, select_splits, split_order
from .streaming import (
    BadSample,
    ImageTextStream,
    RawSample,
    StreamData,
    StreamOptions,
    StreamSource,
    decode_image,
)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
FILES_EXPECTED = ("shard paths, globs or brace lists (shards/{0000..0003}.tar), comma-separated, each with "
                  "'::<weight>' to mix sources, or {split: ...}")


# --------------------------------------------------------------------------------------
# Naming shards: braces, globs, weights
# --------------------------------------------------------------------------------------
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _top_level_split(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside braces."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char == "{") - (char == "}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order.

    ``{0000..0003}`` is a numeric range padded to the width of its bounds when one of them
    has a leading zero; ``{a,b}`` lists alternatives, which may hold patterns of their own;
    several groups give every combination. ``{x}`` without a range or a comma stays as written.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if depth == 0:
            break
    else:
        raise DataError(f"unbalanced '{{' in {pattern!r}", expected="braces that close: shards/{0000..0003}.tar")
    prefix, body, suffix = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    match = _RANGE.match(body)
    if match:
        first, last = match.group(1), match.group(2)
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (first, last))
        width = max(len(first), len(last)) if padded else 0
        lo, hi = int(first), int(last)
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif len(_top_level_split(body)) > 1:
        choices = [name for part in _top_level_split(body) for name in expand_braces(part)]
    else:
        choices = ["{" + body + "}"]
    return [prefix + choice + rest for choice in choices for rest in expand_braces(suffix)]


@dataclass(frozen=True)
class SourceSpec:
    """One source as written: its shard patterns and weight (None when not given)."""

    patterns: tuple[str, ...]
    weight: float | None = None


def _parse_part(part: str, where: str) -> SourceSpec:
    text = part.strip()
    if not text:
        raise DataError(f"an empty shard pattern in {where}", expected=FILES_EXPECTED)
    weight = None
    if "::" in text:
        text, _, tail = text.rpartition("::")
        try:
            weight = float(tail)
        except ValueError:
            raise DataError(f"weight {tail!r} of {text!r} is not a number", entry=where,
                            expected="'<shards>::<weight>' with a number, e.g. a/{0..3}.tar::0.7") from None
        if not weight > 0:
            raise DataError(f"weight {tail} of {text!r} is not positive", entry=where, expected="a weight > 0")
    return SourceSpec((text.strip(),), weight)


def parse_sources(spec: Any, where: str = "data_files") -> list[SourceSpec]:
    """The sources of one split's ``files`` value (see the module docstring)."""
    items: list[Any]
    if isinstance(spec, (str, os.PathLike)):
        items = _top_level_split(os.fspath(spec))
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise DataError(f"{where} is a {type(spec).__name__}", expected=FILES_EXPECTED)
    parsed: list[SourceSpec] = []
    for i, item in enumerate(items):
        label = f"{where}[{i}]" if not isinstance(spec, str) else where
        if isinstance(item, (str, os.PathLike)):
            parsed.extend(_parse_part(part, label) for part in _top_level_split(os.fspath(item)))
        elif isinstance(item, Mapping):
            shards = item.get("shards", item.get("files", item.get("path")))
            unknown = set(item) - {"shards", "files", "path", "weight"}
            if shards is None or unknown:
                raise DataError(f"{label} has keys {sorted(item)}",
                                expected="{'shards': <patterns>, 'weight': <number>}")
            # a string may list patterns with commas; a list holds one pattern per element, taken as written
            patterns = (_top_level_split(os.fspath(shards)) if isinstance(shards, (str, os.PathLike))
                        else [os.fspath(p) for p in shards])
            weight = item.get("weight")
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                       or not weight > 0):
                raise DataError(f"{label}: weight {weight!r}", expected="a number > 0")
            parsed.append(SourceSpec(tuple(p.strip() for p in patterns), None if weight is None else float(weight)))
        else:
            raise DataError(f"{label} is a {type(item).__name__}", expected=FILES_EXPECTED)
    weighted = [s.weight is not None for s in parsed]
    if any(weighted) and not all(weighted):
        raise DataError(f"{where}: some sources have a '::weight' and some do not",
                        expected="a weight on every source to mix them, or on none for one source")
    if not any(weighted):  # one source of every shard named
        return [SourceSpec(tuple(p for s in parsed for p in s.patterns), None)]
    return parsed


def resolve_shards(patterns: Sequence[str], root: Path | None) -> list[str]:
    """The shard files ``patterns`` name (braces expanded, globs matched and sorted), in order, once each."""
    found: list[str] = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            path = name if os.path.isabs(name) or root is None else os.path.join(root, name)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"no files match {name!r}", file=root, expected="existing shard files")
                found.extend(matches)
            elif os.path.isfile(path):
                found.append(path)
            else:
                raise DataError("shard not found" if not os.path.exists(path) else "shard is not a file",
                                file=path, entry=f"from {pattern!r}" if pattern != name else None,
                                expected="an existing .tar file")
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def _discover(root: Path) -> dict[str, list[str]]:
    if not root.is_dir():
        raise DataError("dataset folder not found", file=root, expected="a folder of .tar shards")
    folders = {split: sorted(str(p) for p in (root / split).glob("*.tar"))
               for split in KNOWN_SPLITS if (root / split).is_dir()}
    folders = {split: shards for split, shards in folders.items() if shards}
    if folders:
        return dict(sorted(folders.items(), key=lambda item: split_order(item[0])))
    shards = sorted(str(p) for p in root.glob("*.tar"))
    if not shards:
        raise DataError("no .tar shards found", file=root,
                        expected="*.tar files in the folder or in its train/, val/ ... subfolders, or data_files=")
    by_split: dict[str, list[str]] = {}
    for shard in shards:
        head = re.split(r"[-_.]", Path(shard).stem)[0]
        by_split.setdefault(head if head in KNOWN_SPLITS else "train", []).append(shard)
    return dict(sorted(by_split.items(), key=lambda item: split_order(item[0])))


# --------------------------------------------------------------------------------------
# Reading a tar shard
# --------------------------------------------------------------------------------------
_MEMBER = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]+)$")  # key = path up to the first dot of the file name


def member_key(name: str) -> tuple[str, str] | None:
    """``("dir/000012", "jpg")`` for member ``dir/000012.jpg``; None for a name without an extension."""
    match = _MEMBER.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _captions_of(members: Mapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    """The sample's captions from its ``txt`` / ``json`` members' bytes, or ``((), problem)``."""
    if "txt" in members:
        try:
            text = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return (), ".txt caption is not UTF-8"
        return ((text,), None) if text else ((), "empty .txt caption")
    if "json" not in members:
        return (), "no caption (a .txt member, or a .json member with 'caption' or 'captions')"
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return (), f".json member is not valid JSON ({exc})"
    value = meta.get("caption", meta.get("captions")) if isinstance(meta, dict) else None
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return (), "no caption in the .json member (a 'caption' string or list, or a 'captions' list)"
    texts = [t.strip() for t in texts]
    if not all(texts):
        return (), "empty caption in the .json member"
    return tuple(texts), None


def _check_end(handle: Any, offset: int) -> None:
    """A ``tarfile.ReadError`` unless the archive ends where ``tarfile`` stopped (it stops quietly at a cut header)."""
    handle.seek(offset)
    rest = handle.read(512)
    if rest and (len(rest) < 512 or rest.strip(b"\0")):
        raise tarfile.ReadError(f"the file is cut short or has {len(rest)}+ stray bytes at offset {offset}")


#: The first bytes of compressed files, and the suffixes compressed shards go by.
_COMPRESSED_MAGIC: dict[bytes, str] = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                                       b"\x28\xb5\x2f\xfd": "zstd"}
_COMPRESSED_SUFFIXES: tuple[str, ...] = (".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".zst", ".lz4")


def _compression(path: str, head: bytes) -> str | None:
    """How a shard is compressed (``"gzip"``, ``".zst"``), from its first bytes or else its suffix; None: plain."""
    found = next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
    return found or next((s for s in _COMPRESSED_SUFFIXES if path.lower().endswith(s)), None)


class UnreadableShardError(DataError):
    """A shard that stops being readable (not a tar, cut short): names it, where it stopped and why.

    Attributes:
        last: the last member read (None: it failed at its start).
        detail: where it stopped and what ``tarfile`` said (``after member 000003.txt (ReadError: ...)``).
    """

    def __init__(self, problem: str, *, last: str | None = None, detail: str | None = None, **parts: Any) -> None:
        super().__init__(problem, **parts)
        self.last = last
        self.detail = detail or problem


@dataclass(frozen=True)
class IndexedSample:
    """A sample of a plain ``.tar`` shard found by indexing it: where its image's bytes lie, and its captions.

    Attributes:
        shard: the shard's path.
        key: the sample's key in its shard.
        offset: byte offset of the image member's data in the shard file.
        size: the image member's size in bytes.
        captions: the sample's captions (at least one).
    """

    shard: str
    key: str
    offset: int
    size: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class TarShard:
    """One ``.tar`` shard (see the module docstring), read front to back without extracting it.

    :meth:`read` gives its samples with their image bytes (a stream's
    :class:`~fusionzoo.data.streaming.Shard`); :meth:`index` gives where each image lies
    instead, for map-style splits. Both group members by key and judge samples alike.

    Args:
        path: the tar file (optionally compressed for :meth:`read`: ``.tar.gz`` is read too).
        skip_unreadable: a shard that stops being readable (truncated, not a tar) ends with a
            :class:`BadSample` instead of a :class:`DataError`.
    """

    path: str
    skip_unreadable: bool = False

    @property
    def name(self) -> str:
        return self.path

    def _refuse_compressed(self, handle: Any) -> None:
        head = handle.read(6)
        handle.seek(0)
        compression = _compression(self.path, head)
        if compression is not None:
            raise DataError(f"a compressed shard ({compression}) cannot be indexed for random access "
                            "(data_kwargs.streaming=false)", file=self.path, expected="a plain, uncompressed .tar",
                            hint="Use plain .tar shards (decompress them), or stream these "
                                 "(data_kwargs.streaming=true)")

    def _groups(self, random_access: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, members)`` per run of consecutive members that share a key, in stored order.

        ``members`` maps an extension (``jpg``, ``txt``, ``json``) to the member's bytes; with
        ``random_access`` (a plain tar, opened for seeking) an image member maps to the
        ``(offset, size)`` of its bytes in the file instead, and is not read.

        Raises:
            UnreadableShardError: the shard stops being readable.
            DataError: ``random_access`` on a compressed shard.
        """
        wanted = {*IMAGE_EXTENSIONS, "txt", "json"}
        plain = random_access or self.path.lower().endswith(".tar")
        mode = "r:" if random_access else "r|" if plain else "r|*"
        key: str | None = None
        members: dict[str, Any] = {}
        last = None
        try:
            with open(self.path, "rb") as handle:
                if random_access:
                    self._refuse_compressed(handle)
                with tarfile.open(fileobj=handle, mode=mode) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        parts = member_key(member.name)
                        if parts is None:
                            continue
                        if parts[0] != key:
                            if key is not None:
                                yield key, members
                            key, members = parts[0], {}
                        if parts[1] in wanted:
                            if random_access and parts[1] in IMAGE_EXTENSIONS:
                                members[parts[1]] = (member.offset_data, member.size)
                            else:
                                content = tar.extractfile(member)
                                members[parts[1]] = content.read() if content is not None else b""
                        last = member.name
                    if plain:
                        _check_end(handle, tar.offset)
            if key is not None:
                yield key, members
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            detail = f"{f'after member {last}' if last else 'at its start'} ({type(exc).__name__}: {exc})"
            raise UnreadableShardError(f"cannot read the tar shard {detail}", last=last, detail=detail,
                                       file=self.path,
                                       expected="a tar file of webdataset samples (key.jpg with key.txt or key.json)",
                                       hint="Pass skip_bad=true to skip the rest of an unreadable shard") from exc

    def _judge(self, key: str, members: dict[str, Any], seen: set[str]) -> tuple[str, tuple[str, ...]] | BadSample:
        """The sample's image extension and captions, or the :class:`BadSample` that says what is wrong."""
        if key in seen:
            return BadSample(self.path, key, "key appears twice in the shard (a sample's members must be consecutive)")
        seen.add(key)
        image = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            return BadSample(self.path, key, f"no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}); "
                                             f"found {', '.join('.' + e for e in sorted(members)) or 'none'}")
        captions, problem = _captions_of(members)
        if problem is not None:
            return BadSample(self.path, key, problem)
        return image, captions

    def _samples(self, random_access: bool) -> Iterator[RawSample | IndexedSample | BadSample]:
        seen: set[str] = set()
        try:
            for key, members in self._groups(random_access):
                judged = self._judge(key, members, seen)
                if isinstance(judged, BadSample):
                    yield judged
                    continue
                image, captions = judged
                if random_access:
                    yield IndexedSample(self.path, key, *members[image], captions)
                else:
                    yield RawSample(self.path, key, members[image], captions)
        except UnreadableShardError as error:
            if not self.skip_unreadable:
                raise
            yield BadSample(self.path, error.last or "(start)", f"shard unreadable {error.detail}")

    def read(self) -> Iterator[RawSample | BadSample]:
        """The shard's samples in stored order, each with its image's bytes."""
        return self._samples(random_access=False)

    def index(self) -> Iterator[IndexedSample | BadSample]:
        """The shard's samples in stored order, each with where its image's bytes lie (a plain tar only)."""
        return self._samples(random_access=True)


# --------------------------------------------------------------------------------------
# Map-style splits: indexed shards
# --------------------------------------------------------------------------------------
#: What a good sample is, for the errors of indexed shards.
SAMPLE_EXPECTED = (f"a sample of consecutive members sharing a key: an image "
                   f"({', '.join('key.' + e for e in IMAGE_EXTENSIONS)}) and a caption (key.txt, or key.json "
                   "with 'caption' or 'captions'), the key once per shard")


def shard_reference(shard: str, key: str) -> str:
    """The ``image_path`` of an indexed sample: ``<shard path>#<key>`` (``/data/0000.tar#000012``)."""
    return f"{shard}#{key}"


@dataclass(frozen=True)
class ShardImages:
    """Opens the images of indexed shards: ``images("/data/0000.tar#000012")`` seeks to the member and decodes it.

    Each read opens the shard, seeks to the image member's bytes and reads them, so nothing is
    held open; the object is plain data (paths and integers), picklable for DataLoader workers.

    Attributes:
        shards: the indexed shards' paths.
        members: reference (:func:`shard_reference`) -> ``(shard number in shards, offset, size)``
            of the image member's bytes.
    """

    shards: tuple[str, ...]
    members: dict[str, tuple[int, int, int]] = field(repr=False)

    def locate(self, reference: str) -> tuple[str, str, int, int]:
        """``(shard path, key, offset, size)`` of ``reference``'s image; a :class:`DataError` for an unknown one."""
        found = self.members.get(reference)
        if found is None:
            raise DataError(f"no indexed image {reference!r}",
                            expected=f"a '<shard>#<key>' reference of the {len(self.shards)} indexed shards")
        number, offset, size = found
        shard = self.shards[number]
        return shard, reference[len(shard) + 1:], offset, size

    def read_bytes(self, reference: str) -> bytes:
        """The image member's bytes, as stored in the shard (the feature cache keys images by them)."""
        shard, key, offset, size = self.locate(reference)
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as exc:
            raise DataError(f"cannot read the image member ({type(exc).__name__}: {exc})", file=shard, entry=key,
                            expected="the shard as it was when it was indexed") from exc
        if len(data) != size:
            raise DataError(f"the shard ends {size - len(data)} bytes into the image member (it changed since it "
                            "was indexed)", file=shard, entry=key, expected="the shard as it was when it was indexed")
        return data

    def __call__(self, reference: str, *, entry: str | None = None) -> Image.Image:
        """The decoded RGB image; errors name the shard and the key (which say more than ``entry``)."""
        shard, key, _, _ = self.locate(reference)
        return decode_image(self.read_bytes(reference), shard=shard, key=key)


def _split_shards(split: str, entries: list[SourceSpec] | list[str], base: Path | None) -> list[str]:
    """The shards of one map-style split: the union of its patterns; weights are an error."""
    if entries and isinstance(entries[0], str):  # discovered shard files
        return [str(p) for p in entries]
    weighted = [spec for spec in entries if isinstance(spec, SourceSpec) and spec.weight is not None]
    if weighted:
        raise DataError(f"split {split!r} mixes sources by weight ({', '.join(f'::{s.weight:g}' for s in weighted)}),"
                        " which a map-style split has no use for", entry="data_files",
                        expected="shard patterns without '::<weight>' (a split is the union of its shards)",
                        hint="Drop the weights, or stream the shards (data_kwargs.streaming=true) to mix them")
    return list(dict.fromkeys(p for spec in entries for p in resolve_shards(spec.patterns, base)))


def _indexed(specs: dict[str, list[SourceSpec] | list[str]], wanted: Sequence[str], base: Path | None, *,
             skip_bad: bool, only_present: bool, verify_images: bool) -> CaptionData:
    """Map-style splits: every shard read once, one row per sample, images opened by :class:`ShardImages`."""
    shards: dict[str, int] = {}  # shard path -> its number in ShardImages.shards
    members: dict[str, tuple[int, int, int]] = {}
    image_ids: dict[str, int] = {}
    captions_seen = 0
    parsed: dict[str, ParsedCaptions] = {}
    for split in wanted:
        paths = _split_shards(split, specs[split], base)
        log = ProblemLog(split, skip_bad)
        rows: list[dict[str, Any]] = []
        for path in paths:
            number = shards.setdefault(path, len(shards))
            for sample in TarShard(path, skip_unreadable=skip_bad).index():
                if isinstance(sample, BadSample):
                    log.bad(DataError(sample.problem, file=sample.shard, entry=sample.key, expected=SAMPLE_EXPECTED,
                                      hint="Pass skip_bad=true to skip and count bad samples"))
                    continue
                reference = shard_reference(path, sample.key)
                members[reference] = (number, sample.offset, sample.size)
                count = len(sample.captions)
                rows.append({"image_id": image_ids.setdefault(reference, len(image_ids)), "image_path": reference,
                             "captions": list(sample.captions),
                             "caption_ids": list(range(captions_seen, captions_seen + count)),
                             "_entry": f"key {sample.key}"})
                captions_seen += count
        source = base or Path(os.path.commonpath(paths))
        parsed[split] = ParsedCaptions(rows, log, source)
    images = ShardImages(tuple(shards), members)
    image_root = base or (Path(next(iter(shards))).parent if shards else Path("."))
    return build_caption_data("webdataset", parsed, image_root=image_root, only_present=only_present,
                              verify_images=verify_images, images=images)


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------
def _split_specs(files: Any, root: Path | None) -> dict[str, list[SourceSpec] | list[str]]:
    if files is None:
        if root is None:
            raise MissingRootError("webdataset needs root= (data_dir=) or files= (data_files=)",
                                   expected="root or files")
        return dict(_discover(root))
    if isinstance(files, Mapping):
        return {str(split): parse_sources(spec, f"data_files[{split!r}]") for split, spec in files.items()}
    return {"train": parse_sources(files)}


def load_webdataset(
    root: PathLike | None = None,
    *,
    files: Any = None,
    splits: str | Sequence[str] | None = None,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float = 0.1,
    streaming: bool = True,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> StreamData | CaptionData:
    """webdataset ``.tar`` shards as streamed caption splits, or indexed map-style ones (see the module docstring).

    Args:
        root: folder of the shards (and the base of relative ``files`` patterns).
        files: shard patterns, weighted sources or ``{split: ...}`` (see the module docstring).
        splits: which splits to return (default all).
        shuffle_buffer: samples held for shuffling when a trainer turns shuffling on (streamed).
        max_bad_fraction: more bad samples than this fraction of those read is an error (streamed).
        streaming: True: :class:`StreamData`. False: every shard is indexed once and the splits
            are a map-style :class:`~fusionzoo.data.captions.CaptionData` whose images
            :class:`ShardImages` reads by seeking (plain ``.tar`` shards, no weights).
        skip_bad: streamed, an unreadable shard is counted as one bad sample and skipped, instead
            of an error; indexed, bad samples (and the rest of an unreadable shard) are skipped,
            counted and named in a warning instead of an error.
        only_present: accepted for the common loader interface; missing shards are an error at
            once, and every indexed image is present.
        verify_images: indexed, decode every image once at load time (a bad one is an error, or
            skipped with ``skip_bad``); streamed, images are checked as they are read.
    """
    base = Path(root) if root is not None else None
    specs = _split_specs(files, base)
    wanted = select_splits(list(specs), splits, source=base or "data_files")
    if not streaming:
        return _indexed(specs, wanted, base, skip_bad=skip_bad, only_present=only_present,
                        verify_images=verify_images)
    options = StreamOptions(shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction)
    streams = {}
    for split in wanted:
        entries = specs[split]
        if entries and isinstance(entries[0], str):  # discovered shard files
            sources = [StreamSource(str(base), tuple(TarShard(p, skip_bad) for p in entries))]
        else:
            sources = [StreamSource(",".join(spec.patterns),
                                    tuple(TarShard(p, skip_bad) for p in resolve_shards(spec.patterns, base)),
                                    spec.weight or 1.0)
                       for spec in entries]
        streams[split] = ImageTextStream(sources, split=split, options=options)
    return StreamData(name="webdataset", splits=streams, image_root=base)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
register_dataset("webdataset")(load_webdataset)
