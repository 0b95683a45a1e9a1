"""How one process sees the others: gathers (with and without gradient) and shared decisions.

Training code asks a :class:`ProcessView` instead of calling ``torch.distributed``
itself, so the same code runs on one process (every call is the identity) and on
several, and tests can drive it with a fake gather.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _all_gather_with_grad(x: Tensor) -> Tensor:
    """``torch.distributed`` all-gather along dim 0 whose backward sends each process its rows' gradients."""
    import torch.distributed.nn.functional as distributed_autograd

    return torch.cat(distributed_autograd.all_gather(x.contiguous()))


class ProcessView:
    """How a training step sees the other processes: their batches, and decisions taken together.

    Args:
        index: this process's rank.
        count: number of processes.
        all_gather: concatenates a tensor of the same shape on every process
            along dim 0, without gradient (``accelerator.gather``).
        all_gather_with_grad: the same, differentiable: the gradient that each
            process's loss puts on a gathered row goes back to the process that
            owns it (``torch.distributed.nn.functional.all_gather``).
        device: the device of this process's tensors (flags are gathered there).
    """

    def __init__(self, index: int = 0, count: int = 1, all_gather: Callable[[Tensor], Tensor] | None = None,
                 all_gather_with_grad: Callable[[Tensor], Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if count > 1 and (all_gather is None or all_gather_with_grad is None):
            raise ValueError(f"a view of {count} processes needs all_gather and all_gather_with_grad functions")
        self.index, self.count = index, count
        self.device = torch.device(device)  # where flags are gathered (NCCL gathers CUDA tensors only)
        self._all_gather, self._all_gather_with_grad = all_gather, all_gather_with_grad

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> "ProcessView":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.gather, _all_gather_with_grad,
                   accelerator.device)

    def all_finite(self, value: Tensor) -> bool:
        """Whether ``value`` is finite on every process (one decision that all processes share)."""
        finite = torch.isfinite(value.detach()).all().reshape(1).long()  # (1,)
        if self.count == 1:
            return bool(finite)
        return bool(self._all_gather(finite).all())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (one decision that all processes share)."""
        if self.count == 1:
            return bool(flag)
        return bool(self._all_gather(torch.tensor([int(flag)], device=self.device)).any())

    def gather_with_grad(self, local: Tensor) -> Tensor:
        """(B, ...) on each process -> (count * B, ...), differentiable through every row.

        Used for the ITC embeddings: with each process's loss the mean over its own
        rows and DDP averaging the gradients, the update is exactly that of one
        process holding the whole global batch.
        """
        if self.count == 1:
            return local
        return self._all_gather_with_grad(local)

    def gather(self, local: Tensor, pad_dim: int | None = None) -> Tensor:
        """(B, ...) on each process -> (count * B, ...), process order; the local rows keep their gradient.

        Args:
            local: this process's rows; the same shape on every process except
                along ``pad_dim``.
            pad_dim: a dimension whose size may differ between processes (text
                length); it is zero-padded (False for masks) to the largest.
        """
        if self.count == 1:
            return local
        if local.dtype == torch.bool:
            return self.gather(local.long(), pad_dim).bool()
        if pad_dim is not None:
            size = torch.tensor([local.shape[pad_dim]], device=local.device)
            longest = int(self._all_gather(size).max())
            pad = [0, 0] * (local.dim() - 1 - pad_dim) + [0, longest - local.shape[pad_dim]]
            local = F.pad(local, pad)  # keeps the gradient
        wire = local.detach().float() if local.is_floating_point() else local.detach()  # gloo has no bf16
        everyone = self._all_gather(wire.contiguous()).to(local.dtype)  # (count * B, ...) no gradient
        b = local.shape[0]
        start = self.index * b
        return torch.cat([everyone[:start], local, everyone[start + b:]])  # (count * B, ...)
