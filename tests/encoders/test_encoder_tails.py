"""Encoder tails: ``tail(n)(tail_inputs(x, n))`` is ``forward(x)``, the tails hold the last blocks, errors are clear."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, RobertaConfig, RobertaModel

from fusionzoo.encoders import TextEncoder, VisionEncoder, build_text_encoder, build_vision_encoder
from fusionzoo.encoders.text import model_from_config

SLOW = {"efficientnet-lite0", "minilm-l6"}  # pretrained weights from their packages: a few seconds each
#: (preset, its number of blocks): EfficientNet-Lite0's 16 blocks over 7 stages, test_vit's 6, BERT layers.
VISION = [("tiny", 6), ("efficientnet-lite0", 16)]
TEXT = [("tiny", 2), ("minilm-l6", 6)]


def _param(name: str, blocks: int) -> object:
    return pytest.param(name, blocks, marks=pytest.mark.slow) if name in SLOW else (name, blocks)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _ids(params: nn.Module) -> set[int]:
    return {id(p) for p in params.parameters()}


def _texts(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    return encoder.tokenize(["what color is the circle?", "no", "is there a red shape in the image at all?"])


# -- vision ---------------------------------------------------------------------
@pytest.mark.parametrize("name,blocks", [_param(*v) for v in VISION])
def test_vision_tail_of_tail_inputs_is_forward(name: str, blocks: int) -> None:
    encoder = build_vision_encoder(name).eval()
    _, height, width = encoder.data_config["input_size"]
    pixels = torch.randn(2, 3, height, width)
    assert encoder.num_blocks() == blocks
    with torch.no_grad():
        tokens = encoder(pixels).tokens  # (2, N, D)
        for n in (1, 2):
            inputs = encoder.tail_inputs(pixels, n)
            assert inputs.ndim == (4 if "efficientnet" in name else 3)  # a feature map or tokens
            out = encoder.tail(n)(inputs)
            assert out.shape == tokens.shape
            torch.testing.assert_close(out, tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,blocks", [_param(*v) for v in VISION])
def test_vision_tail_holds_the_last_blocks(name: str, blocks: int) -> None:
    encoder = build_vision_encoder(name)
    model = encoder.model
    if "efficientnet" in name:
        flat = [block for stage in model.blocks for block in stage]
        after = [model.conv_head, model.bn2]
    else:
        flat, after = list(model.blocks), [model.norm]
    assert len(flat) == blocks
    for n in (1, 2, blocks):
        tail = encoder.tail(n)
        expected = [*flat[-n:], *after]
        assert list(tail.blocks) + list(tail.after) == expected  # the encoder's own modules, in order
        own = {id(p) for module in expected for p in module.parameters()}
        assert _ids(tail) == own and own <= _ids(encoder)  # references, not copies
        assert sum(p.numel() for p in tail.parameters()) == sum(
            p.numel() for module in expected for p in module.parameters())
    # a deep copy trains apart from the encoder
    copied = copy.deepcopy(encoder.tail(1))
    assert not (_ids(copied) & _ids(encoder))


def test_vision_tail_trains_through_a_copy() -> None:
    encoder = build_vision_encoder("tiny")
    encoder.freeze()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inputs = encoder.tail_inputs(pixels, 2)
    tail = copy.deepcopy(encoder.tail(2)).requires_grad_(True)
    tail(inputs).square().mean().backward()
    assert all(p.grad is not None for p in tail.parameters())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_vision_tail_bad_n_and_unsupported_models() -> None:
    encoder = build_vision_encoder("tiny")
    pixels = torch.randn(1, 3, 32, 32)
    for n in (0, 7, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"must be 1\.\.6 \(its VisionTransformer has 6 blocks\)"):
            encoder.tail(n)
        with pytest.raises(ValueError, match=r"must be 1\.\.6"):
            encoder.tail_inputs(pixels, n)
    resnet = VisionEncoder(timm.create_model("test_resnet", num_classes=0), {"name": "test_resnet"})
    with pytest.raises(ValueError, match="timm ResNet .*supported: timm's EfficientNet class .*VisionTransformer"):
        resnet.tail(1)
    with pytest.raises(ValueError, match="timm ResNet"):
        resnet.num_blocks()
    # timm's own small EfficientNet is of the supported class
    small = VisionEncoder(timm.create_model("test_efficientnet", num_classes=0), {"name": "test_efficientnet"}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small.tail(1)(small.tail_inputs(x, 1)), small(x).tokens)


# -- text -----------------------------------------------------------------------
@pytest.mark.parametrize("name,blocks", [_param(*t) for t in TEXT])
@pytest.mark.parametrize("causal", [False, True])
def test_text_tail_of_tail_inputs_is_forward(name: str, blocks: int, causal: bool) -> None:
    encoder = build_text_encoder(name, causal=causal).eval()
    batch = _texts(encoder)
    mask = batch["attention_mask"]
    assert encoder.num_blocks() == blocks and not mask.all()  # padding in the batch
    with torch.no_grad():
        states = encoder(batch["input_ids"], mask).states  # (3, T, D)
        for n in (1, 2):
            inputs = encoder.tail_inputs(batch["input_ids"], mask, n)
            assert inputs.shape == states.shape
            torch.testing.assert_close(encoder.tail(n)(inputs, mask), states, atol=1e-5, rtol=1e-5)
        # no mask = every token real
        ids = batch["input_ids"][:1, : int(mask[0].sum())]
        full = encoder(ids, None).states
        torch.testing.assert_close(encoder.tail(1)(encoder.tail_inputs(ids, None, 1)), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,blocks", [_param(*t) for t in TEXT])
def test_text_tail_holds_the_last_layers(name: str, blocks: int) -> None:
    encoder = build_text_encoder(name)
    layers = list(encoder.model.encoder.layer)
    assert len(layers) == blocks
    for n in (1, 2):
        tail = encoder.tail(n)
        assert list(tail.layers) == layers[-n:]
        assert _ids(tail) == {id(p) for layer in layers[-n:] for p in layer.parameters()}
        assert sum(p.numel() for p in tail.parameters()) == sum(
            p.numel() for layer in layers[-n:] for p in layer.parameters())


def test_text_tail_of_a_roberta_encoder() -> None:
    tokenizer_encoder = build_text_encoder("tiny")
    tokenizer = tokenizer_encoder.tokenizer
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    encoder = TextEncoder(model_from_config(config), tokenizer, {"name": "roberta-test"}).eval()
    assert isinstance(encoder.model, RobertaModel) and encoder.num_blocks() == 3
    batch = _texts(encoder)
    with torch.no_grad():
        states = encoder(**batch).states
        inputs = encoder.tail_inputs(batch["input_ids"], batch["attention_mask"], 2)
        torch.testing.assert_close(encoder.tail(2)(inputs, batch["attention_mask"]), states, atol=1e-5, rtol=1e-5)


def test_text_tail_bad_n_and_unsupported_models() -> None:
    encoder = build_text_encoder("tiny")
    ids = torch.tensor([[101, 2054, 102]])
    for n in (0, 3, 1.0, False):
        with pytest.raises(ValueError, match=r"must be 1\.\.2 \(it has 2\)"):
            encoder.tail(n)
        with pytest.raises(ValueError, match=r"must be 1\.\.2"):
            encoder.tail_inputs(ids, None, n)
    tokenizer = encoder.tokenizer
    gpt2 = TextEncoder(GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                            n_positions=64)), tokenizer, {"name": "gpt2-test"})
    with pytest.raises(ValueError, match="GPT2Model \\(model_type 'gpt2'\\).*supported: BERT-style"):
        gpt2.tail(1)
    with pytest.raises(ValueError, match="GPT2Model"):
        gpt2.num_blocks()
