"""INT8 dynamic quantisation (fusionzoo.quantize): which layers are replaced, how close the outputs stay to
the float model's, the saved folder's exact round trip and size, and the errors around it. Tiny random models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fusionzoo
from fusionzoo.cli import main
from fusionzoo.errors import ConfigError, ModelFolderError, QuantizedModelError
from fusionzoo.factory import create_model
from fusionzoo.model_folder import WEIGHTS_NAME
from fusionzoo.quantize import Int8Linear, is_quantized, quantize_model

ANSWERS = ["yes", "no", "red", "blue", "circle"]
QUESTIONS = ["is it red?", "what shape is in the image?", "is there a blue circle here?"]


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    batch = model.text.tokenize(QUESTIONS)
    pixels = torch.randn(len(QUESTIONS), 3, *model.vision.data_config["input_size"][1:], generator=generator)
    return {"pixel_values": pixels, **batch}


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny float VQA model, its INT8 copy, and both saved."""
    torch.manual_seed(0)
    model = create_model("vqa", "merged_transformer", "tiny", "tiny", answers=ANSWERS).eval()
    root = tmp_path_factory.mktemp("quantize")
    float_dir = model.save_pretrained(root / "float")
    quantized = quantize_model(model, source=float_dir)
    int8_dir = quantized.save_pretrained(root / "int8")
    return {"model": model, "quantized": quantized, "float_dir": float_dir, "int8_dir": int8_dir,
            "inputs": _inputs(model)}


def test_every_linear_layer_is_replaced_and_the_float_model_is_untouched(saved: dict) -> None:
    model, quantized = saved["model"], saved["quantized"]
    float_linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    int8 = {name: m for name, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    assert float_linears and set(int8) == set(float_linears)  # encoders, fusion and head alike
    assert {name.split(".")[0] for name in int8} >= {"vision", "text", "fusion", "head"}
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # quantize_model worked on a copy
    assert quantized.config["quantization"]["quantized_layers"] == len(float_linears)
    assert "quantization" not in model.config and is_quantized(quantized) and not is_quantized(model)
    for name, layer in int8.items():  # each int8 weight is the float weight rounded to its scale
        weight = float_linears[name].weight.detach()
        scale = float(layer.weight_scale)
        assert scale == pytest.approx(weight.abs().max().item() / 127.5, rel=1e-6)  # symmetric qint8 range
        expected = torch.clamp(torch.round(weight * (1.0 / scale)), -128, 127).to(torch.int8)  # as the kernel rounds
        assert torch.equal(layer.weight_int8, expected)
    # embeddings and convolutions stay float
    assert any(isinstance(m, nn.Embedding) for m in quantized.modules())


def test_int8_linear_computes_what_torch_dynamic_linear_computes() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    with warnings.catch_warnings():  # PyTorch 2.10+: torch.ao.quantization is deprecated (still there)
        warnings.simplefilter("ignore")
        reference = quantize_dynamic(nn.Sequential(nn.Linear(24, 10)), {nn.Linear}, dtype=torch.qint8)[0]
    assert type(reference) is DynamicLinear
    x = torch.randn(3, 5, 24)
    assert torch.equal(Int8Linear.from_dynamic(reference)(x), reference(x))


@pytest.mark.parametrize("fusion", fusionzoo.list_fusions())
def test_outputs_stay_close_to_the_float_model(fusion: str) -> None:
    torch.manual_seed(0)
    model = create_model("vqa", fusion, "tiny", "tiny", answers=ANSWERS).eval()
    inputs = _inputs(model)
    reference, int8 = _logits(model, inputs), _logits(quantize_model(model), inputs)
    assert int8.shape == reference.shape
    # 8-bit weights and activations: a few percent of the logits' size on these random tiny models
    assert (int8 - reference).norm().item() <= 0.1 * reference.norm().item()
    assert not torch.equal(int8, reference)  # something was quantised


def test_folder_round_trip_is_exact(saved: dict) -> None:
    inputs, expected = saved["inputs"], _logits(saved["quantized"], saved["inputs"])
    loaded = fusionzoo.load_model(saved["int8_dir"])
    assert is_quantized(loaded) and not loaded.training
    assert torch.equal(_logits(loaded, inputs), expected)
    # quantize at load: the float folder's model quantised, the same weights and outputs
    at_load = fusionzoo.load_model(saved["float_dir"], quantize="int8")
    assert torch.equal(_logits(at_load, inputs), expected)
    assert at_load.config["quantization"]["source"] == str(saved["float_dir"].resolve())
    record = json.loads((saved["int8_dir"] / "config.json").read_text())["quantization"]
    assert record["method"] == "dynamic" and record["dtype"] == "qint8"
    assert fusionzoo.load_model(saved["int8_dir"], quantize="int8").config["quantization"] == record


def test_the_saved_int8_weights_are_smaller_by_three_bytes_a_linear_weight(saved: dict) -> None:
    float_bytes = (saved["float_dir"] / WEIGHTS_NAME).stat().st_size
    int8_bytes = (saved["int8_dir"] / WEIGHTS_NAME).stat().st_size
    linear_weights = sum(m.weight.numel() for m in saved["model"].modules() if isinstance(m, nn.Linear))
    # float32 -> int8 saves 3 bytes per weight; scales, zero points and the longer header cost a few kB
    assert int8_bytes < float_bytes
    assert float_bytes - 3 * linear_weights - 20_000 < int8_bytes < float_bytes - 3 * linear_weights + 20_000


@pytest.mark.parametrize("value", ["int4", "INT8", 8, "fp16", True])
def test_bad_quantize_values_are_errors(saved: dict, value: object) -> None:
    with pytest.raises(ConfigError, match="quantize.*'int8'"):
        fusionzoo.load_model(saved["float_dir"], quantize=value)
    with pytest.raises(ConfigError, match="quantize"):
        quantize_model(saved["model"], value)


def test_a_quantised_model_is_cpu_and_inference_only(saved: dict) -> None:
    quantized = fusionzoo.load_model(saved["int8_dir"])
    for move in (lambda: quantized.train(), lambda: quantized.to("cuda"), lambda: quantized.cuda(),
                 lambda: quantized.to(torch.bfloat16), lambda: quantized.half(),
                 lambda: fusionzoo.load_model(saved["int8_dir"], device="cuda")):
        with pytest.raises(QuantizedModelError, match="INT8"):
            move()
    quantized.eval().to("cpu")  # the CPU in float32 is fine
    from fusionzoo.training.trainer import load_matching_weights

    fresh = create_model("vqa", "merged_transformer", "tiny", "tiny", answers=ANSWERS)
    with pytest.raises(QuantizedModelError, match="init_from=.*INT8 model.*float model it was quantised from"):
        load_matching_weights(fresh, saved["int8_dir"])  # would leave every Linear layer at its initialisation
    lora = create_model("vqa", "early_concat", "tiny", "tiny", answers=ANSWERS)
    lora.config["lora"] = {"r": 4}
    with pytest.raises(QuantizedModelError, match="LoRA"):
        quantize_model(lora)


@pytest.mark.parametrize("edit, match", [
    (lambda q: q.update(dtype="quint4"), r"'quantization\.dtype' is 'quint4'"),
    (lambda q: q.update(quantized_layers=3), r"'quantization\.quantized_layers' says 3"),
    (lambda q: q.update(quantized_layers="all"), r"'quantization\.quantized_layers' must be an int"),
    (lambda q: q.update(source=7), r"'quantization\.source' must be"),
])
def test_a_bad_quantization_record_names_the_key(saved: dict, tmp_path: Path, edit, match: str) -> None:
    import shutil

    folder = Path(shutil.copytree(saved["int8_dir"], tmp_path / "edited"))
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=match) as error:
        fusionzoo.load_model(folder)
    assert "config.json" in str(error.value)


def test_quantize_command_and_predict_with_quantize(saved: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run-int8"
    assert main(["quantize", str(saved["float_dir"]), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["quantized_layers"] == saved["quantized"].config["quantization"]["quantized_layers"]
    assert report["size_ratio"] == pytest.approx((out / WEIGHTS_NAME).stat().st_size
                                                 / (saved["float_dir"] / WEIGHTS_NAME).stat().st_size, abs=1e-4)
    assert torch.equal(_logits(fusionzoo.load_model(out), saved["inputs"]), _logits(saved["quantized"], saved["inputs"]))
    assert main(["quantize", str(saved["float_dir"]), "--out", str(out)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already quantised" in capsys.readouterr().err

    image = tmp_path / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    expected = saved["quantized"].predict([Image.open(image).convert("RGB")], [QUESTIONS[0]])[0]
    for args in (["predict", str(saved["float_dir"]), "quantize=int8"], ["predict", str(out)]):
        assert main([*args, "--image", str(image), "--question", QUESTIONS[0]]) == 0
        assert capsys.readouterr().out.strip() == expected
    assert main(["predict", str(saved["float_dir"]), "quantize=int4", "--image", str(image), "--question", "x"]) == 2
    assert "key 'quantize'" in capsys.readouterr().err


def test_eval_scores_the_int8_model_beside_the_float_one(saved: dict, tmp_path: Path, monkeypatch) -> None:
    """The eval job scores the float folder and a saved INT8 copy (or an INT8 folder and its source) alike."""
    import fusionzoo.training.trainer as trainer
    from fusionzoo.commands.quantize import evaluate_int8
    from fusionzoo.training.config import TrainConfig

    inputs = saved["inputs"]

    def fake_evaluate(path: Path, config: TrainConfig) -> dict:  # a score that depends on the loaded weights
        assert config.cpu
        model = fusionzoo.load_model(path)
        return {"accuracy": float(_logits(model, inputs).sum()), "num_samples": 3.0,
                "per_answer_type": {"other": float(_logits(model, inputs).max())}}

    monkeypatch.setattr(trainer, "evaluate_checkpoint", fake_evaluate)
    float_sum, int8_sum = float(_logits(saved["model"], inputs).sum()), float(_logits(saved["quantized"], inputs).sum())
    for result in (evaluate_int8(str(saved["float_dir"]), TrainConfig(), "int8"),
                   evaluate_int8(str(saved["int8_dir"]), TrainConfig(), None)):
        assert result["accuracy"] == pytest.approx(int8_sum) and result["float"]["accuracy"] == pytest.approx(float_sum)
        assert result["int8_minus_float"]["accuracy"] == pytest.approx(int8_sum - float_sum, abs=1e-5)
        assert result["int8_minus_float"]["num_samples"] == 0
        assert set(result["int8_minus_float"]["per_answer_type"]) == {"other"}
        assert result["quantization"]["dtype"] == "qint8"


def test_perf_int8_mode_reports_latency_and_size_ratios(saved: dict, tmp_path: Path, capsys) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("perf", Path(__file__).parents[1] / "benchmarks" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("perf", perf)  # its dataclasses look their module up there
    spec.loader.exec_module(perf)
    out = tmp_path / "int8.json"
    report = perf.main(["--int8", str(saved["float_dir"]), "--quick", "--batch", "3", "--repeats", "2",
                        "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fp32_bytes"] == (saved["float_dir"] / WEIGHTS_NAME).stat().st_size  # the same weights, saved again
    assert summary["int8_bytes"] == (saved["int8_dir"] / WEIGHTS_NAME).stat().st_size
    assert summary["int8_size_ratio"] == pytest.approx(summary["int8_bytes"] / summary["fp32_bytes"])
    assert summary["int8_latency_ratio"] == pytest.approx(summary["int8_ms"] / summary["fp32_ms"])
    assert summary["int8_after_vision_ratio"] == pytest.approx(summary["int8_after_vision_ms"]
                                                               / summary["fp32_after_vision_ms"])
    assert summary["batch"] == 3 and 0 <= summary["answers_agree"] <= 3
    assert len(report["int8_samples_ms"]) == len(report["fp32_samples_ms"]) >= 1  # interleaved rounds
    assert json.loads(out.read_text())["int8_bytes"] == summary["int8_bytes"]
