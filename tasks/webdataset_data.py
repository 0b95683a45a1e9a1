"""webdataset shards: image-text samples in ``.tar`` files, read as an :class:`ImageTextStream`.

The layout open_clip and LAVIS read, and ``img2dataset --output_format webdataset`` writes:
tar files of about a thousand samples, the members of a sample consecutive and sharing a
key (the member name up to the first dot of its file name): ``000012.jpg`` with
``000012.txt`` (the caption) and/or ``000012.json`` (its ``caption`` string or list, or a
``captions`` list). The image is the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp``; the
caption is the ``.txt`` member when there is one, else the ``.json`` one's; other members are
ignored. A sample without an image or a caption, one whose image does not decode and a key
seen twice in a shard are skipped and counted (:mod:`fusionzoo.tasks.streaming`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusionzoo.registry import register_dataset

from .common import KNOWN_SPLITS, DataError, MissingRootError, PathLike, select_splits, split_order
from .streaming import BadSample, ImageTextStream, RawSample, StreamData, StreamOptions, StreamSource

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


def _captions_of(members: dict[str, bytes]) -> tuple[tuple[str, ...], str | None]:
    """The sample's captions, or ``((), problem)``."""
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


@dataclass(frozen=True)
class TarShard:
    """One ``.tar`` shard (see the module docstring), read front to back without extracting it.

    Args:
        path: the tar file (optionally compressed: ``.tar.gz`` is read too).
        skip_unreadable: a shard that stops being readable (truncated, not a tar) ends with a
            :class:`BadSample` instead of a :class:`DataError`.
    """

    path: str
    skip_unreadable: bool = False

    @property
    def name(self) -> str:
        return self.path

    def _sample(self, key: str, members: dict[str, bytes], seen: set[str]) -> RawSample | BadSample:
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
        return RawSample(self.path, key, members[image], captions)

    def read(self) -> Iterator[RawSample | BadSample]:
        wanted = {*IMAGE_EXTENSIONS, "txt", "json"}
        key: str | None = None
        members: dict[str, bytes] = {}
        seen: set[str] = set()
        last = None
        plain = self.path.lower().endswith(".tar")
        try:
            with open(self.path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|" if plain else "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = member_key(member.name)
                    if parts is None:
                        continue
                    if parts[0] != key:
                        if key is not None:
                            yield self._sample(key, members, seen)
                        key, members = parts[0], {}
                    if parts[1] in wanted:
                        content = tar.extractfile(member)
                        members[parts[1]] = content.read() if content is not None else b""
                    last = member.name
                if plain:
                    _check_end(handle, tar.offset)
            if key is not None:
                yield self._sample(key, members, seen)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            where = f"after member {last}" if last else "at its start"
            if not self.skip_unreadable:
                raise DataError(f"cannot read the tar shard {where} ({type(exc).__name__}: {exc})", file=self.path,
                                expected="a tar file of webdataset samples (key.jpg with key.txt or key.json)",
                                hint="Pass skip_bad=true to skip the rest of an unreadable shard") from exc
            yield BadSample(self.path, last or "(start)", f"shard unreadable {where} ({type(exc).__name__}: {exc})")


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
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> StreamData:
    """webdataset ``.tar`` shards as streamed caption splits (see the module docstring).

    Args:
        root: folder of the shards (and the base of relative ``files`` patterns).
        files: shard patterns, weighted sources or ``{split: ...}`` (see the module docstring).
        splits: which splits to return (default all).
        shuffle_buffer: samples held for shuffling when a trainer turns shuffling on.
        max_bad_fraction: more bad samples than this fraction of those read is an error.
        skip_bad: an unreadable shard is counted as one bad sample and skipped, instead of an error.
        only_present, verify_images: accepted for the common loader interface; shards are
            checked as they are read (missing shards are an error at once).
    """
    base = Path(root) if root is not None else None
    specs = _split_specs(files, base)
    wanted = select_splits(list(specs), splits, source=base or "data_files")
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
