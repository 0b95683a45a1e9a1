"""Building a feature cache entry: in one go, or a block of rows at a time, resumably and by several processes.

* **resumable builds** -- a :class:`RowBuilder` (image and text extraction) computes
  its arrays a block of rows at a time into a staging folder
  ``.<name>-<key[:20]>.building-rows/``: ``plan.json`` (key, rows, block size, shapes),
  the ``.npy`` files allocated at full size, and ``done/<block>.json``, written
  atomically once the block's rows are flushed to the files. An interrupted build
  (Ctrl-C, a crash, a preemption) leaves that folder behind; the next build of the
  same key finds it and computes only the blocks without a marker. An exclusive
  ``flock`` on the staging folder keeps two runs from building one entry at once:
  the second waits, then finds the entry.
* **several processes** -- given the run's :class:`~fusionzoo.processes.ProcessView`, an entry is built with
  all of them: process 0 prepares the staging folder and lists the blocks left, each
  process computes every P-th of them, and process 0 publishes the entry; then every
  process memory-maps the same files. The cache folder must therefore be one folder for
  every process (one machine, or a shared file system): this is checked, and a clear
  error says so otherwise. If a process fails, every process raises, and the blocks done
  are kept for the next run.
* **publishing** -- either way, the arrays are written into a staging folder and
  ``meta.json`` last; a rename then makes the folder an entry
  (:mod:`fusionzoo.features.layout`), so a crash never leaves an entry that looks valid.

:class:`~fusionzoo.features.cache.FeatureCache` calls :func:`build_whole` and
:func:`build_blocks` on a miss.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..processes import ProcessView

from .layout import (
    CACHE_FORMAT,
    META_NAME,
    CacheError,
    canonical,
    load_entry,
    open_array,
    read_json,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

#: The staging folder of a :class:`RowBuilder`'s build: its plan, and one marker per finished block.
PLAN_NAME = "plan.json"
DONE_FOLDER = "done"
RESUMABLE_SUFFIX = "rows"


#: ``builder(write) -> info``: computes the arrays and stores each with ``write(name, array)``.
Builder = Callable[[Callable[[str, np.ndarray], None]], Mapping[str, Any]]
#: ``{array name: (shape, dtype name)}``, every shape starting with the builder's rows.
Layout = dict[str, tuple[tuple[int, ...], str]]
#: One block's results: ``{array name: the block's rows}`` and ``{row: why it could not be computed}``.
Block = tuple[dict[str, np.ndarray], dict[int, str]]


class RowBuilder:
    """Arrays computed a block of rows at a time, so that a build can resume and be shared by processes.

    Row ``i`` of every array belongs to input ``i``. A row that cannot be computed (an image
    that does not decode, with ``skip_bad``) stays zero and is named with its reason in
    ``meta.json`` (:attr:`~fusionzoo.features.layout.CacheEntry.bad_rows`). Subclasses set
    :attr:`rows` and implement :meth:`layout` and :meth:`compute`; an instance is also a plain
    :data:`Builder` (the whole build in memory), which is what ``FeatureCache(enabled=False)`` calls.

    Attributes:
        rows: rows of every array.
        block_rows: most rows per block, the unit of resuming and of sharing work out.
    """

    rows: int = 0
    block_rows: int = 256

    def layout(self) -> Layout:
        """Every array's full shape and dtype."""
        raise NotImplementedError

    def compute(self, blocks: Sequence[tuple[int, int]], show_progress: bool) -> Iterator[Block]:
        """The results of each ``(start, stop)`` row block, in the order given."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What ``meta.json`` records about the build besides the arrays (counts, speeds)."""
        return {}

    def blocks(self, block_rows: int | None = None) -> list[tuple[int, int]]:
        """All ``(start, stop)`` blocks of :attr:`rows`."""
        size = block_rows or self.block_rows
        return [(start, min(start + size, self.rows)) for start in range(0, self.rows, size)]

    def __call__(self, write: Callable[[str, np.ndarray], None]) -> Mapping[str, Any]:
        arrays = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in self.layout().items()}
        bad: dict[int, str] = {}
        blocks = self.blocks()
        for (start, stop), (values, block_bad) in zip(blocks, self.compute(blocks, True)):
            for name, array in arrays.items():
                array[start:stop] = values[name]
            bad.update(block_bad)
        for name, array in arrays.items():
            write(name, array)
        return {**self.info(), **({"bad_rows": {str(r): m for r, m in sorted(bad.items())}} if bad else {})}


def build_whole(folder: Path, name: str, key: str, builder: Builder, describe: Mapping[str, Any],
                processes: ProcessView, start: float) -> None:
    """Build ``folder`` with ``builder`` on process 0 while the others wait; every process raises if it fails."""
    error = None
    if processes.index == 0:
        try:
            _build_whole_here(folder, name, key, builder, describe, start)
        except Exception as exc:  # every process must learn of it, or the others would wait forever
            error = exc
    _agree(processes, error, f"building feature cache entry {folder.name}")


def _build_whole_here(folder: Path, name: str, key: str, builder: Builder, describe: Mapping[str, Any],
                      start: float) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        shapes: dict[str, Any] = {}

        def write(array_name: str, array: np.ndarray) -> None:
            array = np.ascontiguousarray(array)
            np.save(staging / f"{array_name}.npy", array, allow_pickle=False)
            shapes[array_name] = {"shape": list(array.shape), "dtype": str(array.dtype)}

        info = builder(write)
        publish(staging, folder, {"format": CACHE_FORMAT, "key": key, "name": name, "arrays": shapes,
                                  "describe": canonical(describe), "info": canonical(info)}, start)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, folder: Path, meta: dict[str, Any], start: float) -> None:
    """Write ``meta.json`` (last) into ``staging`` and rename it to ``folder``, the entry."""
    meta = {**meta, "seconds": round(time.perf_counter() - start, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(staging / META_NAME, meta)
    if folder.exists():  # an incomplete or foreign folder under our name: replace it
        shutil.rmtree(folder)
    os.rename(staging, folder)


def build_blocks(folder: Path, name: str, key: str, builder: RowBuilder, describe: Mapping[str, Any],
                 processes: ProcessView, start: float) -> bool:
    """Build ``folder`` with every process, resuming an interrupted build; False if another run built it."""
    staging = folder.parent / f".{folder.name}.building-{RESUMABLE_SUFFIX}"
    lock: int | None = None
    try:
        plan: dict[str, Any] = {}
        error: BaseException | None = None
        if processes.index == 0:
            try:
                lock = _lock_folder(staging)
                if load_entry(folder, key) is not None:
                    plan = {"found": True}
                    _remove_if_empty(staging)
                else:
                    plan = _open_plan(staging, name, key, builder, processes.count)
            except Exception as exc:
                error, plan = exc, {"error": f"{type(exc).__name__}: {exc}"}
        plan = processes.broadcast(plan)
        if "error" in plan:
            if error is not None:
                raise error
            raise CacheError(f"process 0 could not prepare the feature cache build {staging}: {plan['error']}")
        if plan.get("found"):
            return False
        if processes.any(read_json(staging / PLAN_NAME).get("token") != plan["token"]):
            raise CacheError(
                f"the feature cache folder {folder.parent} is not one folder for every process (process "
                f"{processes.index} of {processes.count} does not see what process 0 wrote there); set "
                "cache_dir= to a folder on a file system that every process shares, or feature_cache=false")

        mine = plan["todo"][processes.index::processes.count]  # the same list on every process
        error = None
        try:
            _compute_blocks(staging, builder, plan, mine, show_progress=processes.index == 0)
        except Exception as exc:
            error = exc
        _agree(processes, error, f"extracting {name} (the blocks done are kept: a rerun resumes)")

        error = None
        if processes.index == 0:
            try:
                records = _done_blocks(staging)
                missing = [b for b in range(plan["blocks"]) if b not in records]
                if missing:
                    raise CacheError(f"feature cache build {staging}: blocks {missing[:5]} of {plan['blocks']} "
                                     "have no marker after every process finished")
                bad = {row: why for record in records.values() for row, why in record.get("bad", {}).items()}
                info = {**builder.info(), **({"bad_rows": dict(sorted(bad.items(), key=lambda i: int(i[0])))}
                                             if bad else {})}
                meta = {"format": CACHE_FORMAT, "key": key, "name": name, "arrays": plan["arrays"],
                        "describe": canonical(describe), "info": canonical(info),
                        "blocks": {"rows": plan["block_rows"], "count": plan["blocks"],
                                   "resumed": plan["blocks"] - len(plan["todo"])}}
                publish(staging, folder, meta, start)
                (folder / PLAN_NAME).unlink(missing_ok=True)  # what only the build needed
                shutil.rmtree(folder / DONE_FOLDER, ignore_errors=True)
            except Exception as exc:
                error = exc
        _agree(processes, error, f"publishing feature cache entry {folder.name}")
        return True
    finally:
        if lock is not None:
            os.close(lock)


def _agree(processes: ProcessView, error: BaseException | None, what: str) -> None:
    """Raise on every process when any process failed at ``what`` (its own error where it failed)."""
    if processes.any(error is not None):
        if error is not None:
            raise error
        raise CacheError(f"another process failed while {what}; its error is shown above")


def _open_plan(staging: Path, name: str, key: str, builder: RowBuilder, processes: int) -> dict[str, Any]:
    """The plan of the build in ``staging`` (an interrupted one of the same key, or a new one) and its blocks left."""
    plan = read_json(staging / PLAN_NAME)
    resumable = (plan.get("format") == CACHE_FORMAT and plan.get("key") == key and plan.get("rows") == builder.rows
                 and isinstance(plan.get("block_rows"), int) and plan["block_rows"] > 0
                 and all(open_array(staging / f"{n}.npy", spec, "r") is not None
                         for n, spec in (plan.get("arrays") or {}).items()))
    if not resumable:  # start afresh in the folder (it stays: it is what the lock is on)
        for child in staging.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        layout = builder.layout()
        for array_name, (shape, _) in layout.items():
            if not shape or shape[0] != builder.rows:
                raise ValueError(f"array {array_name!r} of {name}: shape {shape} does not start with its "
                                 f"{builder.rows} rows")
        block_rows = max(1, min(builder.block_rows, math.ceil(builder.rows / processes)))
        for array_name, (shape, dtype) in layout.items():
            path = staging / f"{array_name}.npy"
            np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape)).flush()
            _reserve(path)
        (staging / DONE_FOLDER).mkdir()
        plan = {"format": CACHE_FORMAT, "key": key, "name": name, "rows": builder.rows, "block_rows": block_rows,
                "arrays": {n: {"shape": list(shape), "dtype": np.dtype(dtype).name}
                           for n, (shape, dtype) in layout.items()}}
    (staging / DONE_FOLDER).mkdir(exist_ok=True)
    plan["token"] = uuid.uuid4().hex  # fresh each time: every process checks it reads this plan
    write_json_atomic(staging / PLAN_NAME, plan)
    blocks = math.ceil(builder.rows / plan["block_rows"])
    done = _done_blocks(staging)
    todo = [b for b in range(blocks) if b not in done]
    if done:
        rows_done = sum(min(plan["block_rows"], builder.rows - b * plan["block_rows"]) for b in done if b < blocks)
        logger.warning("feature cache: resuming the extraction of %s: %d of %d rows were done before", name,
                       rows_done, builder.rows)
    return {**plan, "blocks": blocks, "todo": todo}


def _compute_blocks(staging: Path, builder: RowBuilder, plan: dict[str, Any], mine: Sequence[int],
                    show_progress: bool) -> None:
    """Compute blocks ``mine`` into the staging arrays; each block's marker is written after its rows are flushed."""
    arrays = {}
    for array_name, spec in plan["arrays"].items():
        array = open_array(staging / f"{array_name}.npy", spec, "r+")
        if array is None:
            raise CacheError(f"feature cache build {staging}: {array_name}.npy is missing or damaged")
        arrays[array_name] = array
    size = plan["block_rows"]
    spans = [(b * size, min((b + 1) * size, builder.rows)) for b in mine]
    computed = 0
    for block, (start, stop), (values, bad) in zip(mine, spans, builder.compute(spans, show_progress)):
        for array_name, array in arrays.items():
            array[start:stop] = values[array_name]
            array.flush()
        write_json_atomic(staging / DONE_FOLDER / f"{block:08d}.json",
                           {"rows": [start, stop], "bad": {str(row): why for row, why in bad.items()}})
        computed += 1
    if computed != len(mine):
        raise CacheError(f"feature cache build {staging}: the builder gave {computed} of {len(mine)} blocks")


def _done_blocks(staging: Path) -> dict[int, dict[str, Any]]:
    """Block index -> its marker, for every finished block of the build in ``staging``."""
    done = {}
    folder = staging / DONE_FOLDER
    if not folder.is_dir():
        return done
    for path in folder.glob("*.json"):
        record = read_json(path)
        if path.stem.isdigit() and "rows" in record:
            done[int(path.stem)] = record
    return done


def _lock_folder(folder: Path) -> int | None:
    """An exclusive ``flock`` on ``folder`` (created if missing), waiting for another holder; its descriptor.

    None where the platform has no ``flock``. The holder may rename the folder away (it became
    an entry) while this process waits: then the lock is taken again on a fresh folder.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        folder.mkdir(parents=True, exist_ok=True)
        return None
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("feature cache: waiting for another process that is building %s", folder.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: build without the lock
            return fd
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(folder))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _reserve(path: Path) -> None:
    """Give ``path`` its disk blocks now: a full disk is then an OSError here, not a crash (SIGBUS) mid-extraction.

    A memory-mapped file of a new array is sparse; writing into a page the file system has no
    room for kills the process. Where ``posix_fallocate`` is missing or not supported, nothing is done.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"no room for the feature cache build {path.parent} ({os.fstat(fd).st_size:,} bytes "
                             f"for {path.name}): free disk space or set cache_dir= to another disk") from exc
    finally:
        os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another build's files), or gone
        pass
