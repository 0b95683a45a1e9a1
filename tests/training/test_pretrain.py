"""ALBEF pretraining (ITC + ITM + MLM): losses go down, resume is exact, the export initialises a task.

The data is a small Karpathy-schema caption set the tests draw with PIL: coloured
shapes with two captions each ("a red circle on white", "the circle is red").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image, ImageDraw

from fusionzoo.losses import hard_negative_candidates
from fusionzoo.training.config import load_config
from fusionzoo.training.pretrain import (
    ProcessView,
    pretrain,
    pretrain_base_config,
)
from fusionzoo.training.pretrain_model import build_pretrain_model

REPO_ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle")
FUSION = ['fusion_kwargs={"dim": 32, "embed_dim": 16, "num_layers": 1, "num_heads": 2}']
QUIET = ["log_every=1", "log_with=none", "seed=0"]


def write_shapes_captions(root: Path, splits: dict[str, int] | None = None) -> Path:
    """Karpathy ``dataset_coco.json`` over 32x32 PNG shapes under ``root/images``; two captions each."""
    splits = splits or {"train": 12, "val": 4}
    combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    images, k = [], 0
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        for _ in range(count):
            colour, shape = combos[k % len(combos)]
            image = Image.new("RGB", (32, 32), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse((6, 6, 26, 26), fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle((6, 6, 26, 26), fill=COLOURS[colour])
            else:
                draw.polygon([(16, 5), (27, 27), (5, 27)], fill=COLOURS[colour])
            filename = f"shape_{k:04d}.png"
            image.save(root / "images" / filename)
            raws = [f"a {colour} {shape} on white", f"the {shape} is {colour}"]
            sentences = [{"raw": raw, "tokens": raw.split(), "imgid": k, "sentid": 2 * k + i}
                         for i, raw in enumerate(raws)]
            images.append({"filepath": "images", "filename": filename, "imgid": k, "split": split,
                           "cocoid": 1000 + k, "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
            k += 1
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _log(run: Path) -> dict[int, dict[str, float]]:
    records = map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "event" not in r}


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_captions(root)
    return root


@pytest.fixture(scope="module")
def pretrained(captions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 steps on frozen encoders (MiniLM gives captions distinct [CLS] states from the start)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    config = load_config(None, [f"data_dir={captions}", "vision=tiny", "text=minilm-l6", "freeze_encoders=true",
                                *FUSION, "batch_size=8", "max_steps=20", "lr=2e-3", "warmup_ratio=0",
                                f"output_dir={out}", *QUIET], base=pretrain_base_config())
    pretrain(config)
    return out


@pytest.mark.slow
def test_pretraining_lowers_itc_itm_and_mlm(pretrained: Path) -> None:
    log = _log(pretrained)
    assert sorted(log) == list(range(1, 21))

    def mean(steps: range, key: str) -> float:
        return sum(log[s][f"train/{key}"] for s in steps) / len(steps)

    first, last = range(1, 4), range(18, 21)
    assert mean(last, "itc") < mean(first, "itc") - 0.8  # in-batch ITC well below chance (ln 8 = 2.08)
    assert mean(last, "itc") < 2.0
    assert mean(last, "mlm") < mean(first, "mlm") - 0.3
    assert mean(last, "itm") < mean(first, "itm")
    for step in log.values():  # each loss logged on its own, with the weighted total
        assert step["train/loss"] == pytest.approx(step["train/itc"] + step["train/itm"] + step["train/mlm"], rel=1e-5)

    final = pretrained / "final"
    weights = safetensors.torch.load_file(str(final / "model.safetensors"))
    assert {k.split(".")[0] for k in weights} == {"vision", "text", "fusion", "itm", "mlm"}
    config = json.loads((final / "config.json").read_text())
    assert config["kind"] == "fusionzoo-pretraining" and config["fusion"]["name"] == "albef"
    run = json.loads((final / "run.json").read_text())
    assert run["config"]["max_steps"] == 20 and "torch" in run["versions"] and "git_commit" in run
    assert set(run["metrics"]) >= {"itc", "itm", "mlm", "itm_accuracy"}
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["latest"]["step"] == 20


@pytest.mark.slow
def test_init_from_pretraining_loads_encoders_and_fusion_into_vqa(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fusionzoo.tasks import get_task
    from fusionzoo.training.trainer import _build_model, train

    config = load_config(None, ["task=vqa", "data=easy-vqa", "fusion=albef", "vision=tiny", "text=minilm-l6",
                                "freeze_encoders=true", *FUSION, f"init_from={pretrained}", "batch_size=8",
                                "max_steps=2", "max_train_samples=16", "max_eval_samples=16",
                                f"output_dir={tmp_path / 'vqa'}", *QUIET])
    saved = safetensors.torch.load_file(str(pretrained / "final" / "model.safetensors"))
    task = get_task("vqa")
    model = _build_model(config, task, task.load_data(config), init=True)
    own = model.state_dict()
    fusion_keys = [k for k in saved if k.startswith("fusion.")]
    assert fusion_keys
    for key in fusion_keys + [k for k in saved if k.startswith(("vision.", "text."))]:
        assert torch.equal(own[key], saved[key]), key
    assert not any(k.startswith(("itm.", "mlm.")) for k in own)
    message = capsys.readouterr().out
    assert f"loaded {len(saved) - sum(k.startswith(('itm.', 'mlm.')) for k in saved)} tensors" in message
    assert "fusion" in message

    metrics = train(config)  # the whole command path: fine-tunes and exports
    assert "accuracy" in metrics
    assert (tmp_path / "vqa" / "final" / "model.safetensors").is_file()


def test_momentum_distillation_resumes_exactly(captions: Path, tmp_path: Path) -> None:
    """Run A: 8 steps, checkpoints every 4. Run B: resumes from A's step-4 checkpoint; steps 5..8 agree."""
    common = [f"data_dir={captions}", "vision=tiny", "text=tiny", "freeze_encoders=false", *FUSION,
              "batch_size=4", "max_steps=8", "lr=1e-3", "momentum_distill=true", "momentum=0.9",
              "queue_size=10", "max_eval_samples=0", "keep_last=3", *QUIET]
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(load_config(None, [*common, "save_every=4", f"output_dir={a}"], base=pretrain_base_config()))
    checkpoint = a / "checkpoints" / "step-00000004"
    shutil.copytree(checkpoint, b / "checkpoints" / checkpoint.name)
    pretrain(load_config(None, [*common, "resume=auto", f"output_dir={b}"], base=pretrain_base_config()))

    log_a, log_b = _log(a), _log(b)
    assert sorted(log_b) == [5, 6, 7, 8]  # 6 batches an epoch: resumed mid-epoch, crossed into the next
    for step in log_b:
        for key in ("loss", "itc", "itm", "mlm", "alpha"):
            assert log_b[step][f"train/{key}"] == pytest.approx(log_a[step][f"train/{key}"], rel=1e-5, abs=1e-6)
    assert log_a[8]["train/alpha"] > 0  # distillation ramped in

    final_a = safetensors.torch.load_file(str(a / "final" / "model.safetensors"))
    final_b = safetensors.torch.load_file(str(b / "final" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-6)

    # The momentum copies and the queue are training state, in the checkpoints only.
    state = safetensors.torch.load_file(str(a / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert int(state["queue_len"]) == 10 and int(state["queue_ptr"]) == (8 * 4) % 10
    assert not torch.equal(state["momentum.fusion.text_itc.weight"], state["fusion.text_itc.weight"])
    assert not any(k.startswith("momentum.") or "queue" in k for k in final_a)


def test_lora_pretraining_trains_adapters_and_exports_them_folded_in(captions: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionzoo.lora import lora_layers
    from fusionzoo.training.pretrain import PretrainRecipe

    seen = {}
    real_build = PretrainRecipe.build_model

    def build(self, config, accelerator):
        model = real_build(self, config, accelerator)
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(PretrainRecipe, "build_model", build)
    out = tmp_path / "run"
    pretrain(load_config(None, [f"data_dir={captions}", "vision=tiny", "text=tiny", *FUSION, "batch_size=4",
                                "max_steps=4", "lr=1e-2", "warmup_ratio=0", "peft=lora", "lora_targets=text",
                                "lora_r=2", "lora_alpha=4", "max_eval_samples=0", *QUIET, f"output_dir={out}"],
                         base=pretrain_base_config()))
    model, before = seen["model"], seen["before"]
    encoders = {n: p for n, p in model.named_parameters() if n.startswith(("vision.", "text."))}
    adapters = {n for n in encoders if ".lora_" in n}
    assert adapters and all(n.startswith("text.") for n in adapters)
    for name, p in encoders.items():  # only the adapters train; every base weight stays as it was
        assert p.requires_grad == (name in adapters), name
        assert name in adapters or torch.equal(p, before[name]), name
    assert all(not torch.equal(encoders[n], before[n]) for n in adapters if "lora_B" in n)  # B leaves zero

    exported = safetensors.torch.load_file(str(out / "final" / "model.safetensors"))
    assert not any(".lora_" in k or "base_layer" in k for k in exported)
    name, layer = lora_layers(model)[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(exported[f"{name}.weight"], layer.base_layer.weight + (4 / 2) * b @ a)
    config = json.loads((out / "final" / "config.json").read_text())
    assert "lora" not in config and config["lora_merged"]["r"] == 2


def test_lora_retrieval_training_saves_its_adapters(captions: Path, tmp_path: Path) -> None:
    """task=retrieval (pretraining's ITC + ITM step on a FusionModel) takes peft=lora like fine-tuning."""
    from fusionzoo.model import load_model
    from fusionzoo.training.trainer import train

    out = tmp_path / "run"
    train(load_config(None, ["task=retrieval", "data=karpathy-captions", f"data_dir={captions}", "vision=tiny",
                             "text=tiny", 'fusion_kwargs={"dim": 16, "num_layers": 1, "num_heads": 2}',
                             "fusion=merged_transformer", "align_kwargs.embed_dim=8", "batch_size=4", "max_steps=2",
                             "peft=lora", "lora_r=2", "max_eval_samples=0", *QUIET, f"output_dir={out}"]))
    assert (out / "final" / "adapters.safetensors").is_file() and not (out / "final" / "model.safetensors").exists()
    assert load_model(out / "final").config["lora"]["r"] == 2


def test_nan_loss_stops_after_saving_the_last_good_state(captions: Path, tmp_path: Path) -> None:
    import fusionzoo
    from fusionzoo.fusions.albef import AlbefFusion
    from fusionzoo.registry import FUSIONS
    from fusionzoo.training.trainer import NonFiniteLossError

    calls = {"n": 0}

    class AlbefNanFromStepThree(AlbefFusion):
        """ALBEF whose ITC embeddings turn NaN from the third step on (a step fuses three times)."""

        def forward(self, text, text_mask, image, image_mask=None, *, causal=False, cache=None):  # noqa: ANN001
            out = super().forward(text, text_mask, image, image_mask, causal=causal, cache=cache)
            if self.training:
                calls["n"] += 1
                if calls["n"] > 6:
                    out.aux["image_embed"] = out.aux["image_embed"] * float("nan")
            return out

    fusionzoo.register_fusion("albef_nan_from_step_three", override=True)(AlbefNanFromStepThree)
    try:
        config = load_config(None, [f"data_dir={captions}", "vision=tiny", "text=tiny",
                                    "fusion=albef_nan_from_step_three", *FUSION, "batch_size=4", "max_steps=6", "max_eval_samples=0",
                                    f"output_dir={tmp_path}", *QUIET], base=pretrain_base_config())
        with pytest.raises(NonFiniteLossError, match=r"loss is nan \(itc=nan.*at step 2 .*last good state was saved"):
            pretrain(config)
        progress = json.loads((tmp_path / "checkpoints" / "step-00000002" / "progress.json").read_text())
        assert progress["step"] == 2 and progress["batches_in_epoch"] == 2
    finally:
        FUSIONS.unregister("albef_nan_from_step_three")


def test_itc_is_the_symmetric_infonce_of_the_losses_module(captions: Path) -> None:
    from fusionzoo.losses import itc_loss

    config = load_config(None, ["vision=tiny", "text=tiny", *FUSION, "freeze_encoders=false"],
                         base=pretrain_base_config())
    model = build_pretrain_model(config, pretrained=False).eval()
    batch = model.text.tokenize(["a red circle", "a blue square", "the triangle is green"])
    pixels = torch.randn(3, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    masked, labels = model.mask_text(batch["input_ids"], batch["attention_mask"], generator)
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    masked_ids=masked, mlm_labels=labels, generator=generator, image_ids=torch.tensor([1, 2, 3]))
        text = model.text(batch["input_ids"], batch["attention_mask"]).states
        aux = model.fusion(text, batch["attention_mask"].bool(), model.vision(pixels).tokens).aux
    expected = itc_loss(aux["image_embed"], aux["text_embed"], aux["temperature"])
    torch.testing.assert_close(out.losses["itc"], expected)
    assert set(out.losses) == {"itc", "itm", "mlm"}


def test_hard_negatives_never_come_from_the_rows_own_image() -> None:
    sim = torch.tensor([[5.0, 9.0, 1.0, 0.0], [9.0, 5.0, 1.0, 0.0], [0.0, 1.0, 5.0, 2.0]])  # (B=3, G=4)
    image_ids = torch.tensor([7, 7, 8])
    column_ids = torch.tensor([7, 7, 8, 9])
    same = image_ids[:, None] == column_ids[None, :]
    scores = hard_negative_candidates(sim, same, torch.arange(3))
    assert torch.isinf(scores[0, 1]) and torch.isinf(scores[1, 0])  # the other caption of image 7
    assert scores[0, 0] == 5.0 and scores[2, 3] == 2.0  # the positive is left to the sampler to rule out
    all_same = hard_negative_candidates(sim[:1, :2], torch.ones(1, 2, dtype=torch.bool), torch.tensor([0]))
    assert torch.isfinite(all_same).all()  # nothing else to draw: keep the candidates


def test_process_view_gathers_with_local_gradient_and_padding() -> None:
    """Process 1 of 2: the other process (rows filled with 5) has 5 text positions, this one 3."""

    def all_gather(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 5), x])

    view = ProcessView(index=1, count=2, all_gather=all_gather, all_gather_with_grad=all_gather)
    local = torch.randn(2, 3, 4, requires_grad=True)
    everyone = view.gather(local, pad_dim=1)
    assert everyone.shape == (4, 5, 4)
    assert (everyone[:2] == 5).all() and (everyone[2:, 3:] == 0).all()
    everyone.sum().backward()
    assert torch.equal(local.grad, torch.ones_like(local))  # only the local rows carry gradient
    mask = view.gather(torch.tensor([[True, True, False]]), pad_dim=1)
    assert mask.dtype == torch.bool and mask.tolist() == [[True] * 5, [True, True, False, False, False]]


@pytest.mark.parametrize("fusion", ["albef", "attention_weighted", "co_attention", "early_concat", "late_voting",
                                    "merged_transformer"])
def test_every_fusion_pretrains_with_itc_itm_and_mlm(fusion: str) -> None:
    """A fusion without its own ITC embeddings gets an Alignment (align.*); every trainable part gets a gradient."""
    from fusionzoo.training.pretrain import _forward, row_generators

    config = load_config(None, ["vision=tiny", "text=tiny", f"fusion={fusion}", "freeze_encoders=true",
                                'fusion_kwargs={"dim": 32, "num_heads": 2}', "max_text_len=8"],
                         base=pretrain_base_config())
    torch.manual_seed(0)
    model = build_pretrain_model(config, pretrained=False).train()
    assert (model.align is None) == (fusion == "albef")
    assert model.config["align"] == (None if fusion == "albef" else model.align.config)
    batch = model.text.tokenize(["a red circle on white", "the square is blue", "a green triangle", "red"], 8)
    batch = {**batch, "pixel_values": torch.rand(4, 3, 32, 32), "image_id": torch.tensor([1, 2, 3, 1])}
    out = _forward(model, model, batch, row_generators(0, "mask", 0, 0, 0, 4), row_generators(0, "neg", 0, 0, 0, 4),
                   0.0, ProcessView())
    assert set(out.losses) == {"itc", "itm", "mlm"} and all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{fusion}: no gradient reached {missing}"
    exported = model.export_state_dict()
    assert any(k.startswith("itm.head.") for k in exported)
    assert any(k.startswith("align.") for k in exported) == (fusion != "albef")


def test_pretrain_command_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from fusionzoo.cli import main

    assert main(["pretrain", "--show-config", "max_steps=5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["task"], shown["fusion"], shown["data"], shown["max_steps"]) == ("pretrain", "albef",
                                                                                  "karpathy-captions", 5)
    assert main(["pretrain", "itc_wieght=1"]) == 2
    assert "Did you mean 'itc_weight'" in capsys.readouterr().err


def test_example_configs_load_and_cover_every_task_and_fusion() -> None:
    import fusionzoo

    configs = REPO_ROOT / "configs"
    builtin = [n for n in fusionzoo.list_fusions() if fusionzoo.FUSIONS.get(n).__module__.startswith("fusionzoo.")]
    for task in ("vqa", "captioning", "classification"):
        for fusion in builtin:
            path = configs / task / f"{fusion}.yaml"
            assert path.is_file(), f"missing example config {path}"
            config = load_config(path)
            assert (config.task, config.fusion) == (task, fusion)
    found = [p for p in configs.rglob("*.yaml") if "accelerate" not in p.relative_to(configs).parts]
    for path in found:
        load_config(path, base=pretrain_base_config() if path.name.startswith("pretrain") else None)

    # The pretraining config and the albef fine-tuning configs build the same fusion (init_from fits).
    pre = load_config(configs / "pretrain_albef_coco.yaml", base=pretrain_base_config())
    assert pre.task == "pretrain" and pre.fusion == "albef"
    for task in ("vqa", "captioning", "classification"):
        tuned = yaml.safe_load((configs / task / "albef.yaml").read_text())
        assert tuned["fusion_kwargs"] == pre.fusion_kwargs
        assert (tuned["vision"], tuned["text"]) == (pre.vision, pre.text)
