"""Reading annotation files and checking their entries: errors that name the file, the entry and what was expected.

:class:`DataError` says which file, which entry (``line 12`` for JSONL, ``annotations[3] (id=1638)`` for
JSON) and what was expected; :func:`read_json`, :func:`iter_jsonl` and :func:`require` raise it. With
``skip_bad=True`` a :class:`ProblemLog` counts bad entries instead and closes into a :class:`LoadReport`.
Every reader in :mod:`fusionzoo.data` uses these.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionzoo.errors import FusionZooError

logger = logging.getLogger(__name__)

#: How many missing images / skipped entries an error or warning quotes.
SHOW_FIRST: int = 5

#: How many missing image files a :class:`LoadReport` keeps by name (``fusionzoo data check`` lists them).
SHOW_FILES: int = 10

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
class DataError(FusionZooError, ValueError):
    """A problem with dataset files: names the file, the entry and what was expected.

    Args:
        problem: what is wrong ("missing key 'question'").
        file: the annotation or image file concerned.
        entry: which entry of the file ("line 12", "annotations[3] (id=1638)").
        expected: what a correct file holds ("a string").
        hint: what the user can do (a flag to pass).

    The message reads ``"<file>, <entry>: <problem>; expected <expected>. <hint>"``.
    The parts are kept as attributes for programs.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: PathLike | None = None,
        entry: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = None if file is None else str(file)
        self.entry = entry
        self.expected = expected
        self.hint = hint
        where = ", ".join(part for part in (self.file, entry) if part)
        message = f"{where}: {problem}" if where else problem
        if expected:
            message += f"; expected {expected}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class MissingRootError(DataError):
    """A loader was given neither its dataset folder (``root=``; ``data_dir=`` on the command line) nor files."""


class UnknownSplitError(FusionZooError, KeyError):
    """A split name that the dataset does not have (message lists the ones it has)."""

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return str(self.args[0]) if self.args else ""


def jsonl_entry(lineno: int) -> str:
    """Entry label of a JSONL line (1-based)."""
    return f"line {lineno}"


def json_entry(list_name: str, index: int, ident: Any = None, id_key: str = "id") -> str:
    """Entry label of an item of a JSON list: ``annotations[3] (id=1638)``."""
    label = f"{list_name}[{index}]"
    return f"{label} ({id_key}={ident})" if ident is not None else label


# --------------------------------------------------------------------------------------
# Reading annotation files
# --------------------------------------------------------------------------------------
def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found", file=path, expected="an existing file")
    if not path.is_file():
        raise DataError(f"{what} is not a regular file", file=path, expected="a file, not a folder")
    if path.stat().st_size == 0:
        raise DataError(f"{what} is empty", file=path, expected=f"a non-empty {what}")


def read_json(path: PathLike, *, what: str = "annotation file") -> Any:
    """Parse a JSON file; a missing, empty or malformed file is a :class:`DataError`."""
    path = Path(path)
    _check_file(path, what)
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            file=path,
            expected="a JSON document",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} ({exc})", file=path, expected="a readable UTF-8 file") from exc


def iter_jsonl(path: PathLike, log: "ProblemLog") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file.

    A line that is not a JSON object goes to ``log`` (raised, or skipped and
    counted with ``skip_bad``). An empty file, or one with only blank lines, is
    a :class:`DataError`.
    """
    path = Path(path)
    _check_file(path, "JSONL file")
    seen = 0
    try:
        with path.open("r", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                seen += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    log.bad(DataError(f"not valid JSON ({exc.msg})", file=path, entry=jsonl_entry(lineno),
                                      expected="one JSON object per line"))
                    continue
                if not isinstance(record, dict):
                    log.bad(DataError(f"a JSON {type(record).__name__}, not an object", file=path,
                                      entry=jsonl_entry(lineno), expected="one JSON object per line"))
                    continue
                yield lineno, record
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read JSONL file ({exc})", file=path, expected="a readable UTF-8 file") from exc
    if seen == 0:
        raise DataError("JSONL file has no entries (only blank lines)", file=path,
                        expected="one JSON object per line")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true/false"}


def _type_text(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def require(record: Any, key: str, types: type | tuple[type, ...], *, file: PathLike, entry: str) -> Any:
    """``record[key]`` if it exists and has one of ``types``, else a :class:`DataError`.

    ``bool`` is never accepted as an integer (JSON ``true`` is not a label id).
    """
    if not isinstance(record, dict):
        raise DataError(f"a JSON {type(record).__name__}, not an object", file=file, entry=entry,
                        expected=f"an object with key {key!r}")
    if key not in record:
        raise DataError(f"missing key {key!r}", file=file, entry=entry,
                        expected=f"{key!r} holding {_type_text(types)}")
    value = record[key]
    wanted = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
        raise DataError(f"key {key!r} is {type(value).__name__} {_short(value)}", file=file, entry=entry,
                        expected=f"{key!r} holding {_type_text(types)}")
    return value


def require_str_list(record: Any, key: str, *, file: PathLike, entry: str, allow_empty: bool = False) -> list[str]:
    """``record[key]`` checked to be a list of strings (non-empty unless ``allow_empty``)."""
    value = require(record, key, list, file=file, entry=entry)
    if not allow_empty and not value:
        raise DataError(f"key {key!r} is an empty list", file=file, entry=entry,
                        expected=f"{key!r} holding at least one string")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{key}[{i}] is {type(item).__name__} {_short(item)}", file=file, entry=entry,
                            expected=f"{key!r} holding a list of strings")
    return value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Bad entries: raise, or skip and count
# --------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a loader dropped from one split, and why.

    Attributes:
        bad_entries: entries skipped with ``skip_bad`` (wrong schema, unsafe path,
            unreadable or corrupt image).
        missing_images: entries dropped because their image is not on disk
            (``only_present`` or ``skip_bad``).
        kept: entries in the split after dropping.
        examples: the first few messages, for the warning.
        missing_files: the first :data:`SHOW_FILES` image files that were not on disk.
        bad_examples: the messages of the first :data:`SHOW_FILES` bad entries.
    """

    bad_entries: int = 0
    missing_images: int = 0
    kept: int = 0
    examples: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    bad_examples: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """All dropped entries."""
        return self.bad_entries + self.missing_images


class ProblemLog:
    """Collects entry-level errors of one split: raises them, or counts them with ``skip_bad``.

    Args:
        split: split name, for the warning.
        skip_bad: skip bad entries instead of raising.
    """

    def __init__(self, split: str, skip_bad: bool) -> None:
        self.split = split
        self.skip_bad = skip_bad
        self.report = LoadReport()

    def bad(self, error: DataError) -> None:
        """Raise ``error``, or (``skip_bad``) count it and keep its message for the warning."""
        if not self.skip_bad:
            raise error
        self.report.bad_entries += 1
        if len(self.report.examples) < SHOW_FIRST:
            self.report.examples.append(str(error))
        if len(self.report.bad_examples) < SHOW_FILES:
            self.report.bad_examples.append(str(error))

    def missing(self, count: int, examples: Sequence[str], files: Sequence[str] = ()) -> None:
        """Count ``count`` entries without an image on disk; keep the first messages and file names."""
        self.report.missing_images += count
        for text in examples[: max(0, SHOW_FIRST - len(self.report.examples))]:
            self.report.examples.append(text)
        for path in files[: max(0, SHOW_FILES - len(self.report.missing_files))]:
            self.report.missing_files.append(path)

    def finish(self, kept: int, source: PathLike) -> LoadReport:
        """Record the kept count, warn about what was skipped, fail on an empty split."""
        self.report.kept = kept
        rep = self.report
        if rep.bad_entries:
            warnings.warn(
                f"split {self.split!r} of {source}: skipped {rep.bad_entries} bad entries (skip_bad=True); "
                f"first: {'; '.join(rep.examples[:SHOW_FIRST])}",
                stacklevel=3,
            )
        if rep.missing_images:  # expected with only_present; a WARNING when skip_bad dropped them
            log = logger.warning if self.skip_bad else logger.info
            log("split %r of %s: %d entries without an image on disk were left out; first: %s",
                self.split, source, rep.missing_images, "; ".join(rep.examples[:SHOW_FIRST]))
        if kept == 0:
            raise DataError(
                f"split {self.split!r} has no usable entries"
                + (f" ({rep.bad_entries} bad, {rep.missing_images} without images)" if rep.skipped else ""),
                file=source,
                expected="at least one valid entry",
            )
        return rep
