"""The evaluation pass shared by the tasks' ``evaluate`` and the bench's inference."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import torch

from fusionzoo.tasks.passes import Stopwatch, caption_pass, logits_pass


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.seen: list[set[str]] = []

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        self.seen.append(set(inputs))
        return SimpleNamespace(logits=self.proj(inputs["image_states"]))


def test_logits_pass_gives_float32_logits_without_gradients_under_autocast() -> None:
    torch.manual_seed(0)
    model = Linear()
    batches = [{"image_states": torch.randn(2, 4), "labels": torch.tensor([0, 1]), "image_id": torch.tensor([5, 6])}
               for _ in range(3)]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    out = list(logits_pass(model, batches, autocast))
    assert [batch is given for (batch, _), given in zip(out, batches)] == [True] * 3
    for (batch, logits) in out:
        assert logits.dtype == torch.float32 and logits.shape == (2, 3) and not logits.requires_grad
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model.proj(batch["image_states"]).float()  # bf16 values, widened
        assert torch.equal(logits, expected)
        assert not torch.equal(logits, model.proj(batch["image_states"]))  # autocast was on
    # by default the model gets the collated keys FusionModel.forward takes: image_id is not one
    assert model.seen[0] == {"image_states", "labels"}
    list(logits_pass(model, batches[:1], contextlib.nullcontext, inputs=lambda b: {"image_states": b["image_states"]}))
    assert model.seen[-1] == {"image_states"}


def test_caption_pass_generates_from_cached_states_or_pixels() -> None:
    calls = []

    def generate_ids(pixel_values, *, image_states, max_new_tokens, num_beams):
        calls.append((pixel_values is None, image_states is None, max_new_tokens, num_beams, torch.is_grad_enabled()))
        return torch.zeros(2, max_new_tokens, dtype=torch.long)

    model = SimpleNamespace(generate_ids=generate_ids)
    batches = [{"image_states": torch.zeros(2, 5, 4)}, {"pixel_values": torch.zeros(2, 3, 8, 8)}]
    ids = [ids for _, ids in caption_pass(model, batches, contextlib.nullcontext, max_new_tokens=7, num_beams=3)]
    assert [tuple(i.shape) for i in ids] == [(2, 7), (2, 7)]
    assert calls == [(True, False, 7, 3, False), (False, True, 7, 3, False)]


def test_stopwatch_sums_only_the_timed_blocks() -> None:
    watch = Stopwatch()
    with watch:
        time.sleep(0.02)
    time.sleep(0.3)  # not timed
    with watch:
        time.sleep(0.02)
    assert 0.04 <= watch.seconds < 0.3
