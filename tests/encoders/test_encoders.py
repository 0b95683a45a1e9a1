"""Encoders: shapes, preprocessing, offline presets, causal caching, freezing, saving, errors.

The first tests are driven by the preset registries, so a newly registered
preset gets the same checks without a new test.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fusionzoo.encoders import (
    TextEncoder,
    build_text_encoder,
    build_vision_encoder,
    load_efficientnet_lite0_weights,
    load_efficientnet_lite_weights,
)
from fusionzoo.encoders.presets import efficientnet_lite0_weights_path
from fusionzoo.layers import masked_mean
from fusionzoo.registry import TEXT_ENCODERS, VISION_ENCODERS, RegistryError

SLOW_PRESETS = {"efficientnet-lite0", "minilm-l6"}  # a few seconds each on CPU


def _param(name: str) -> object:
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_PRESETS else name


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the hub (read at call time by huggingface_hub and transformers)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


# -- every preset ---------------------------------------------------------------
@pytest.mark.parametrize("name", [_param(n) for n in VISION_ENCODERS.list()])
def test_vision_preset_shapes_and_spec(name: str) -> None:
    encoder = build_vision_encoder(name, pretrained=False).eval()
    _, height, width = encoder.data_config["input_size"]
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, height, width))
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == 1 and out.tokens.shape[2] == encoder.out_dim
    assert out.pooled.shape == (1, encoder.pooled_dim)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    # The spec is JSON and rebuilds the same architecture.
    rebuilt = build_vision_encoder(json.loads(json.dumps(encoder.spec)), pretrained=False)
    assert rebuilt.spec == encoder.spec and _same_architecture(rebuilt, encoder)


def _text_cases() -> list[object]:
    """Every text preset, bidirectional and causal (slow presets only causal, the path with more to break)."""
    cases = []
    for name in TEXT_ENCODERS.list():
        for causal in [True] if name in SLOW_PRESETS else [False, True]:
            marks = [pytest.mark.slow] if name in SLOW_PRESETS else []
            cases.append(
                pytest.param(
                    name, causal, marks=marks, id=f"{name}-{'causal' if causal else 'bidirectional'}"
                )
            )
    return cases


@pytest.mark.parametrize(("name", "causal"), _text_cases())
def test_text_preset_shapes_and_spec(name: str, causal: bool) -> None:
    encoder = build_text_encoder(name, pretrained=False, causal=causal).eval()
    assert encoder.causal is causal
    batch = encoder.tokenize(["a red square", "is there a circle in the picture?"], max_length=8)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape[1] <= 8
    with torch.no_grad():
        states = encoder(**batch).states
    assert states.shape == (2, batch["input_ids"].shape[1], encoder.out_dim)
    assert batch["input_ids"][0, 0] == encoder.bos_token_id  # [CLS]
    assert encoder.eos_token_id in batch["input_ids"][1].tolist()  # [SEP]
    assert encoder.word_embeddings().num_embeddings == encoder.vocab_size
    rebuilt = build_text_encoder(json.loads(json.dumps(encoder.spec)), pretrained=False)
    assert rebuilt.spec == encoder.spec and rebuilt.causal is causal and _same_architecture(rebuilt, encoder)


# -- vision -----------------------------------------------------------------------
def test_tiny_vision_tokens_vit_and_cnn() -> None:
    vit = build_vision_encoder("tiny").eval()
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 1 + 2 * 2, 64)  # [CLS] + 2x2 patches of 16 px
    assert out.pooled.shape == (2, 64)
    assert sum(p.numel() for p in vit.parameters()) < 500_000
    cnn = build_vision_encoder("test_efficientnet", pretrained=False).eval()
    out = cnn(torch.randn(1, 3, 64, 64))
    assert out.tokens.shape == (1, 2 * 2, cnn.out_dim)  # stride 32 feature map, flattened
    features = cnn.model.forward_features(torch.zeros(1, 3, 64, 64))
    assert torch.equal(cnn(torch.zeros(1, 3, 64, 64)).tokens[0, 1], features[0, :, 0, 1])  # row-major


@pytest.mark.parametrize(
    "spec", ["tiny", "test_efficientnet", {"name": "test_vit", "kwargs": {"img_size": 48}}]
)
def test_preprocess_uses_the_encoders_own_data_config(spec: object) -> None:
    encoder = build_vision_encoder(spec, pretrained=False)
    timm_config = timm.data.resolve_data_config({}, model=encoder.model)
    assert encoder.data_config["mean"] == timm_config["mean"]
    assert encoder.data_config["std"] == timm_config["std"]
    size = encoder.data_config["input_size"]
    pixels = torch.zeros(1, *size)
    encoder.eval()(pixels)  # the declared size is one the model accepts
    if isinstance(getattr(encoder.model, "patch_embed", None), nn.Module):
        assert size[1:] == tuple(encoder.model.patch_embed.img_size)  # not timm's stale 160 px

    colour = (200, 30, 100)
    images = [Image.new("RGB", (97, 61), colour), Image.new("L", (40, 50), 128)]
    batch = encoder.preprocess(images)
    assert batch.shape == (2, *size)
    mean, std = torch.tensor(encoder.data_config["mean"]), torch.tensor(encoder.data_config["std"])
    expected = (torch.tensor(colour) / 255 - mean) / std
    torch.testing.assert_close(batch[0].mean(dim=(1, 2)), expected, atol=1e-2, rtol=0)
    torch.testing.assert_close(batch[1].mean(dim=(1, 2)), (128 / 255 - mean) / std, atol=1e-2, rtol=0)
    assert encoder.transform(train=True)(images[0]).shape == size

    encoder.data_config = {**encoder.data_config, "input_size": (3, 64, 64), "mean": (0.0, 0.0, 0.0)}
    assert encoder.preprocess(images[:1]).shape == (1, 3, 64, 64)  # a new config takes effect


def test_vision_freeze_stays_eval() -> None:
    encoder = build_vision_encoder("tiny")
    parent = nn.ModuleDict({"vision": encoder, "proj": nn.Linear(64, 8)})
    encoder.freeze()
    parent.train()
    assert encoder.frozen and not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    assert parent["proj"].training
    encoder.unfreeze()
    parent.train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())


def test_vision_spec_round_trip_gives_identical_outputs() -> None:
    encoder = build_vision_encoder({"preset": "tiny", "kwargs": {"img_size": 48}}).eval()
    rebuilt = build_vision_encoder(json.loads(json.dumps(encoder.spec)), pretrained=False).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    pixels = torch.randn(2, 3, 48, 48)
    assert rebuilt.data_config == encoder.data_config
    assert torch.equal(rebuilt(pixels).tokens, encoder(pixels).tokens)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_checkpoint_from_local_file(tmp_path, suffix: str) -> None:
    source = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    path = tmp_path / f"test_vit.{suffix}"
    if suffix == "safetensors":
        safetensors.torch.save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    spec = {"name": "test_vit", "checkpoint": str(path), "kwargs": {"img_size": 32}}
    encoder = build_vision_encoder(spec, pretrained=True)
    for key, value in source.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
    assert encoder.spec == spec
    assert encoder.data_config["input_size"] == (3, 32, 32)

    with pytest.raises(FileNotFoundError, match=r"test_vit.*missing\.safetensors"):
        build_vision_encoder({**spec, "checkpoint": str(tmp_path / "missing.safetensors")})
    wrong = tmp_path / f"wrong.{suffix}"
    torch.save({"patch_embed.proj.weight": torch.zeros(3)}, wrong)
    with pytest.raises(RuntimeError, match="test_vit"):
        build_vision_encoder({**spec, "checkpoint": str(wrong)})


@pytest.mark.slow
def test_efficientnet_lite0_mapping() -> None:
    torch.manual_seed(0)
    random = build_vision_encoder("efficientnet-lite0", pretrained=False).eval()
    encoder = build_vision_encoder("efficientnet-lite0").eval()
    assert encoder.out_dim == 1280 and encoder.data_config["input_size"] == (3, 224, 224)
    assert encoder.data_config["mean"] == (0.5, 0.5, 0.5)

    # With the 1000-class classifier all 296 tensors map (the loader asserts every shape); the
    # headless encoder (num_classes=0) holds the same 294 tensors minus the classifier _fc.
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    mapping = load_efficientnet_lite0_weights(full)
    assert len(mapping) == 296 and mapping["classifier.weight"] == "_fc.weight"
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    full_state = full.state_dict()
    assert sorted(mapping.values()) == sorted(source)  # every package tensor used once
    for timm_name, source_name in mapping.items():
        assert torch.equal(full_state[timm_name], source[source_name]), (timm_name, source_name)
    headless = encoder.model.state_dict()
    assert len(headless) == 294 and set(full_state) - set(headless) == {
        "classifier.weight",
        "classifier.bias",
    }
    for key, value in headless.items():
        assert torch.equal(value, full_state[key]), key

    pixels = torch.randn(1, 3, 64, 64)  # any size works for a CNN; small keeps the test fast
    with torch.no_grad():
        assert not torch.allclose(encoder(pixels).pooled, random(pixels).pooled)

    grey = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, in_chans=1)
    with pytest.raises(
        ValueError, match=r"tensor #0 _conv_stem.weight \(32, 3, 3, 3\) vs conv_stem.weight \(32, 1, 3, 3\)"
    ):
        load_efficientnet_lite0_weights(grey)
    with pytest.raises(ValueError, match="expected 296 .num_classes=1000. or 294 .num_classes=0."):
        load_efficientnet_lite0_weights(timm.create_model("test_efficientnet", pretrained=False))


@pytest.mark.slow
def test_efficientnet_lite0_classifies_a_coco_photo(coco_mini) -> None:
    path = coco_mini / "images" / "val2014" / "COCO_val2014_000000000359.jpg"  # a street with traffic lights
    if not path.is_file():
        pytest.skip(f"{path} not present")
    encoder = build_vision_encoder("efficientnet-lite0").eval()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    load_efficientnet_lite0_weights(model)
    with torch.no_grad():
        top5 = model(encoder.preprocess([Image.open(path)])).topk(5).indices[0].tolist()
    assert 920 in top5  # ImageNet class 920: traffic light


@pytest.mark.slow
@pytest.mark.parametrize("variant, size, grid", [(1, 240, 8), (2, 260, 9)])
def test_efficientnet_lite1_and_lite2_presets_map_every_tensor(variant: int, size: int, grid: int) -> None:
    from fusionzoo.encoders.presets import efficientnet_lite_weights_path

    encoder = build_vision_encoder(f"efficientnet-lite{variant}").eval()
    assert encoder.spec == {"preset": f"efficientnet-lite{variant}"}
    assert encoder.data_config["input_size"] == (3, size, size) and encoder.out_dim == 1280
    full = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000).eval()
    mapping = load_efficientnet_lite_weights(full, variant)
    source = torch.load(efficientnet_lite_weights_path(variant), map_location="cpu", weights_only=True)
    assert len(mapping) == len(source) == 386 and sorted(mapping.values()) == sorted(source)
    state = full.state_dict()
    for timm_name, source_name in mapping.items():
        assert torch.equal(state[timm_name], source[source_name]), (timm_name, source_name)
    headless = encoder.model.state_dict()
    assert len(headless) == 384 and all(torch.equal(value, state[key]) for key, value in headless.items())
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, size, size)).tokens.shape == (1, grid * grid, 1280)
    with pytest.raises(ValueError, match="expected 386 .num_classes=1000. or 384 .num_classes=0."):
        load_efficientnet_lite_weights(timm.create_model("tf_efficientnet_lite0", num_classes=0), variant)
    coco_mini = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco-vqa-mini"
    path = coco_mini / "images" / "val2014" / "COCO_val2014_000000000359.jpg"  # traffic lights
    if path.is_file():  # the shared real photos, where they are (the mapping checks above run anyway)
        with torch.no_grad():
            top5 = full(encoder.preprocess([Image.open(path)])).topk(5).indices[0].tolist()
        assert 920 in top5  # ImageNet class 920: traffic light


# -- text ---------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_l6_offline_sentence_similarity() -> None:
    encoder = build_text_encoder("minilm-l6").eval()
    assert encoder.out_dim == 384 and not encoder.causal
    assert 22_000_000 < sum(p.numel() for p in encoder.parameters()) < 23_000_000  # pooler dropped
    batch = encoder.tokenize(
        [
            "A man is playing a guitar.",
            "Someone plays an acoustic guitar.",
            "The stock market fell sharply today.",
        ]
    )
    with torch.no_grad():
        states = encoder(**batch).states  # (3, T, 384)
    sentences = F.normalize(masked_mean(states, batch["attention_mask"].bool()), dim=-1)  # (3, 384)
    similar, unrelated = (sentences[0] @ sentences[1]).item(), (sentences[0] @ sentences[2]).item()
    assert similar > unrelated + 0.3, (similar, unrelated)


def test_every_text_parameter_gets_a_gradient() -> None:
    encoder = build_text_encoder("tiny")
    batch = encoder.tokenize(["two words", "three more words"])
    encoder(**batch).states.sum().backward()
    unused = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert not unused, unused


def test_causal_text_encoder_ignores_the_future() -> None:
    encoder = build_text_encoder("tiny", causal=True).eval()
    ids = torch.randint(1000, 5000, (2, 9))
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[:, 5:] = 7
    with torch.no_grad():
        a, b = encoder(ids, mask).states, encoder(changed, mask).states
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])

    bidirectional = build_text_encoder("tiny").eval()
    with torch.no_grad():
        assert not torch.allclose(
            bidirectional(ids, mask).states[:, :5], bidirectional(changed, mask).states[:, :5]
        )
    with pytest.raises(ValueError, match="causal=True"):
        bidirectional(ids, mask, use_cache=True)


def test_cache_step_equals_full_and_reorders_rows() -> None:
    encoder = build_text_encoder("tiny", causal=True).eval()
    ids = torch.randint(1000, 5000, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = encoder(ids, mask).states  # (3, 7, 32)
        prefix = encoder(ids[:, :4], mask[:, :4], use_cache=True)
        torch.testing.assert_close(prefix.states, full[:, :4])
        past, steps = prefix.past_key_values, []
        for t in range(4, 7):  # one token at a time; the mask covers past + new positions
            out = encoder(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.states)
        torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-4)

        # Beam search: keep rows 2, 0, 0 of the cache and continue from them.
        index = torch.tensor([2, 0, 0])
        prefix = encoder(ids[:, :6], mask[:, :6], use_cache=True)
        past = TextEncoder.reorder_cache(prefix.past_key_values, index)
        step = encoder(ids[index, 6:7], mask[index], past_key_values=past, use_cache=True).states
        torch.testing.assert_close(step, full[index, 6:7], atol=1e-5, rtol=1e-4)

    legacy = tuple((torch.arange(3.0).view(3, 1), torch.arange(3.0).view(3, 1) * 10) for _ in range(2))
    reordered = TextEncoder.reorder_cache(legacy, torch.tensor([1, 1]))
    assert torch.equal(reordered[1][1], torch.tensor([[10.0], [10.0]]))


def test_text_freeze_stays_eval() -> None:
    encoder = build_text_encoder("tiny")
    parent = nn.ModuleDict({"text": encoder})
    encoder.freeze()
    parent.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.unfreeze()
    parent.train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("causal", [False, True])
def test_save_config_from_saved_round_trip(tmp_path, causal: bool) -> None:
    encoder = build_text_encoder("tiny", causal=causal).eval()
    encoder.save_config(tmp_path)
    assert (tmp_path / "text_encoder" / "config.json").is_file()
    assert (tmp_path / "tokenizer").is_dir()
    rebuilt = TextEncoder.from_saved(tmp_path, encoder.spec).eval()
    assert _same_architecture(rebuilt, encoder) and rebuilt.causal is causal and rebuilt.spec == encoder.spec
    rebuilt.load_state_dict(encoder.state_dict())
    batch = encoder.tokenize(["a small blue circle", "what shape is it?"])
    assert torch.equal(
        rebuilt.tokenize(["a small blue circle", "what shape is it?"])["input_ids"], batch["input_ids"]
    )
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).states, encoder(**batch).states)

    with pytest.raises(FileNotFoundError, match="save_config"):
        TextEncoder.from_saved(tmp_path / "nothing", encoder.spec)


def test_text_encoder_from_local_folder(tmp_path) -> None:
    source = build_text_encoder("tiny")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    encoder = build_text_encoder(str(tmp_path))
    assert encoder.spec == {"name": str(tmp_path), "causal": False}
    for key, value in source.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


# -- errors -------------------------------------------------------------------------
def test_unknown_names_and_missing_weights_are_clear(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(RegistryError) as info:
        build_vision_encoder("efficientnet-lite")
    message = str(info.value)
    assert "'efficientnet-lite0'" in message and "tiny" in message and "timm" in message

    with pytest.raises(RegistryError, match="tf_efficientnet_lite0"):
        build_vision_encoder("tf_efficientnet_lit0")

    with pytest.raises(RegistryError) as info:
        build_text_encoder("minilm_l6")  # looks like a hub id: tried offline, then explained
    message = str(info.value)
    assert "'minilm-l6'" in message and "hub" in message

    with pytest.raises(RuntimeError, match=r"'test_vit'.*'checkpoint'.*'efficientnet-lite0'"):
        build_vision_encoder("test_vit", pretrained=True)  # hub weights, offline with an empty cache

    with pytest.raises(RegistryError, match="not a valid hub id"):
        build_text_encoder("no such model!")

    with pytest.raises(KeyError):  # RegistryError is a KeyError, also for presets asked by dict
        build_text_encoder({"preset": "minilm"})
    with pytest.raises(ValueError, match="exactly one of 'preset' or 'name'"):
        build_vision_encoder({"preset": "tiny", "name": "test_vit"})
    with pytest.raises(ValueError, match="exceeds"):
        build_text_encoder("tiny").tokenize(["hi"], max_length=1000)
