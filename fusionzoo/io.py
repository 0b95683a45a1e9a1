"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each writer fills a temporary file in the target's folder (so the rename stays on one
file system), flushes it to disk, gives it the permissions a plain ``open`` would
(the umask's), and renames it over the target with :func:`os.replace`. If writing
fails, the temporary file is removed and the target is left as it was.

This module imports nothing from fusionzoo, so every other module can import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    Args:
        path: the file to write; its folder is created if missing.
        mode: ``"w"`` (text) or ``"wb"`` (bytes, e.g. for ``torch.save``).
        encoding: the text encoding (ignored in binary mode).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private (0600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike[str], value: Any, *, indent: int | None = 2) -> None:
    """Write ``value`` as JSON (then a newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(value, indent=indent) + "\n")
