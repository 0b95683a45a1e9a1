"""Where a model looks (fusionzoo.explain, fusionzoo.rollout, `fusionzoo explain`).

The headline check: a merged_transformer trained on easy-VQA colour questions, asked "what
color is the shape?", puts most of its map on the shape, against shape masks computed here
from the easy-VQA images (plain shapes on a near-uniform background), by attention rollout
and by input x gradient alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fusionzoo
from fusionzoo.explain import GRADIENT, ROLLOUT, crop_box, explain
from fusionzoo.layers import Attention
from fusionzoo.rollout import record_attention

GRID_VISION = {"preset": "tiny", "kwargs": {"img_size": 64, "patch_size": 8}}  # 8x8 patches and [CLS]
QUESTION = "what color is the shape?"


def shape_mask(image: Image.Image) -> np.ndarray:
    """(H, W) True on the shape: pixels far from the background colour (the image's median colour)."""
    x = np.asarray(image.convert("RGB")).astype(int)
    background = np.median(x.reshape(-1, 3), axis=0)
    return np.abs(x - background).sum(axis=-1) > 60


@pytest.fixture(scope="module")
def colour_model() -> fusionzoo.FusionModel:
    """merged_transformer on frozen 8x8-grid tiny-ViT tokens, 300 steps on 1,500 easy-VQA colour questions."""
    import easy_vqa

    torch.manual_seed(0)
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    train = [(q, a, i) for q, a, i in zip(questions, answers, image_ids) if "color" in q][:1500]
    colours = sorted({a for _, a, _ in train})
    model = fusionzoo.create_model("vqa", "merged_transformer", vision=GRID_VISION, text="tiny", pretrained=False,
                                   answers=colours, freeze_encoders=True, fusion_kwargs={"dim": 64})
    with torch.no_grad():
        tokens = model.vision(model.vision.preprocess([Image.open(paths[i]) for _, _, i in train])).tokens
    batch = model.text.tokenize([q for q, _, _ in train], max_length=16)
    targets = torch.nn.functional.one_hot(torch.tensor([colours.index(a) for _, a, _ in train]), len(colours)).float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = torch.randint(len(train), (32,), generator=generator)
        loss = model(image_states=tokens[rows], input_ids=batch["input_ids"][rows],
                     attention_mask=batch["attention_mask"][rows], labels=targets[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("method, name", [("auto", ROLLOUT), ("gradient", GRADIENT)])
def test_colour_question_map_weighs_the_shape(colour_model, method: str, name: str) -> None:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picked = [(a, i) for q, a, i in zip(questions, answers, image_ids) if q == QUESTION][:30]
    shares, areas, right = [], [], 0
    for answer, i in picked:
        image = Image.open(paths[i]).convert("RGB")
        explanation = explain(colour_model, image, QUESTION, method=method)
        assert explanation.method == name and explanation.maps.shape == (1, 8, 8)
        heat, mask = explanation.heatmap(0), shape_mask(image)
        assert heat.shape == mask.shape and heat.sum() == pytest.approx(1.0, abs=1e-4)
        shares.append(float(heat[mask].sum()))
        areas.append(float(mask.mean()))
        right += explanation.answer == answer
    shares_, areas_ = np.array(shares), np.array(areas)
    assert right >= 0.9 * len(picked)  # it reads the colour, so the map has something to show
    assert np.median(shares_) > 0.5, shares  # most of the weight on the shape's pixels ...
    assert areas_.mean() < 0.15  # ... which cover a small part of the image
    assert (shares_ > 3 * areas_).mean() >= 0.9, list(zip(shares, areas))


def test_recorded_attention_reproduces_the_layer() -> None:
    """The recorded probabilities, applied to the values, give the module's own output (one head)."""
    torch.manual_seed(0)
    attention = Attention(8, 1, context_dim=6)
    x, context = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])[:, None, None, :]
    with record_attention(attention) as recorded:
        out = attention(x, context, mask)
    probs = recorded[attention]  # (2, 3, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert float(probs[1][:, [2, 4]].abs().max()) == 0.0
    assert torch.allclose(attention.out(probs @ attention.v(context)), out, atol=1e-5)


def test_merged_rollout_equals_the_product_of_layers() -> None:
    """merged_transformer's rollout = prod_l (A_l + I) / 2 over [image; text], from text position 0."""
    torch.manual_seed(0)
    model = fusionzoo.create_model("vqa", "merged_transformer", vision=GRID_VISION, text="tiny", pretrained=False,
                                   answers=["a", "b"], fusion_kwargs={"dim": 32, "num_layers": 3}).eval()
    fusion = model.fusion
    text, mask, image = torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool), torch.randn(1, 65, 64)
    with torch.no_grad(), record_attention(fusion) as recorded:
        fusion(text, mask, image)
    relevance = fusion.attention_rollout(recorded, mask)
    expected = torch.eye(69)
    for layer in fusion.layers:
        expected = (recorded[layer.self_attn][0] + torch.eye(69)) / 2 @ expected
    assert torch.allclose(relevance.pooled[0], expected[65, :65], atol=1e-6)
    assert torch.allclose(relevance.text_tokens[0], expected[65:, :65], atol=1e-6)


def test_crop_box_follows_the_eval_transform() -> None:
    """Pixels of the preprocessed image come from where crop_box says (an image coding x and y in R and G)."""
    vision = fusionzoo.encoders.build_vision_encoder(GRID_VISION, pretrained=False)
    width, height = 120, 80
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    coded = Image.fromarray(np.stack([xs * 2, ys * 3, np.zeros_like(xs)], axis=-1).astype(np.uint8))
    pixels = vision.preprocess([coded])[0]  # (3, 64, 64), normalised with mean = std = 0.5
    seen = (pixels * 0.5 + 0.5) * 255
    left, top, right, bottom = crop_box((width, height), vision.data_config)
    u = np.arange(64)
    for k in (5, 32, 58):  # a few rows / columns away from the antialiased border
        x_expected = left + (u + 0.5) * (right - left) / 64 - 0.5
        assert np.abs(seen[0, k].numpy() / 2 - x_expected)[4:-4].max() < 1.0
        y_expected = top + (u + 0.5) * (bottom - top) / 64 - 0.5
        assert np.abs(seen[1, :, k].numpy() / 3 - y_expected)[4:-4].max() < 1.0


@pytest.mark.parametrize("fusion", sorted(fusionzoo.list_fusions()))
@pytest.mark.parametrize("task", ["vqa", "captioning"])
def test_every_fusion_explains(task: str, fusion: str) -> None:
    """Each fusion gives one map per target over the patch grid, by rollout exactly where it has one."""
    torch.manual_seed(0)
    extra = {"answers": ["a", "b"]} if task == "vqa" else {}
    model = fusionzoo.create_model(task, fusion, vision=GRID_VISION, text="tiny", pretrained=False,
                                   fusion_kwargs={"dim": 32}, **extra)
    model.train()
    explanation = model.explain(Image.new("RGB", (70, 64), (240, 240, 240)), "what?" if task == "vqa" else None,
                                max_new_tokens=3)
    assert model.training and model.fusion.training  # modes restored
    assert explanation.method == (ROLLOUT if hasattr(model.fusion, "attention_rollout") else GRADIENT)
    assert explanation.fusion == fusion
    assert explanation.maps.shape == (len(explanation.targets), 8, 8)
    assert torch.allclose(explanation.maps.sum(dim=(1, 2)), torch.ones(len(explanation.targets)), atol=1e-5)
    if task == "captioning":
        assert 1 <= len(explanation.targets) <= 3


def _tiny_captioner() -> fusionzoo.FusionModel:
    torch.manual_seed(0)
    return fusionzoo.create_model("captioning", "merged_transformer", vision=GRID_VISION, text="tiny",
                                  pretrained=False, fusion_kwargs={"dim": 32}).eval()


def test_the_caption_is_the_one_generate_writes(monkeypatch) -> None:
    """The caption reads as model.generate (and predict) decode it, not as its tokens joined."""
    model = _tiny_captioner()
    words = model.text.tokenizer("the ocean. it's", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[model.text.tokenizer.cls_token_id, *words, model.text.eos_token_id]])
    monkeypatch.setattr(model, "generate_ids", lambda *args, **kwargs: ids)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    explanation = model.explain(image)
    assert explanation.targets == model.text.tokenizer.convert_ids_to_tokens(words)
    assert explanation.answer == model.generate([image])[0]
    assert explanation.answer != " ".join(explanation.targets)  # "the ocean ." was printed before


def test_explain_command_decodes_as_predict(tmp_path, capsys) -> None:
    """Decoding keys after RUN reach the caption: the one printed is model.generate's with those keys."""
    from fusionzoo.cli import main

    model = _tiny_captioner()
    model.save_pretrained(tmp_path / "model")
    image = Image.new("RGB", (64, 64), (30, 200, 30))
    image.save(tmp_path / "green.png")
    out = tmp_path / "words.png"
    assert main(["explain", str(tmp_path / "model"), "num_beams=2", "max_new_tokens=4", "--image",
                 str(tmp_path / "green.png"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == model.generate([image], num_beams=2, max_new_tokens=4)[0]
    assert main(["explain", str(tmp_path / "model"), "beams=2", "--image", str(tmp_path / "green.png"),
                 "--out", str(out)]) == 2
    assert "fusionzoo explain takes the decoding keys" in capsys.readouterr().err


def test_attention_method_needs_a_fusion_with_attention() -> None:
    model = fusionzoo.create_model("vqa", "early_concat", pretrained=False, answers=["a"])
    with pytest.raises(ValueError, match="no attention over image tokens"):
        model.explain(Image.new("RGB", (32, 32)), "what?", method="attention")
    with pytest.raises(ValueError, match="pass question="):
        model.explain(Image.new("RGB", (32, 32)))


def test_explain_command_writes_a_png(colour_model, tmp_path, capsys) -> None:
    import easy_vqa

    from fusionzoo.cli import main

    colour_model.save_pretrained(tmp_path / "model")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    i = next(i for q, i in zip(questions, image_ids) if q == QUESTION)
    image_path = easy_vqa.get_test_image_paths()[i]
    out = tmp_path / "map.png"
    assert main(["explain", str(tmp_path / "model"), "--image", image_path, "--question", QUESTION,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == colour_model.explain(Image.open(image_path), QUESTION).answer
    assert "attention rollout" in printed.err
    figure = Image.open(out)
    assert figure.format == "PNG" and figure.size[0] > 100
    assert main(["explain", str(tmp_path / "model"), "--image", str(tmp_path / "none.png"), "--question", "q",
                 "--out", str(out)]) == 2
    assert "cannot read the image" in capsys.readouterr().err
