"""ProcessView (gathers, shared decisions, broadcasts) and the one-process Accelerator stand-ins."""

from __future__ import annotations

import pytest
import torch

from fusionzoo.processes import OneProcess, ProcessView
from fusionzoo.training.step import LocalAccelerator


def test_one_process_view_is_the_identity() -> None:
    view = ProcessView()
    x = torch.arange(6.0).reshape(3, 2)
    assert view.gather(x) is x and view.gather_with_grad(x) is x
    assert view.broadcast({"a": 1}) == {"a": 1}
    assert view.any(True) and not view.any(False)
    assert view.all_finite(x) and not view.all_finite(torch.tensor([1.0, float("nan")]))


def test_a_view_of_two_processes_uses_its_gather_and_broadcast() -> None:
    sent = []

    def broadcast(value):
        sent.append(value)
        return {"from": 0}

    def all_gather(t):  # what the other process holds: the same shape, values + 10
        return torch.cat([t, t + 10])

    view = ProcessView(index=0, count=2, all_gather=all_gather, all_gather_with_grad=all_gather, broadcast=broadcast)
    assert view.broadcast({"mine": 1}) == {"from": 0} and sent == [{"mine": 1}]
    assert view.any(False)  # the other process's flag is 0 + 10: true
    assert view.gather(torch.tensor([[1.0], [2.0]])).flatten().tolist() == [1.0, 2.0, 11.0, 12.0]
    with pytest.raises(ValueError, match="without a broadcast function"):
        ProcessView(index=1, count=2, all_gather=all_gather, all_gather_with_grad=all_gather).broadcast(1)
    with pytest.raises(ValueError, match="needs all_gather"):
        ProcessView(index=0, count=2)


def test_one_process_accelerators_gather_nothing_and_enter_their_autocast() -> None:
    one = OneProcess("cpu")
    x = torch.ones(2, 2)
    assert one.gather(x) is x and one.gather_for_metrics(x) is x and one.unwrap_model(x) is x
    assert (one.num_processes, one.process_index, one.is_main_process) == (1, 0, True)
    with one.autocast():
        assert (x @ x).dtype == torch.float32
    local = LocalAccelerator("bf16", torch.device("cpu"))
    assert isinstance(local, OneProcess) and local.gather_for_metrics(x) is x
    with local.autocast():
        assert (x @ x).dtype == torch.bfloat16
    with LocalAccelerator("no", torch.device("cpu")).autocast():
        assert (x @ x).dtype == torch.float32
