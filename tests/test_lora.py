"""LoRA adapters (fusionzoo.lora): what is adapted and frozen, the update LoRA computes, saving the
adapters apart from the base and loading them back, and ``peft=lora`` in ``fusionzoo train``.
Two processes against one: tests/training/test_distributed.py."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

import fusionzoo
from fusionzoo.errors import ConfigError, ModelFolderError
from fusionzoo.lora import LoraSpec, adaptable_layers, lora_layers
from fusionzoo.training.config import load_config
from fusionzoo.training.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
from fixtures import write_vqa_jsonl  # noqa: E402

ANSWERS = ["red", "blue", "green"]
IMAGES = [Image.new("RGB", (40, 40), (200, 10, 10)), Image.new("RGB", (40, 40), (10, 10, 200))]
QUESTIONS = ["what color is it?", "is there a shape?"]


def _tiny(seed: int = 0, **kwargs) -> fusionzoo.FusionModel:
    torch.manual_seed(seed)
    return fusionzoo.create_model("vqa", "merged_transformer", vision="tiny", text="tiny", answers=ANSWERS,
                                  fusion_kwargs={"dim": 32, "num_layers": 1, "num_heads": 2}, **kwargs)


def _perturb_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every B a non-zero value (they start at zero, where the adapted model equals the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def adapted() -> tuple[fusionzoo.FusionModel, fusionzoo.FusionModel]:
    """(the base model, a copy with rank-4 adapters on both encoders and perturbed Bs)."""
    base = _tiny()
    model = copy.deepcopy(base).add_lora(r=4, alpha=8, targets="vision,text")
    _perturb_adapters(model)
    return base.eval(), model.eval()


def test_adapters_go_on_every_linear_and_the_base_is_frozen(adapted) -> None:
    base, model = adapted
    # the tiny ViT's patch conv, qkv/proj/fc1/fc2 of each block; BERT's 6 projections per layer
    expected_vision = [n for n, m in base.vision.model.named_modules()
                       if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)]
    adapted_vision = sorted(n.removeprefix("vision.model.") for n, _ in lora_layers(model) if n.startswith("vision."))
    assert adapted_vision == sorted(expected_vision) and len(expected_vision) == 25
    assert sum(n.startswith("text.") for n, _ in lora_layers(model)) == 12
    assert not any(n.startswith(("fusion.", "head.")) for n, _ in lora_layers(model))
    for name, p in model.named_parameters():
        trains = ".lora_" in name or name.startswith(("fusion.", "head."))
        assert p.requires_grad == trains, name
    assert model.config["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["vision", "text"]}
    assert model.config["freeze_encoders"] is False


def test_zero_adapters_leave_the_outputs_of_the_base() -> None:
    base = _tiny().eval()
    model = copy.deepcopy(base).add_lora(r=2).eval()
    assert torch.equal(model.choice_logits(IMAGES, QUESTIONS), base.choice_logits(IMAGES, QUESTIONS))


def test_an_adapted_layer_computes_w_x_plus_scaled_b_a_x(adapted) -> None:
    _, model = adapted
    layer = dict(lora_layers(model))["text.model.encoder.layer.0.attention.self.query"]
    base_layer = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    x = torch.randn(3, base_layer.in_features)
    expected = x @ base_layer.weight.T + base_layer.bias + (8 / 4) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_training_mode_keeps_the_base_in_eval_and_trains_lora_dropout() -> None:
    model = _tiny().add_lora(r=2, dropout=0.2).train()
    training = {n for n, m in model.text.named_modules() if m.training}
    assert training == {""} | {n for n, m in model.text.named_modules() if isinstance(m, nn.Dropout)
                               and ".lora_dropout." in n}
    assert len(training) == 1 + 12
    assert model.fusion.training and model.head.training
    model.eval()
    assert not any(m.training for m in model.modules())


def test_save_and_load_give_identical_outputs_and_merging_keeps_them(adapted, tmp_path: Path) -> None:
    _, model = adapted
    expected = model.choice_logits(IMAGES, QUESTIONS)
    folder = model.save_pretrained(tmp_path / "lora")
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    # tiny encoders are random: their preset cannot rebuild them, so the folder keeps their base
    assert {k: v["source"] for k, v in config["lora"]["base"].items()} == {"vision": "saved", "text": "saved"}
    saved = safetensors.torch.load_file(str(folder / "adapters.safetensors"))
    assert any(".lora_A." in k for k in saved) and not any(k.endswith("query.base_layer.weight") for k in saved)
    loaded = fusionzoo.load_model(folder)
    assert torch.equal(loaded.choice_logits(IMAGES, QUESTIONS), expected)
    assert loaded.config["lora"]["r"] == 4 and len(lora_layers(loaded)) == len(lora_layers(model))

    merged_folder = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    merged = fusionzoo.load_model(merged_folder)
    assert "lora" not in merged.config and not lora_layers(merged) and lora_layers(model)  # the model kept its own
    torch.testing.assert_close(merged.choice_logits(IMAGES, QUESTIONS), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_preset_base_is_not_saved_and_a_changed_base_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = fusionzoo.create_model("vqa", "early_concat", vision="tiny", text="minilm-l6", answers=ANSWERS)
    model.add_lora(r=2, targets=["text"])
    _perturb_adapters(model)
    model.eval()
    folder = model.save_pretrained(tmp_path / "lora")
    config = json.loads((folder / "config.json").read_text())
    assert config["lora"]["base"]["text"]["source"] == "preset"  # MiniLM's package rebuilds it
    assert config["lora"]["base"]["vision"]["source"] == "saved"  # the random tiny ViT (frozen whole)
    base = safetensors.torch.load_file(str(folder / "base.safetensors"))
    assert base and all(k.startswith("vision.") for k in base)
    adapters = safetensors.torch.load_file(str(folder / "adapters.safetensors"))
    assert not any(k.startswith("text.") and ".lora_" not in k and k.endswith("weight") for k in adapters)
    merged = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in adapters.items() if ".lora_" in k)
    assert adapter_bytes < 0.05 * (merged / "model.safetensors").stat().st_size
    loaded = fusionzoo.load_model(folder)
    assert torch.equal(loaded.choice_logits(IMAGES, QUESTIONS), model.choice_logits(IMAGES, QUESTIONS))

    config["lora"]["base"]["text"]["sha256"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="lora.base.*text encoder's base weights"):
        fusionzoo.load_model(folder)


def test_bad_lora_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora_r must be an int >= 1"):
        LoraSpec(r=0)
    with pytest.raises(ValueError, match="lora_targets must name each of vision, text, fusion"):
        LoraSpec(targets=("head",))
    with pytest.raises(ValueError, match="already has LoRA"):
        _tiny().add_lora().add_lora()
    with pytest.raises(ConfigError, match="key 'lora_dropout'"):
        load_config(None, ["peft=lora", "lora_dropout=1.5"])
    with pytest.raises(ConfigError, match="key 'peft' must be one of"):
        load_config(None, ["peft=qlora"])
    assert adaptable_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU())) == []
    _, model = _tiny(), _tiny().add_lora(r=2)
    folder = model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["lora"]["r"] = "eight"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="key 'lora'.*lora_r"):
        fusionzoo.load_model(folder)


def test_peft_lora_training_moves_only_the_adapters_fusion_and_head(tmp_path: Path) -> None:
    data = write_vqa_jsonl(tmp_path / "vqa", {"train": 24, "test": 8})
    out = tmp_path / "run"
    config = load_config(None, ["task=vqa", "fusion=merged_transformer", "data=vqa-jsonl", f"data_dir={data}",
                                "vision=tiny", "text=tiny", "fusion_kwargs.dim=16", "peft=lora", "lora_r=2",
                                "batch_size=8", "max_steps=4", "lr=1e-2", "log_with=none", "seed=3",
                                f"output_dir={out}"])
    train(config)
    model = fusionzoo.load_model(out / "final")
    assert model.config["lora"]["r"] == 2
    saved = safetensors.torch.load_file(str(out / "final" / "adapters.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if ".lora_B." in k)  # the adapters learned
    # the base the run started from: the same seed builds it again; training left it as it was
    torch.manual_seed(3)
    fresh = fusionzoo.create_model("vqa", "merged_transformer", vision="tiny", text="tiny",
                                   answers=model.vocabulary, fusion_kwargs={"dim": 16})
    base = safetensors.torch.load_file(str(out / "final" / "base.safetensors"))
    fresh_state = fresh.state_dict()
    assert all(torch.equal(v, fresh_state[k.replace(".base_layer.", ".")]) for k, v in base.items())
    # init_from=<the run>: a plain model starts from the weights with the adapters folded in
    from fusionzoo.training.trainer import load_matching_weights

    stats = load_matching_weights(fresh, out)
    assert stats["missing"] == 0 and stats["skipped"] == 0
    torch.testing.assert_close(fresh.eval().choice_logits(IMAGES, QUESTIONS), model.choice_logits(IMAGES, QUESTIONS),
                               atol=1e-5, rtol=1e-5)


def test_adapters_train_at_lr_and_the_base_not_at_all() -> None:
    from fusionzoo.training.optim import parameter_groups

    model = _tiny().add_lora(r=2, targets="text")
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, encoder_lr=1e-5)
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert rates.get(id(p)) == (1e-3 if p.requires_grad else None), name
    assert any(".lora_" in n for n, p in model.named_parameters() if id(p) in rates)


def test_pretraining_takes_peft_but_not_with_momentum_copies() -> None:
    from fusionzoo.training.pretrain import check_pretrain_config, pretrain_base_config

    config = load_config(None, ["peft=lora", "vision=tiny", "text=tiny"], base=pretrain_base_config())
    check_pretrain_config(config, 1)  # tests/training/test_pretrain.py trains it
    config.momentum_distill = True
    with pytest.raises(ConfigError, match="key 'peft'.*momentum_distill"):
        check_pretrain_config(config, 1)
