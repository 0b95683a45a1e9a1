"""On-disk cache of frozen-encoder features, memory-mapped and keyed by content.

With frozen encoders, benchmarks and training runs spend most of their time computing
the same encoder outputs again for every fusion, epoch and seed. :class:`FeatureCache`
computes them once and keeps them on disk, for ``fusionzoo bench``, ``fusionzoo train``,
``fusionzoo pretrain`` and ``fusionzoo eval`` alike (:mod:`fusionzoo.features.extract`
fills it; :mod:`fusionzoo.training.features` reads it during training):

* **key** -- :func:`cache_key` hashes (blake2b) three things: the encoder's
  *weights* (:func:`fingerprint_module`: every tensor of its state dict, bytes
  included) and architecture description, the *preprocessing* (the image data
  config -- size, interpolation, mean, std, crop -- or the tokenizer's
  vocabulary, lowercasing and maximum length, the causal flag), and the *inputs*
  (the bytes of each image file, in order, or the text strings themselves).
  Changing any of them gives a new key, so stale features are never read. Where
  things are installed is not part of the key: the same encoder and images in
  another checkout or virtual environment find the same entries.
* **layout** -- one folder per entry, ``<cache_dir>/<name>-<key[:20]>/``, with
  one ``.npy`` file per array (opened with ``numpy.load(mmap_mode="r")``, so a
  run pages in only what it reads, and processes reading one entry share its pages
  through the page cache) and ``meta.json`` (the full key, shapes, dtypes, what was
  hashed, how long extraction took, the rows that could not be computed). A folder
  becomes an entry only by a rename once everything in it is written, so a crash
  never leaves an entry that looks valid; reading an entry also checks each array's
  shape and dtype against ``meta.json`` (a truncated or replaced file is a miss, and
  the entry is built again). ``meta.json``'s modification time is the entry's last use
  (a hit touches it); ``fusionzoo cache list`` and ``fusionzoo cache clear
  --older-than`` read it (:func:`stored_entries`, :func:`remove_entries`).
* **resumable builds** -- a :class:`RowBuilder` (image and text extraction) computes
  its arrays a block of rows at a time into a staging folder
  ``.<name>-<key[:20]>.building-rows/``: ``plan.json`` (key, rows, block size, shapes),
  the ``.npy`` files allocated at full size, and ``done/<block>.json``, written
  atomically once the block's rows are flushed to the files. An interrupted build
  (Ctrl-C, a crash, a preemption) leaves that folder behind; the next build of the
  same key finds it and computes only the blocks without a marker. An exclusive
  ``flock`` on the staging folder keeps two runs from building one entry at once:
  the second waits, then finds the entry.
* **several processes** -- a cache given the run's :class:`Processes` builds an entry
  with all of them: process 0 prepares the staging folder and lists the blocks left,
  each process computes every P-th of them, and process 0 publishes the entry; then
  every process memory-maps the same files. The cache folder must therefore be one
  folder for every process (one machine, or a shared file system): this is checked,
  and a clear error says so otherwise. If a process fails, every process raises, and
  the blocks done are kept for the next run.
* **precision** -- feature arrays are stored as float16 (half the disk and page
  cache of float32). Both encoders' outputs are well inside float16's range
  (EfficientNet's last stage ends in ReLU6, MiniLM's in a LayerNorm) and the
  rounding error (relative ~5e-4) changes no benchmark score measurably; the
  README's benchmark section records the measurement. Token ids and masks are
  stored exactly (int32 / bool).

Counters (:attr:`FeatureCache.hits`, :attr:`FeatureCache.misses`) tell a run
whether it extracted anything; ``fusionzoo bench`` prints them and writes them to
``run.json``, and so do training runs (``final/run.json``'s ``feature_cache``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..errors import FusionZooError

if TYPE_CHECKING:  # torch is imported where a module is hashed: listing the cache needs none
    from torch import nn

logger = logging.getLogger(__name__)

#: Bump when the stored layout changes: every old entry then misses.
CACHE_FORMAT = 1
META_NAME = "meta.json"
#: The staging folder of a :class:`RowBuilder`'s build: its plan, and one marker per finished block.
PLAN_NAME = "plan.json"
DONE_FOLDER = "done"
RESUMABLE_SUFFIX = "rows"
#: Fields of an encoder description that say where its files were read from, not what they
#: hold: a transformers config's ``_name_or_path`` is the folder of the weights (inside the
#: virtual environment for an installed preset). The weights digest identifies the files'
#: contents, so these fields are left out of the key.
LOCATION_FIELDS = frozenset({"_name_or_path", "name_or_path"})


class CacheError(FusionZooError, ValueError):
    """A cache folder or a ``fusionzoo cache`` option that cannot be used (names the folder or the value)."""


def default_cache_dir() -> Path:
    """``$FUSIONZOO_CACHE``, else ``$XDG_CACHE_HOME/fusionzoo/features``, else ``~/.cache/fusionzoo/features``."""
    if os.environ.get("FUSIONZOO_CACHE"):
        return Path(os.environ["FUSIONZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusionzoo" / "features"


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------
def _canonical(value: Any) -> Any:
    """A JSON-able, order-stable form of configs (tuples -> lists, dict keys sorted by json.dumps)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def fingerprint_module(module: nn.Module) -> str:
    """Hex digest of every tensor (name, dtype, shape, bytes) in ``module.state_dict()``.

    Buffers count too (BatchNorm running statistics change the outputs). Takes a
    fraction of a second for EfficientNet-Lite0 + MiniLM (~110 MB of weights).
    """
    import torch

    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str], read_bytes: Callable[[str], bytes] | None = None) -> str:
    """Hex digest of the files' contents, in order; not of their paths or modification times.

    ``read_bytes`` reads what a path stands for when it is not a file (an image stored inside
    a ``datasets`` table or a tar shard, named by a reference its opener understands).

    Where a file lies does not matter, so the same images in another checkout, virtual
    environment or data folder give the same key (easy-VQA's images live inside its
    installed package, and pip stamps every installed file with the install time). A file
    rewritten with other bytes gets a new digest. Reading the bytes costs a small fraction
    of decoding the images, which a miss does anyway.
    """
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        file_digest = hashlib.blake2b(digest_size=20)
        if read_bytes is not None:
            file_digest.update(read_bytes(path))
        else:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    file_digest.update(block)
        digest.update(file_digest.digest())  # fixed width: one file's bytes never run into the next
    return digest.hexdigest()


def fingerprint_texts(texts: Iterable[str]) -> str:
    """Hex digest of an ordered list of strings."""
    digest = hashlib.blake2b(digest_size=20)
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        digest.update(encoded)
    return digest.hexdigest()


def _without_locations(value: Any) -> Any:
    """``value`` without :data:`LOCATION_FIELDS`, also inside a JSON object held as text (a config's JSON)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return _without_locations(parsed) if isinstance(parsed, dict) else value
    if isinstance(value, Mapping):
        return {k: _without_locations(v) for k, v in value.items() if k not in LOCATION_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_without_locations(v) for v in value]
    return value


def cache_key(encoder: Mapping[str, Any], preprocessing: Mapping[str, Any], inputs: str) -> str:
    """The cache key: a hex digest over the encoder, the preprocessing and the inputs.

    Args:
        encoder: what identifies the encoder: at least ``weights`` (a
            :func:`fingerprint_module` digest) and its ``spec``; fields that
            name the folder it was loaded from (:data:`LOCATION_FIELDS`) are ignored.
        preprocessing: everything that turns an input into the encoder's input
            (image data config; tokenizer settings; causal flag; stored dtype).
        inputs: a digest of the inputs (:func:`fingerprint_files` / :func:`fingerprint_texts`).
    Returns:
        40 hex characters; equal only when all three parts are equal.
    """
    payload = json.dumps(
        {"format": CACHE_FORMAT, "encoder": _canonical(_without_locations(encoder)),
         "preprocessing": _canonical(_without_locations(preprocessing)), "inputs": inputs},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


# --------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------
@dataclass
class CacheEntry:
    """One cached set of arrays, memory-mapped read-only.

    Attributes:
        path: the entry's folder.
        arrays: name -> array (``numpy.memmap``-backed; slice it, do not write to it).
        meta: the contents of ``meta.json``.
        hit: True when the entry was found on disk, False when it was just built.
    """

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    hit: bool

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"cache entry {self.path.name} has arrays {sorted(self.arrays)}, not {name!r}")
        return self.arrays[name]

    @property
    def bad_rows(self) -> dict[int, str]:
        """Rows that could not be computed (an image that does not decode, with ``skip_bad``) -> why."""
        return {int(row): str(why) for row, why in (self.meta.get("info", {}).get("bad_rows") or {}).items()}


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
    ``meta.json`` (:attr:`CacheEntry.bad_rows`). Subclasses set :attr:`rows` and implement
    :meth:`layout` and :meth:`compute`; an instance is also a plain :data:`Builder` (the
    whole build in memory), which is what ``FeatureCache(enabled=False)`` calls.

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


class Processes(Protocol):
    """The processes of one run, as :class:`FeatureCache` needs them to build an entry together.

    ``any`` and ``broadcast`` are called by every process at the same point, so each is also
    a barrier.
    """

    index: int
    count: int

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        ...

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value`` (a JSON-able object), on every process."""
        ...


class OneProcess:
    """:class:`Processes` of a run on one process."""

    index, count = 0, 1

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast(self, value: Any) -> Any:
        return value


@dataclass
class FeatureCache:
    """A folder of :class:`CacheEntry` s, or none at all (``enabled=False``: compute, keep in memory).

    Args:
        root: the cache folder (created on first write).
        enabled: False = every lookup builds afresh and nothing is written (``--no-cache``).
        processes: the processes of a multi-process run, which then look up and build every
            entry together (see the module docstring); None = this process alone.
    """

    root: Path
    enabled: bool = True
    hits: int = 0
    misses: int = 0
    extraction_seconds: float = 0.0
    entries: list[dict[str, Any]] = field(default_factory=list)
    processes: Processes | None = field(default=None, repr=False)

    def get_or_build(self, name: str, key: str, builder: Builder, describe: Mapping[str, Any]) -> CacheEntry:
        """The entry ``name``/``key``: read from disk, or built by ``builder`` (and stored when enabled).

        Args:
            name: a readable prefix of the folder name (``image-efficientnet-lite0``).
            key: from :func:`cache_key`.
            builder: a :class:`RowBuilder` (resumable, shared by the processes), or a function
                that computes the arrays, handing each to ``write(name, array)``, and
                returns extra information for ``meta.json`` (counts, timings); with
                several processes process 0 runs it and the others wait.
            describe: what was hashed, in readable form, for ``meta.json``.
        """
        folder = Path(self.root) / f"{name}-{key[:20]}"
        processes = self.processes or OneProcess()
        if self.enabled:
            entry = self._load(folder, key)
            if not processes.any(entry is None):  # every process found it
                return self._hit(entry, name, key)
        start = time.perf_counter()
        if not self.enabled:
            self.misses += 1
            arrays: dict[str, np.ndarray] = {}
            info = builder(lambda array_name, array: arrays.__setitem__(array_name, np.asarray(array)))
            seconds = time.perf_counter() - start
            self.extraction_seconds += seconds
            meta = {"key": key, "describe": _canonical(describe), "info": _canonical(info), "seconds": seconds}
            self.entries.append({"name": name, "key": key, "hit": False, "path": None})
            return CacheEntry(folder, arrays, meta, hit=False)

        folder.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(builder, RowBuilder):
            built = self._build_blocks(folder, name, key, builder, describe, processes, start)
        else:
            error = None
            if processes.index == 0:
                try:
                    self._build_whole(folder, name, key, builder, describe, start)
                except Exception as exc:  # every process must learn of it, or the others would wait forever
                    error = exc
            _agree(processes, error, f"building feature cache entry {folder.name}")
            built = True
        entry = self._load(folder, key)
        if processes.any(entry is None):
            raise CacheError(
                f"feature cache entry {folder} could not be read back after it was built"
                + (f" (process {processes.index} of {processes.count} does not see it: the cache folder must be "
                   "one folder for every process; set cache_dir= to a shared file system, or feature_cache=false)"
                   if processes.count > 1 else ""))
        if not built:  # another run built it while this one waited for it
            return self._hit(entry, name, key)
        self.misses += 1
        self.extraction_seconds += time.perf_counter() - start
        self.entries.append({"name": name, "key": key, "hit": False, "path": str(folder)})
        entry.hit = False
        return entry

    def stats(self) -> dict[str, Any]:
        """Hits, misses, extraction seconds and the entries used, for ``run.json``."""
        return {"enabled": self.enabled, "root": str(self.root), "hits": self.hits, "misses": self.misses,
                "extraction_seconds": round(self.extraction_seconds, 2), "entries": list(self.entries)}

    # -- reading -------------------------------------------------------------------
    def _hit(self, entry: CacheEntry, name: str, key: str) -> CacheEntry:
        _touch(entry.path / META_NAME)  # the entry's last use, for `fusionzoo cache clear --older-than`
        self.hits += 1
        self.entries.append({"name": name, "key": key, "hit": True, "path": str(entry.path)})
        logger.info("feature cache hit: %s", entry.path)
        return entry

    @staticmethod
    def _load(folder: Path, key: str) -> CacheEntry | None:
        """The complete entry in ``folder`` under ``key``, or None (missing, unfinished, another key, damaged)."""
        meta = _read_json(folder / META_NAME)
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None  # no entry, a prefix collision or an older layout: rebuild
        arrays = {}
        for array_name, spec in (meta.get("arrays") or {}).items():
            array = _open_array(folder / f"{array_name}.npy", spec)
            if array is None:
                return None
            arrays[array_name] = array
        return CacheEntry(folder, arrays, meta, hit=True)

    # -- building in one go ----------------------------------------------------------
    def _build_whole(self, folder: Path, name: str, key: str, builder: Builder, describe: Mapping[str, Any],
                     start: float) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        try:
            shapes: dict[str, Any] = {}

            def write(array_name: str, array: np.ndarray) -> None:
                array = np.ascontiguousarray(array)
                np.save(staging / f"{array_name}.npy", array, allow_pickle=False)
                shapes[array_name] = {"shape": list(array.shape), "dtype": str(array.dtype)}

            info = builder(write)
            self._publish(staging, folder, {"format": CACHE_FORMAT, "key": key, "name": name, "arrays": shapes,
                                            "describe": _canonical(describe), "info": _canonical(info)}, start)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _publish(staging: Path, folder: Path, meta: dict[str, Any], start: float) -> None:
        """Write ``meta.json`` (last) into ``staging`` and rename it to ``folder``, the entry."""
        meta = {**meta, "seconds": round(time.perf_counter() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json_atomic(staging / META_NAME, meta)
        if folder.exists():  # an incomplete or foreign folder under our name: replace it
            shutil.rmtree(folder)
        os.rename(staging, folder)

    # -- building block by block --------------------------------------------------------
    def _build_blocks(self, folder: Path, name: str, key: str, builder: RowBuilder, describe: Mapping[str, Any],
                      processes: Processes, start: float) -> bool:
        """Build ``folder`` with every process, resuming an interrupted build; False if another run built it."""
        staging = folder.parent / f".{folder.name}.building-{RESUMABLE_SUFFIX}"
        lock: int | None = None
        try:
            plan: dict[str, Any] = {}
            error: BaseException | None = None
            if processes.index == 0:
                try:
                    lock = _lock_folder(staging)
                    if self._load(folder, key) is not None:
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
            if processes.any(_read_json(staging / PLAN_NAME).get("token") != plan["token"]):
                raise CacheError(
                    f"the feature cache folder {self.root} is not one folder for every process (process "
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
                            "describe": _canonical(describe), "info": _canonical(info),
                            "blocks": {"rows": plan["block_rows"], "count": plan["blocks"],
                                       "resumed": plan["blocks"] - len(plan["todo"])}}
                    self._publish(staging, folder, meta, start)
                    (folder / PLAN_NAME).unlink(missing_ok=True)  # what only the build needed
                    shutil.rmtree(folder / DONE_FOLDER, ignore_errors=True)
                except Exception as exc:
                    error = exc
            _agree(processes, error, f"publishing feature cache entry {folder.name}")
            return True
        finally:
            if lock is not None:
                os.close(lock)


def _agree(processes: Processes, error: BaseException | None, what: str) -> None:
    """Raise on every process when any process failed at ``what`` (its own error where it failed)."""
    if processes.any(error is not None):
        if error is not None:
            raise error
        raise CacheError(f"another process failed while {what}; its error is shown above")


def _open_plan(staging: Path, name: str, key: str, builder: RowBuilder, processes: int) -> dict[str, Any]:
    """The plan of the build in ``staging`` (an interrupted one of the same key, or a new one) and its blocks left."""
    plan = _read_json(staging / PLAN_NAME)
    resumable = (plan.get("format") == CACHE_FORMAT and plan.get("key") == key and plan.get("rows") == builder.rows
                 and isinstance(plan.get("block_rows"), int) and plan["block_rows"] > 0
                 and all(_open_array(staging / f"{n}.npy", spec, "r") is not None
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
    _write_json_atomic(staging / PLAN_NAME, plan)
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
        array = _open_array(staging / f"{array_name}.npy", spec, "r+")
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
        _write_json_atomic(staging / DONE_FOLDER / f"{block:08d}.json",
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
        record = _read_json(path)
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


def _open_array(path: Path, spec: Any, mode: str = "r") -> np.ndarray | None:
    """``path``'s array memory-mapped; None when missing, unreadable, or not of ``spec``'s shape and dtype."""
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except ValueError:  # an empty array cannot be memory-mapped; a truncated file cannot be either
        try:
            array = np.load(path, allow_pickle=False) if mode == "r" else None
        except (OSError, ValueError, EOFError):
            return None
    except OSError:
        return None
    if array is None:
        return None
    if isinstance(spec, Mapping):
        if list(array.shape) != list(spec.get("shape", array.shape)) or str(array.dtype) != str(spec.get("dtype",
                                                                                                        array.dtype)):
            return None
    return array


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename: never half written."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


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


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits
        pass


# --------------------------------------------------------------------------------------
# Listing and clearing (``fusionzoo cache list`` / ``clear``)
# --------------------------------------------------------------------------------------
#: A complete entry's folder name (``get_or_build``) and an unfinished build's (its staging folder).
_ENTRY_FOLDER = re.compile(r"(?P<name>.+)-(?P<key>[0-9a-f]{20})")
_BUILD_FOLDER = re.compile(r"\.(?P<name>.+)-(?P<key>[0-9a-f]{20})\.building-[A-Za-z0-9_]+")
#: An unfinished build touched more recently than this may still be running: never removed.
BUILD_GRACE_SECONDS = 3600.0
_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


@dataclass(frozen=True)
class StoredEntry:
    """One folder of a cache, as ``fusionzoo cache list`` shows it.

    Attributes:
        path: the folder.
        name: its readable prefix (``image-efficientnet-lite0-128px``).
        size: bytes of its files.
        last_used: when it was last written or read (seconds since the epoch).
        meta: its ``meta.json`` (empty for an unfinished build).
        complete: False for the staging folder of a build that was interrupted or is running.
    """

    path: Path
    name: str
    size: int
    last_used: float
    meta: dict[str, Any]
    complete: bool = True


def _folder_files(folder: Path) -> list[os.stat_result]:
    stats = []
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            try:
                stats.append(os.lstat(os.path.join(dirpath, filename)))
            except OSError:
                pass
    return stats


def stored_entries(root: Path) -> list[StoredEntry]:
    """The cache entries under ``root``, least recently used first; nothing else in the folder counts.

    An entry is a folder named ``<name>-<20 hex digits>`` whose ``meta.json`` holds that
    name and a key starting with those digits, or the staging folder of a build
    (``.<name>-<key>.building-*``). Other files and folders are not entries.

    Raises:
        CacheError: ``root`` exists and is not a folder.
    """
    root = Path(root)
    if not root.exists():
        return []
    if not root.is_dir():
        raise CacheError(f"feature cache {root} is not a folder")
    entries = []
    for item in os.scandir(root):
        if not item.is_dir(follow_symlinks=False):
            continue
        path = Path(item.path)
        if (match := _ENTRY_FOLDER.fullmatch(item.name)) is not None:
            try:
                meta = json.loads((path / META_NAME).read_text())
                used = (path / META_NAME).stat().st_mtime
            except (OSError, ValueError):
                continue
            if (not isinstance(meta, dict) or meta.get("name") != match["name"]
                    or not str(meta.get("key", "")).startswith(match["key"])):
                continue
            entries.append(StoredEntry(path, match["name"], sum(s.st_size for s in _folder_files(path)), used, meta))
        elif (match := _BUILD_FOLDER.fullmatch(item.name)) is not None:
            stats = _folder_files(path)
            used = max([item.stat(follow_symlinks=False).st_mtime, *(s.st_mtime for s in stats)])
            entries.append(StoredEntry(path, match["name"], sum(s.st_size for s in stats), used, {}, complete=False))
    return sorted(entries, key=lambda e: (e.last_used, e.path.name))


def parse_age(text: str) -> float:
    """Seconds in an age such as ``30m``, ``12h``, ``7d`` or ``2w`` (``s``: seconds).

    Raises:
        CacheError: not a number followed by one of those units.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text).lower())
    if match is None:
        raise CacheError(f"--older-than takes a number and a unit (s, m, h, d, w), such as 30m, 12h or 7d; "
                         f"got {text!r}")
    return float(match[1]) * _AGE_UNITS[match[2]]


def entries_to_remove(entries: Sequence[StoredEntry], older_than: float | None = None,
                      now: float | None = None) -> list[StoredEntry]:
    """The entries ``clear`` removes: every one, or those unused for ``older_than`` seconds.

    An unfinished build is removed only once untouched for :data:`BUILD_GRACE_SECONDS`
    as well (a bench may be writing it).
    """
    now = time.time() if now is None else now
    cutoff = now - older_than if older_than is not None else math.inf
    return [e for e in entries
            if e.last_used < cutoff and (e.complete or e.last_used < now - BUILD_GRACE_SECONDS)]


def remove_entries(entries: Iterable[StoredEntry]) -> int:
    """Delete the entries' folders; returns the bytes freed."""
    freed = 0
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():
            freed += entry.size
    return freed
