"""FusionModel, create_model, save/load, predict and generate, for every task x registered fusion.

Driven by the registries: a newly registered fusion or task is
tested here without anyone writing a new test. Tiny random encoders, tiny fusions.
"""

from __future__ import annotations

import functools
import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fusionzoo
from fusionzoo.factory import create_model
from fusionzoo.model import FusionModel, ModelOutput, load_model
from fusionzoo.model_folder import CONFIG_NAME, WEIGHTS_NAME
from fusionzoo.registry import RegistryError

FUSIONS = fusionzoo.list_fusions()
TASKS = fusionzoo.list_tasks()
VOCABULARY = {
    "vqa": {"answers": ["yes", "no", "2", "red"]},
    "classification": {"labels": ["hateful", "benign"]},
    "captioning": {},
    "retrieval": {},
}
#: Small sizes for fusions that take them (each fusion gets the ones its constructor accepts).
TINY_FUSION = {"dim": 32, "num_layers": 1, "num_heads": 2, "mlp_ratio": 2.0}
QUESTIONS = ["what colour is the ball?", "is there a dog?"]
CAPTIONS = ["a dog runs on the grass", "two red balls"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fusion_kwargs(fusion: str) -> dict[str, object]:
    params = inspect.signature(fusionzoo.FUSIONS.get(fusion)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in TINY_FUSION.items() if takes_any or k in params}


def build(task: str, fusion: str, **kwargs: object) -> FusionModel:
    torch.manual_seed(0)
    kwargs = {**VOCABULARY.get(task, {}), **kwargs}
    return create_model(task, fusion, "tiny", "tiny", pretrained=False, fusion_kwargs=tiny_fusion_kwargs(fusion), **kwargs)


@functools.lru_cache(maxsize=None)
def cached_model(task: str, fusion: str) -> FusionModel:
    """One model per (task, fusion), shared by the tests (left in eval mode; weights never change)."""
    return build(task, fusion).eval()


@functools.lru_cache(maxsize=None)
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 52), (36, 30))]


def batch(model: FusionModel, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """A training batch of two examples for ``model``'s task."""
    texts = CAPTIONS if model.head.causal else QUESTIONS
    inputs = {"pixel_values": model.vision.preprocess(images()), **model.text.tokenize(texts)}
    if with_labels and model.task == "vqa":
        inputs["labels"] = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 0.6, 0.0, 1.0]])
    elif with_labels and model.task == "classification":
        inputs["labels"] = torch.tensor([0, 1])
    elif with_labels and model.task == "retrieval":
        inputs["labels"] = torch.tensor([1, 1])  # ITM: both pairs match (the alignment's ITC needs two)
    return inputs


task_x_fusion = pytest.mark.parametrize("task,fusion", [(t, f) for t in TASKS for f in FUSIONS])
every_fusion = pytest.mark.parametrize("fusion", FUSIONS)


# -- training pass --------------------------------------------------------------------------


@task_x_fusion
def test_forward_backward_reaches_every_parameter(task: str, fusion: str) -> None:
    model = cached_model(task, fusion)
    model.zero_grad(set_to_none=True)
    inputs = batch(model)
    try:
        out = model.train()(**inputs)
    finally:
        model.eval()
    assert isinstance(out, ModelOutput)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    assert model.head.loss_name in out.losses
    aux_names = sorted(set(out.losses) - {model.head.loss_name})  # the fusion's aux_loss parts
    assert torch.allclose(out.loss, sum(out.losses.values()))
    if type(model.fusion).aux_loss is not fusionzoo.FusionModule.aux_loss:
        assert aux_names, f"{fusion} defines aux_loss but the model reported no auxiliary loss"
    out.loss.backward()

    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{task}/{fusion}: non-finite gradient in {name}"
    assert not missing, f"{task}/{fusion}: no gradient reached {missing} (aux losses: {aux_names})"


@task_x_fusion
def test_every_trainable_parameter_gets_a_gradient(task: str, fusion: str) -> None:
    """As ``create_model`` builds it by default (the fusion's own sizes, frozen encoders as
    ``fusionzoo train`` uses them), one training step reaches every trainable parameter, so
    DDP can run with ``find_unused_parameters=False``."""
    torch.manual_seed(0)
    model = create_model(task, fusion, "tiny", "tiny", pretrained=False, freeze_encoders=True,
                         **VOCABULARY[task]).train()
    model(**batch(model)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{task}/{fusion}: trainable parameters that got no gradient: {missing}"


@pytest.mark.parametrize("task", TASKS)
def test_frozen_encoders_get_no_gradients(task: str) -> None:
    model = build(task, FUSIONS[0], freeze_encoders=True).train()
    assert not model.vision.training and not model.text.training  # frozen encoders stay in eval mode
    model(**batch(model)).loss.backward()
    for name, p in [*model.vision.named_parameters(), *model.text.named_parameters()]:
        assert not p.requires_grad and p.grad is None, f"frozen encoder parameter {name} got a gradient"
    assert any(p.grad is not None for p in model.head.parameters())


def test_precomputed_encoder_states_give_the_same_logits() -> None:
    model = cached_model("vqa", FUSIONS[0])
    inputs = batch(model, with_labels=False)
    with torch.no_grad():
        direct = model(**inputs).logits
        image_states = model.vision(inputs["pixel_values"]).tokens
        text_states = model.text(inputs["input_ids"], inputs["attention_mask"]).states
        cached = model(
            image_states=image_states,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            text_states=text_states,
        )
    assert cached.loss is None and cached.losses == {}
    torch.testing.assert_close(cached.logits, direct)


@every_fusion
def test_padding_in_the_question_does_not_change_vqa_logits(fusion: str) -> None:
    model = cached_model("vqa", fusion)
    tokens = model.text.tokenize(["what colour is the ball?"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    padded_ids = torch.cat([ids, torch.full((1, 5), model.text.pad_token_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 5, dtype=mask.dtype)], dim=1)
    pixel_values = model.vision.preprocess(images()[:1])
    with torch.no_grad():
        short = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits
        padded = model(pixel_values=pixel_values, input_ids=padded_ids, attention_mask=padded_mask).logits
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-4)


@every_fusion
def test_future_caption_tokens_do_not_change_earlier_logits(fusion: str) -> None:
    model = cached_model("captioning", fusion)
    inputs = batch(model)
    ids = inputs["input_ids"]
    cut = 3
    changed = ids.clone()
    changed[:, cut:] = torch.randint(1000, 2000, changed[:, cut:].shape, generator=torch.Generator().manual_seed(0))
    other_image = inputs["pixel_values"].flip(0)
    with torch.no_grad():
        logits = model(**inputs).logits
        future = model(**{**inputs, "input_ids": changed}).logits
        swapped = model(**{**inputs, "pixel_values": other_image}).logits
    torch.testing.assert_close(future[:, :cut], logits[:, :cut], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(future[:, cut:], logits[:, cut:])
    assert not torch.allclose(swapped, logits), f"{fusion}: the caption ignores the image"


# -- generation -----------------------------------------------------------------------------


@every_fusion
def test_generate_with_and_without_cache_agree(fusion: str) -> None:
    model = cached_model("captioning", fusion)
    for num_beams in (1, 3):
        cached = model.generate(images(), max_new_tokens=5, num_beams=num_beams, use_cache=True)
        recomputed = model.generate(images(), max_new_tokens=5, num_beams=num_beams, use_cache=False)
        assert cached == recomputed, f"{fusion}, {num_beams} beams"
        assert len(cached) == 2 and all(isinstance(c, str) for c in cached)
    assert not model.training  # the caller's mode is restored


def test_generate_ids_layout_and_beam_scores() -> None:
    model = cached_model("captioning", FUSIONS[0])
    pixel_values = model.vision.preprocess(images())
    greedy = model.generate_ids(pixel_values, max_new_tokens=4)
    assert greedy.dtype == torch.long and greedy.shape[0] == 2 and greedy.shape[1] <= 5
    assert (greedy[:, 0] == model.text.bos_token_id).all()
    assert torch.equal(model.generate_ids(pixel_values, max_new_tokens=4, num_beams=1, use_cache=False), greedy)
    # Over two steps the greedy path is always among the beam candidates, so the best of
    # three beams (ranked by the plain sum of log-probabilities) scores at least as well.
    greedy = model.generate_ids(pixel_values, max_new_tokens=2)
    beams = model.generate_ids(pixel_values, max_new_tokens=2, num_beams=3, length_penalty=0.0)

    def log_prob(ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, L)
        ended = torch.cumsum((ids[:, 1:] == model.text.eos_token_id).long(), dim=1)
        keep = (ended == 0) | ((ended == 1) & (ids[:, 1:] == model.text.eos_token_id))  # up to the first EOS
        return (lp * keep).sum(-1)

    assert (log_prob(beams) >= log_prob(greedy) - 1e-4).all()


def test_inference_methods_fit_the_task() -> None:
    with pytest.raises(TypeError, match="use generate"):
        cached_model("captioning", FUSIONS[0]).predict(images(), ["x", "y"])
    with pytest.raises(TypeError, match="use predict"):
        cached_model("vqa", FUSIONS[0]).generate(images())
    vqa = cached_model("vqa", FUSIONS[0])
    with pytest.raises(ValueError, match="one text per image"):
        vqa.predict(images(), ["only one"])
    answers = vqa.predict(images(), QUESTIONS)
    assert len(answers) == 2 and set(answers) <= set(VOCABULARY["vqa"]["answers"])


# -- save / load ----------------------------------------------------------------------------


@task_x_fusion
def test_save_load_round_trip(task: str, fusion: str, tmp_path) -> None:
    model = cached_model(task, fusion)
    folder = model.save_pretrained(tmp_path / "model")
    # README.md: the model card
    assert {p.name for p in folder.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, "text_encoder", "tokenizer", "README.md"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folders left behind
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["fusionzoo_version"] == fusionzoo.__version__
    assert config["task"] == task and config["fusion"]["name"] == fusion

    loaded = load_model(folder)
    assert not loaded.training
    inputs = batch(model, with_labels=False)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    if model.head.causal:
        assert loaded.generate(images(), max_new_tokens=4) == model.generate(images(), max_new_tokens=4)
    else:
        assert loaded.predict(images(), QUESTIONS) == model.predict(images(), QUESTIONS)


def test_save_replaces_an_old_model_and_keeps_other_files(tmp_path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    build("classification", FUSIONS[0]).save_pretrained(folder)
    build("vqa", FUSIONS[0]).save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert load_model(folder).task == "vqa"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_crash_while_saving_leaves_the_old_model(tmp_path, monkeypatch) -> None:
    folder = build("vqa", FUSIONS[0]).save_pretrained(tmp_path / "model")
    before = (folder / WEIGHTS_NAME).read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("fusionzoo.model_folder.safetensors.torch.save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        build("vqa", FUSIONS[-1]).save_pretrained(folder)
    with pytest.raises(OSError, match="disk full"):
        build("vqa", FUSIONS[-1]).save_pretrained(tmp_path / "new")
    assert (folder / WEIGHTS_NAME).read_bytes() == before
    assert load_model(folder).config["fusion"]["name"] == FUSIONS[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_frozen_flag_survives_a_round_trip(tmp_path) -> None:
    folder = build("vqa", FUSIONS[0], freeze_encoders=True).save_pretrained(tmp_path / "m")
    loaded = load_model(folder).train()
    assert loaded.vision.frozen and loaded.text.frozen
    assert not any(p.requires_grad for p in loaded.text.parameters())


def test_load_errors_name_the_file_and_key(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    folder = build("vqa", FUSIONS[0]).save_pretrained(tmp_path / "m")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["fusion"]["name"] = "no_such_fusion"
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(RegistryError, match=r"config\.json: key 'fusion\.name' names fusion 'no_such_fusion'"):
        load_model(folder)
    del config["fusion"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing key 'fusion.name'"):
        load_model(folder)


@task_x_fusion
def test_the_fusion_is_built_for_what_the_head_reads(task: str, fusion: str) -> None:
    model = cached_model(task, fusion)
    fusion_config = model.config["fusion"]["config"]
    if type(model.fusion).supports_head_reads:
        assert fusion_config["head_reads"] == type(model.head).reads, "create_model passes what the head reads"
    else:
        assert "head_reads" not in fusion_config, "a fusion without supports_head_reads is not told"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fusion", [f for f in FUSIONS if fusionzoo.FUSIONS.get(f).supports_head_reads])
def test_a_checkpoint_saved_before_head_reads_still_loads(task: str, fusion: str, tmp_path) -> None:
    """A config.json without ``head_reads`` (saved before it existed) rebuilds the whole fusion."""
    kwargs = {**VOCABULARY[task], "fusion_kwargs": {**tiny_fusion_kwargs(fusion), "head_reads": "all"}}
    torch.manual_seed(0)
    model = create_model(task, fusion, "tiny", "tiny", pretrained=False, **kwargs).eval()
    folder = model.save_pretrained(tmp_path / "old")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["fusion"]["config"]["head_reads"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_model(folder)  # loads the weights strictly
    assert loaded.fusion.config["head_reads"] == "all"
    inputs = batch(model, with_labels=False)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


# -- create_model errors --------------------------------------------------------------------


def test_create_model_errors_are_clear() -> None:
    with pytest.raises(RegistryError, match="unknown task 'vqa2'.*Did you mean 'vqa'"):
        create_model("vqa2", FUSIONS[0], pretrained=False, answers=["yes"])
    with pytest.raises(RegistryError, match="unknown fusion 'early'"):
        create_model("vqa", "early", pretrained=False, answers=["yes"])
    with pytest.raises(ValueError, match=r"task 'vqa' needs answers=\[\.\.\.\]"):
        create_model("vqa", FUSIONS[0], pretrained=False)
    with pytest.raises(ValueError, match="takes labels=.*not answers="):
        create_model("classification", FUSIONS[0], pretrained=False, answers=["a"])
    with pytest.raises(ValueError, match="takes no output vocabulary"):
        create_model("captioning", FUSIONS[0], pretrained=False, labels=["a"])
    with pytest.raises(ValueError, match="must not be empty"):
        create_model("classification", FUSIONS[0], pretrained=False, labels=[])
    with pytest.raises(ValueError, match=r"duplicates \['no'\]"):
        create_model("vqa", FUSIONS[0], pretrained=False, answers=["yes", "no", "no"])
    with pytest.raises(TypeError, match="strings only"):
        create_model("vqa", FUSIONS[0], pretrained=False, answers=["yes", 2])
    with pytest.raises(TypeError, match="list of strings"):
        create_model("vqa", FUSIONS[0], pretrained=False, answers="yes")
    with pytest.raises(ValueError, match=r"head_reads='text_tokens' would leave out what the VQAHead reads"):
        create_model("vqa", "early_concat", pretrained=False, answers=["yes"],
                     fusion_kwargs={"head_reads": "text_tokens"})


def test_a_vit_with_register_tokens_gets_a_fusion_position_table_that_fits() -> None:
    """DINOv2 with registers at 224 px: 16 x 16 patches + a class and 4 register tokens = 261 image tokens,
    more than merged_transformer's default table of 256 positions."""
    vit = {"name": "vit_small_patch14_reg4_dinov2", "kwargs": {"img_size": 224, "depth": 1}}
    model = create_model("vqa", "merged_transformer", vision=vit, text="tiny", pretrained=False, answers=["a", "b"],
                         fusion_kwargs={"dim": 16, "num_layers": 1})
    assert model.vision.num_tokens() == 16 * 16 + 1 + 4
    assert model.fusion.max_image_tokens == 261 and model.fusion.config["max_image_tokens"] == 261
    batch = model.text.tokenize(["what?"], max_length=8)
    logits = model(pixel_values=torch.zeros(1, 3, 224, 224), **batch).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    small = create_model("vqa", "merged_transformer", pretrained=False, answers=["a", "b"], fusion_kwargs={"dim": 16})
    assert small.fusion.max_image_tokens == 256  # the default where the tokens fit
    given = create_model("vqa", "merged_transformer", vision=vit, text="tiny", pretrained=False, answers=["a", "b"],
                         fusion_kwargs={"dim": 16, "num_layers": 1, "max_image_tokens": 300})
    assert given.fusion.max_image_tokens == 300  # a value the user gives is kept
