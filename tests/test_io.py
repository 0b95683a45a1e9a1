"""Atomic writes: the target holds the old file or the new one, never half of one, and no temporary file stays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fusionzoo.io import atomic_write, write_json_atomic, write_text_atomic


def test_json_and_text_replace_the_file_with_plain_permissions(tmp_path: Path) -> None:
    path = tmp_path / "new" / "run.json"  # the folder is created
    write_json_atomic(path, {"step": 1})
    write_json_atomic(path, {"step": 2, "loss": 0.5})
    assert json.loads(path.read_text()) == {"step": 2, "loss": 0.5}
    assert path.read_text().endswith("}\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask's, not mkstemp's 0600
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "index.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(path, "wb") as handle:
            handle.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["index.pt"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["index.pt"]
