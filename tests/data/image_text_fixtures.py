"""Small image-text sources written in a temporary folder: webdataset shards, JSONL files, ``datasets`` folders.

Every image is a small PNG (lossless, so the pixels read back equal the pixels written) whose
colour and size come from its number, and every caption names that number, so a test can
tell from an item alone which sample it is.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def picture(n: int) -> Image.Image:
    """A distinct RGB image for sample ``n``: 8-15 pixels wide, 6-9 high, two colours."""
    image = Image.new("RGB", (8 + n % 8, 6 + n % 4), ((37 * n) % 256, (91 * n) % 256, (13 * n + 50) % 256))
    image.paste((255 - (37 * n) % 256, 20, 200), (0, 0, 3, 3))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def caption(n: int, k: int = 0) -> str:
    return f"picture number {n} caption {k}"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file holding ``members`` (name, content) in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(n: int, *, key: str | None = None, how: str = "txt", ext: str = "png") -> list[tuple[str, bytes]]:
    """The members of sample ``n``: its image and its caption as ``.txt``, ``.json`` or both (``how``)."""
    key = key or f"{n:06d}"
    members = [(f"{key}.{ext}", png_bytes(picture(n)))]
    if how in ("txt", "both"):
        members.append((f"{key}.txt", caption(n).encode()))
    if how in ("json", "both"):
        meta = {"caption": caption(n)} if how == "both" else {"captions": [caption(n, 0), caption(n, 1)]}
        members.append((f"{key}.json", json.dumps({**meta, "url": "http://x", "status": "success"}).encode()))
    return members


def write_shards(folder: Path, shards: int, per_shard: int, *, start: int = 0, stem: str = "{:04d}.tar",
                 how: str = "txt") -> dict[str, int]:
    """``shards`` tar files of ``per_shard`` samples numbered from ``start``; returns caption -> number."""
    written: dict[str, int] = {}
    n = start
    for s in range(shards):
        members = []
        for _ in range(per_shard):
            members += sample_members(n, how=how)
            written[caption(n)] = n
            n += 1
        write_tar(folder / stem.format(s), members)
    return written


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_image_text_folder(root: Path, sizes: dict[str, int]) -> dict[str, list[int]]:
    """``root/<split>.jsonl`` with ``{"image": "images/<n>.png", "caption": ...}`` lines; split -> numbers."""
    numbers: dict[str, list[int]] = {}
    n = 0
    for split, count in sizes.items():
        records = []
        numbers[split] = []
        for _ in range(count):
            picture(n).save(_mkdir(root / "images") / f"{n:04d}.png")
            records.append({"image": f"images/{n:04d}.png", "caption": caption(n)})
            numbers[split].append(n)
            n += 1
        write_jsonl(root / f"{split}.jsonl", records)
    return numbers


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
