"""What the machine can do fast, for choices like ``mixed_precision=auto``."""

from __future__ import annotations


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16), read from /proc/cpuinfo.

    This answers "is bf16 faster than fp32 here", for ``mixed_precision=auto``: without
    these instructions bfloat16 matmuls are emulated and several times *slower* than float32
    (measured 6.5x for a 1024-wide Linear on a 2-core AVX2 machine). It is not
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
