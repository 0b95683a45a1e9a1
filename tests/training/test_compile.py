"""``compile``: the trained modules compiled in place for the one training step, eager where that fails.

One tiny ``merged_transformer`` VQA model is trained for a few steps on the CPU in float32, eager
and compiled (inductor, which needs a C++ compiler), in the bench's driver and in ``fusionzoo
train``: the losses agree, the weights keep their names (a checkpoint of either kind loads into
the other), and a backend that fails at the first forward or at the first backward leaves one
warning and the eager run's losses.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fusionzoo.bench.loop import FeatureView, train_model
from fusionzoo.errors import ConfigError
from fusionzoo.factory import create_model
from fusionzoo.model import load_model
from fusionzoo.training import step as step_module
from fusionzoo.training.config import load_config
from fusionzoo.training.step import CompiledModules, NonFiniteLossError, compile_mode, trained_children
from fusionzoo.training.trainer import train

from fixtures import train_log, write_vqa_jsonl

FUSION_KWARGS = {"dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}
HEAD_KWARGS = {"dropout": 0.0}  # no dropout: a compiled step draws its masks from another generator
ANSWERS = ["red", "green", "blue"]
SAMPLES, BATCH = 20, 8  # steps of 8, 8 and 4 samples: the last one compiles for a new shape

needs_inductor = pytest.mark.skipif(
    not hasattr(nn.Module, "compile") or shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile's inductor backend needs nn.Module.compile (torch >= 2.2) and a C++ compiler")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vqa", "merged_transformer", answers=ANSWERS, pretrained=False, freeze_encoders=True,
                        fusion_kwargs=FUSION_KWARGS, head_kwargs=HEAD_KWARGS)


def _view(model: nn.Module) -> FeatureView:
    """Cached-feature rows of random states, texts of 3 to 7 tokens (batches of different widths)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 8, (SAMPLES,), generator=g)
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (S, 7)
    return FeatureView(
        image_tokens=torch.randn(SAMPLES, 5, model.vision.out_dim, generator=g).half(),
        image_rows=torch.arange(SAMPLES),
        text_states=(torch.randn(SAMPLES, 7, model.text.out_dim, generator=g) * mask[..., None]).half(),
        text_ids=torch.randint(5, 50, (SAMPLES, 7), generator=g) * mask, text_mask=mask,
        text_rows=torch.arange(SAMPLES), labels=torch.rand(SAMPLES, len(ANSWERS), generator=g))


def _train(model: nn.Module, compile: bool):
    return train_model(model, _view(model), epochs=1, batch_size=BATCH, lr=3e-3, weight_decay=0.01,
                       warmup_ratio=0.0, precision="no", device=torch.device("cpu"), seed=3, progress=False,
                       compile=compile)


@pytest.fixture(scope="module")
def eager_run():
    model = _model()
    return model, _train(model, compile=False)


@pytest.fixture(scope="module")
def compiled_run():
    model = _model()
    return model, _train(model, compile=True)


# -- the key ---------------------------------------------------------------------------


def test_the_compile_key_takes_a_bool_or_a_mode() -> None:
    assert load_config(None, []).compile is False
    assert load_config(None, ["compile=true"]).compile is True
    assert load_config(None, ["compile=max-autotune"]).compile == "max-autotune"
    with pytest.raises(ConfigError, match="key 'compile' expects bool or 'default'"):
        load_config(None, ["compile=fast"])
    assert compile_mode(True) == "default" and compile_mode(False) is None
    with pytest.raises(ConfigError, match="compile must be true, false or one of default"):
        compile_mode("fast")


def test_only_the_trained_children_are_compiled() -> None:
    assert list(trained_children(_model())) == ["fusion", "head"]  # the frozen encoders stay eager
    trained = create_model("vqa", "early_concat", answers=ANSWERS, pretrained=False, freeze_encoders=False)
    assert list(trained_children(trained)) == ["vision", "text", "fusion", "head"]


# -- compiled against eager, and the weights' names -------------------------------------


@needs_inductor
def test_a_compiled_step_gives_the_eager_loss(eager_run, compiled_run) -> None:
    (_, eager), (model, compiled) = eager_run, compiled_run
    assert compiled.steps == eager.steps == 3
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-5)
    assert len(set(eager.losses)) == 3  # the model learns: no two steps alike
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
    assert all(module._compiled_call_impl is None for module in model.modules())  # eager again after training


@needs_inductor
def test_compiled_and_eager_models_load_each_other(eager_run, compiled_run) -> None:
    (eager, _), (compiled, _) = eager_run, compiled_run
    assert list(compiled.state_dict()) == list(eager.state_dict())
    fresh = _model()
    fresh.load_state_dict(compiled.state_dict())  # a compiled run's weights into an eager model
    for a, b in zip(fresh.parameters(), compiled.parameters()):
        assert torch.equal(a, b)
    back = _model()
    parts = CompiledModules(back, True)  # an eager run's weights into a compiled one
    back.load_state_dict(eager.state_dict())
    assert list(parts.modules) == ["fusion", "head"]
    for a, b in zip(back.parameters(), eager.parameters()):
        assert torch.equal(a, b)
    parts.release()


# -- falling back to eager -------------------------------------------------------------


def _raises_at_forward(graph, example_inputs):
    raise RuntimeError("no C++ compiler here")


def _raises_at_backward():
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(graph, example_inputs):
        raise RuntimeError("cannot compile the backward pass")

    return aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=no_backward)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_compile_warns_once_and_trains_eager(eager_run, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, where: str) -> None:
    if not hasattr(nn.Module, "compile"):
        pytest.skip("this torch has no nn.Module.compile (torch >= 2.2)")
    backend = _raises_at_forward if where == "forward" else _raises_at_backward()
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", backend)
    with caplog.at_level(logging.WARNING, logger="fusionzoo.training.step"):
        stats = _train(_model(), compile=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fusionzoo.training.step"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    reason = "no C++ compiler here" if where == "forward" else "cannot compile the backward pass"
    assert "torch.compile of fusion, head failed" in warnings[0] and reason in warnings[0]
    # The failed step is taken again eager from the same state: the eager run's losses, step for step.
    assert stats.losses == pytest.approx(eager_run[1].losses, rel=1e-6)


def test_a_non_finite_loss_is_not_taken_for_a_failure_to_compile(caplog: pytest.LogCaptureFixture) -> None:
    parts = CompiledModules(_model(), True)

    def step():
        raise NonFiniteLossError("loss is nan at step 0")

    with pytest.raises(NonFiniteLossError), caplog.at_level(logging.WARNING):
        parts.step(step)
    assert parts.failure is None and not caplog.records
    parts.release()


# -- fusionzoo train --------------------------------------------------------------------


def _config(data: Path, out: Path, *extra: str):
    return load_config(None, [
        "task=vqa", "data=vqa-jsonl", f"data_dir={data}", "fusion=merged_transformer",
        f"fusion_kwargs={json.dumps(FUSION_KWARGS)}", f"head_kwargs={json.dumps(HEAD_KWARGS)}",
        "vision=tiny", "text=tiny", "freeze_encoders=true", "max_text_len=12", "max_steps=4", f"batch_size={BATCH}",
        "lr=3e-3", "warmup_ratio=0.0", "mixed_precision=no", "seed=5", "log_with=none", "log_every=1",
        "save_every=2", "max_eval_samples=0", f"output_dir={out}", *extra])


@needs_inductor
def test_fusionzoo_train_resumes_an_eager_checkpoint_compiled(tmp_path: Path) -> None:
    data = write_vqa_jsonl(tmp_path / "data", {"train": 32, "val": 4})
    train(_config(data, tmp_path / "eager"))
    # The eager run's checkpoint at step 2, continued compiled: steps 3 and 4 as the eager run took them.
    checkpoint = tmp_path / "eager/checkpoints/step-00000002"
    train(_config(data, tmp_path / "compiled", "compile=true", f"resume={checkpoint}"))
    eager, compiled = train_log(tmp_path / "eager"), train_log(tmp_path / "compiled")
    assert sorted(compiled) == [3, 4]
    for step in (3, 4):
        assert compiled[step]["train/loss"] == pytest.approx(eager[step]["train/loss"], rel=1e-4, abs=1e-5)
    run = json.loads((tmp_path / "compiled/final/run.json").read_text())
    assert run["compile"]["modules"] == ["fusion", "head"] and run["compile"]["fallback"] is None
    # What the compiled run saved loads into an eager model under the eager run's names (AdamW's
    # normalised steps make float-noise differences in small gradients a fraction of lr).
    saved, reference = load_model(tmp_path / "compiled/final"), load_model(tmp_path / "eager/final")
    assert list(saved.state_dict()) == list(reference.state_dict())
    for a, b in zip(saved.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-3)
