"""What the machine can do fast, for choices like ``mixed_precision=auto``, and how much memory this process holds."""

from __future__ import annotations

import importlib.util
import os
import platform
import threading
from typing import Any


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16), read from /proc/cpuinfo.

    This answers "is bf16 faster than fp32 here", for ``mixed_precision=auto``: without
    these instructions bfloat16 matmuls are emulated (or fall back to a reference kernel)
    and are *slower* than float32, so ``auto`` stays in float32 there. It is not
    :func:`fusionzoo.layers.cpu_has_optimized_bf16_kernels`, which answers "does PyTorch
    avoid its slow reference bf16 kernels here" (also True on AVX-512 CPUs that emulate
    bf16, where bf16 is usable but not faster than fp32).
    """
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def auto_mixed_precision(on_cuda: bool) -> str:
    """What ``mixed_precision=auto`` (``fusionzoo train``) and ``--mixed-precision auto``
    (``fusionzoo bench``) become: on a CUDA GPU ``bf16`` where it supports bfloat16, else
    ``fp16``; on the CPU ``bf16`` where :func:`cpu_has_bf16_instructions`, else ``no``."""
    if on_cuda:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_instructions() else "no"


# -- the machine -------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` guesses."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: Any = None) -> dict[str, Any]:
    """What a measurement ran on, to be written next to its numbers (``run.json``, the benchmarks' JSON).

    Args:
        device: the device measured (a ``torch.device`` or its name); None = ``cuda`` where
            CUDA is available, else ``cpu``.
    Returns:
        ``device``, ``cpu`` (:func:`cpu_name`), ``cpu_cores`` (the cores this process may
        run on), ``torch_threads``, ``cpu_capability`` (PyTorch's CPU kernel level),
        ``cpu_bf16_instructions`` (:func:`cpu_has_bf16_instructions`), ``python``, ``torch``,
        ``omp_wait_policy`` (``$OMP_WAIT_POLICY`` or None), ``loadavg_start`` (1, 5 and 15
        minute load averages, where the system gives them: other processes on the cores), and
        on CUDA ``gpu`` (its name) and ``gpus`` (how many the device stands for).
    """
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_instructions": cpu_has_bf16_instructions(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count() if device.index is None else 1
    return info


# -- resident memory ---------------------------------------------------------------------


def rss_is_current() -> bool:
    """Whether :func:`rss_bytes` reads the resident memory *now* (Linux /proc, or psutil).

    Where it is False, :func:`rss_bytes` can only give the peak so far (``getrusage``),
    which hides what a block of code added when the process was once larger.
    """
    return os.path.exists("/proc/self/statm") or importlib.util.find_spec("psutil") is not None


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes.

    Read from /proc/self/statm on Linux, else from psutil when it is installed, else the
    peak so far from ``getrusage`` (see :func:`rss_is_current`).
    """
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def memory_status() -> dict[str, int]:
    """This process's resident memory now, in bytes, by kind.

    On Linux the fields of /proc/self/status: ``VmRSS`` (every resident page),
    ``RssAnon`` (anonymous: the heap, tensors), ``RssFile`` (file-backed: memory-mapped
    files and libraries, shared through the page cache and reclaimable) and ``RssShmem``
    (shared memory), plus ``private`` = RssAnon + RssShmem. Elsewhere ``VmRSS`` is
    :func:`rss_bytes` and ``private`` the same.
    """
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in MEMORY_FIELDS:
                    values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        values = {}
    if "VmRSS" not in values:
        rss = rss_bytes()
        return {"VmRSS": rss, "private": rss}
    values["private"] = values.get("RssAnon", 0) + values.get("RssShmem", 0)
    return values


class RssSampler:
    """Peak resident memory of this process while the ``with`` block runs, sampled by a thread.

    Every ``interval_s`` seconds the thread reads :func:`rss_bytes` (``VmRSS`` only), or
    with ``by_kind=True`` :func:`memory_status`, and keeps each value's peak; it samples
    once more at the end. ``start`` holds the values at the start (or at the last
    :meth:`reset`), ``peak`` the peaks since then.

    Example::

        with RssSampler(interval_s=0.001) as sampler:
            step()
        print(sampler.increase() / 2**20, "MiB above the RSS before the step")
    """

    def __init__(self, interval_s: float = 0.005, by_kind: bool = False) -> None:
        self.interval_s = interval_s
        self.by_kind = by_kind
        self.start: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, int]:
        """The values sampled now."""
        return memory_status() if self.by_kind else {"VmRSS": rss_bytes()}

    def reset(self) -> None:
        """Start again from now: ``start`` and ``peak`` become the values now."""
        self.start = self.read()
        self.peak = dict(self.start)

    def _sample(self) -> None:
        for name, value in self.read().items():
            self.peak[name] = max(self.peak.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self.reset()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def increase(self, name: str = "VmRSS") -> int:
        """Bytes the peak of ``name`` rose above its value at the start (0 if it never did)."""
        return max(0, self.peak.get(name, 0) - self.start.get(name, 0))
