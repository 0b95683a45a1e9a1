"""How one process sees the others: gathers (with and without gradient), shared decisions, broadcasts.

Training code and the feature cache ask a :class:`ProcessView` instead of calling
``torch.distributed`` itself, so the same code runs on one process (every call is the
identity) and on several, and tests can drive it with a fake gather. :class:`OneProcess`
is the other side of the same idea: what evaluation code asks of an ``Accelerator``
(gathers, autocast, unwrapping), for code that runs on one process without one (the
bench, and retrieval ranking called from Python).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _all_gather_with_grad(x: Tensor) -> Tensor:
    """``torch.distributed`` all-gather along dim 0 whose backward sends each process its rows' gradients."""
    import torch.distributed.nn.functional as distributed_autograd

    return torch.cat(distributed_autograd.all_gather(x.contiguous()))


def _broadcast_from_first(value: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


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
        broadcast: process 0's JSON-able value on every process (``broadcast_object_list``);
            needed by :meth:`broadcast` on several processes only.

    ``any``, ``all_finite`` and ``broadcast`` are called by every process at the same point,
    so each is also a barrier. ``ProcessView()`` is one process.
    """

    def __init__(self, index: int = 0, count: int = 1, all_gather: Callable[[Tensor], Tensor] | None = None,
                 all_gather_with_grad: Callable[[Tensor], Tensor] | None = None,
                 device: torch.device | str = "cpu", broadcast: Callable[[Any], Any] | None = None) -> None:
        if count > 1 and (all_gather is None or all_gather_with_grad is None):
            raise ValueError(f"a view of {count} processes needs all_gather and all_gather_with_grad functions")
        self.index, self.count = index, count
        self.device = torch.device(device)  # where flags are gathered (NCCL gathers CUDA tensors only)
        self._all_gather, self._all_gather_with_grad = all_gather, all_gather_with_grad
        self._broadcast = broadcast

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> "ProcessView":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.gather, _all_gather_with_grad,
                   accelerator.device, _broadcast_from_first)

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value`` (a JSON-able object), on every process."""
        if self.count == 1:
            return value
        if self._broadcast is None:
            raise ValueError(f"a view of {self.count} processes was made without a broadcast function")
        return self._broadcast(value)

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


class OneProcess:
    """What evaluation code asks of an ``Accelerator``, for one process on ``device``.

    Gathers are the identity, ``unwrap_model`` returns the model, ``autocast`` enters
    ``autocast()`` (no autocast by default).
    """

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device | str = "cpu",
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.device = torch.device(device)
        self._autocast = autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._autocast()

    def gather(self, tensor: Any) -> Any:
        return tensor

    gather_for_metrics = gather

    def unwrap_model(self, model: Any) -> Any:
        return model
