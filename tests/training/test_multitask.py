"""Several tasks in one model (``task=vqa+captioning``): the batch schedule, the shared model, its folder, a run.

Two processes against one: test_distributed.py (``EQUAL_MULTITASK``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from fusionzoo.errors import ConfigError, ModelFolderError
from fusionzoo.model import load_model
from fusionzoo.multitask import create_multitask_model, load_multitask_model, split_tasks
from fusionzoo.registry import RegistryError
from fusionzoo.training.config import load_config
from fusionzoo.training.multitask import TaskMixture, parse_task_weights, task_configs

from fixtures import train_log, write_karpathy_captions, write_vqa_jsonl

ANSWERS = ["red", "green", "blue"]


# -- names, weights, per-task configs ---------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("vqa+vqa", "more than once"), ("vqa", "two or more"), ("vqa++captioning", "empty task name"),
])
def test_split_tasks_refuses_bad_combinations(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_tasks(spec)


def test_split_tasks_names_the_closest_registered_task() -> None:
    assert split_tasks("vqa+captioning") == ["vqa", "captioning"]
    with pytest.raises(RegistryError, match="captioning"):
        split_tasks("vqa+captionin")


def test_task_weights() -> None:
    tasks = ["vqa", "captioning"]
    assert parse_task_weights("proportional", tasks) is None
    assert parse_task_weights("vqa:1, captioning:3", tasks) == {"vqa": 1.0, "captioning": 3.0}
    for bad in ("vqa:1", "vqa:1,captioning:0", "vqa:1,captioning:x", "vqa:1,caption:2", "vqa:1,vqa:2,captioning:1"):
        with pytest.raises(ConfigError, match="task_weights"):
            parse_task_weights(bad, tasks)


def test_task_configs_give_each_task_its_data() -> None:
    base = ["task=vqa+captioning", "data=vqa-jsonl+karpathy-captions", "data_dir=/d", "head_kwargs.dropout=0.2",
            "task_data.captioning={data_dir: /c, max_eval_samples: 5, head_kwargs: {dropout: 0.0}}"]
    configs = task_configs(load_config(None, base))
    assert list(configs) == ["vqa", "captioning"]
    vqa, cap = configs["vqa"], configs["captioning"]
    assert (vqa.task, vqa.data, vqa.data_dir, vqa.max_eval_samples) == ("vqa", "vqa-jsonl", "/d", None)
    assert (cap.task, cap.data, cap.data_dir, cap.max_eval_samples) == ("captioning", "karpathy-captions", "/c", 5)
    assert vqa.head_kwargs == {"dropout": 0.2} and cap.head_kwargs == {"dropout": 0.0}
    one = task_configs(load_config(None, ["task=vqa+classification", "data=mine"]))
    assert [c.data for c in one.values()] == ["mine", "mine"]
    for overrides, key in ((["data=a+b+c"], "'data'"), (["task_data.retrieval={data: x}"], "task_data.retrieval"),
                           (["task_data.vqa={lr: 1}"], "task_data.vqa.lr"),
                           (["task_data.vqa={max_eval_samples: many}"], "max_eval_samples")):
        with pytest.raises(ConfigError, match=key):
            task_configs(load_config(None, ["task=vqa+captioning", *overrides]))


# -- the batch schedule ------------------------------------------------------------------------


class _Loader:
    """Batches ``(name, epoch, i)``: what a seeded loader gives in each epoch, ``i`` in a per-epoch order."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n, self.epoch = name, n, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        return iter([(self.name, self.epoch, i) for i in order])


def _skip(loader: _Loader, n: int):
    return list(loader)[n:]


def _mixture(weights=None, seed=0, counts=(("vqa", 7), ("captioning", 3))) -> TaskMixture:
    return TaskMixture({name: _Loader(name, n) for name, n in counts}, weights, seed, _skip)


def test_proportional_schedule_takes_every_batch_once_in_a_seeded_order() -> None:
    mixture = _mixture()
    assert len(mixture) == 10
    orders = []
    for epoch in range(3):
        mixture.set_epoch(epoch)
        batches = list(mixture)
        assert Counter(task for task, _ in batches) == {"vqa": 7, "captioning": 3}
        for task, batch in batches:
            assert batch[0] == task and batch[1] == epoch  # the task's own loader, in this epoch's order
        assert sorted(b[2] for t, b in batches if t == "vqa") == list(range(7))  # each batch once
        orders.append([task for task, _ in batches])
    assert len({tuple(o) for o in orders}) > 1  # the order changes with the epoch
    assert _mixture().schedule(1) == orders[1]  # and depends on the seed and epoch alone
    assert _mixture(seed=5).schedule(1) != orders[1]


def test_weighted_schedule_draws_tasks_by_weight_and_restarts_a_loader() -> None:
    mixture = _mixture({"vqa": 1.0, "captioning": 3.0}, counts=(("vqa", 2000), ("captioning", 2000)))
    drawn = Counter(mixture.schedule(0))
    share = drawn["captioning"] / len(mixture)  # binomial: sd = sqrt(0.75 * 0.25 / 4000) = 0.0068
    assert abs(share - 0.75) < 5 * 0.0068, drawn
    small = _mixture({"vqa": 1.0, "captioning": 9.0}, counts=(("vqa", 6), ("captioning", 2)))
    batches = list(small)
    captions = [b for t, b in batches if t == "captioning"]
    assert len(captions) > 2  # more than its loader has: it started again, in another order
    assert [b[1] for b in captions[:2]] == [0, 0] and captions[2][1] != 0
    assert sorted(b[2] for b in captions[:2]) == [0, 1]


@pytest.mark.parametrize("weights", [None, {"vqa": 1.0, "captioning": 4.0}])
def test_a_resumed_epoch_continues_with_the_same_batches(weights) -> None:
    full = _mixture(weights)
    full.set_epoch(2)
    whole = list(full)
    for done in (0, 1, 4, 9):
        resumed = _mixture(weights)
        resumed.set_epoch(2)
        assert list(resumed.skipping(done)) == whole[done:], done


# -- the shared model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_multitask_model("vqa+captioning", "co_attention", "tiny", "tiny", vocabularies={"vqa": ANSWERS},
                                  fusion_kwargs={"dim": 16}, max_text_len=8)


def _vqa_batch(model, n: int = 3) -> dict:
    tokens = model.text.tokenize(["what colour?"] * n, max_length=8)
    labels = torch.zeros(n, len(ANSWERS))
    labels[:, 0] = 1.0
    return {"pixel_values": torch.randn(n, 3, 32, 32), **tokens, "labels": labels}


def test_the_tasks_share_encoders_and_fusion_and_count_each_parameter_once(model) -> None:
    vqa, cap = model.model("vqa"), model.model("captioning")
    assert model.tasks == ["vqa", "captioning"]
    for part in ("vision", "text", "fusion"):
        assert getattr(vqa, part) is getattr(cap, part) is getattr(model, part)
    assert model.text.causal  # captioning writes text, so the one text encoder is causal
    assert vqa.config["task"] == "vqa" and vqa.config["answers"] == ANSWERS and cap.vocabulary is None
    own = {id(p) for m in (vqa, cap) for p in m.parameters()}
    assert len(list(model.parameters())) == len(own)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"vision", "text", "fusion", "heads"}
    with pytest.raises(KeyError, match="captioning"):
        model.model("classification")


def test_a_step_on_one_task_moves_the_shared_fusion_not_the_other_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    multi = create_multitask_model(["captioning", "vqa"], "merged_transformer", "tiny", "tiny",
                                   vocabularies={"vqa": ANSWERS}, fusion_kwargs={"dim": 16, "num_layers": 1})
    before = {n: p.detach().clone() for n, p in multi.named_parameters()}
    out = multi("vqa", **_vqa_batch(multi))
    out.loss.backward()
    torch.optim.SGD(multi.parameters(), lr=0.1).step()
    moved = {n.split(".")[0] if not n.startswith("heads.") else ".".join(n.split(".")[:2])
             for n, p in multi.named_parameters() if not torch.equal(p, before[n])}
    assert {"fusion", "heads.vqa"} <= moved and "heads.captioning" not in moved
    multi.train(False)
    assert not multi.model("vqa").training and not multi.model("captioning").fusion.training


def test_building_refuses_what_cannot_share_a_model() -> None:
    with pytest.raises(ValueError, match="retrieval"):
        create_multitask_model("vqa+retrieval", "co_attention", vocabularies={"vqa": ANSWERS})
    with pytest.raises(ValueError, match="classification"):
        create_multitask_model("vqa+captioning", "co_attention", vocabularies={"vqa": ANSWERS, "classification": ["a"]})
    with pytest.raises(ValueError, match="answers"):
        create_multitask_model("vqa+captioning", "co_attention")


def test_saved_folder_loads_as_one_model_and_each_task_alone(model, tmp_path: Path) -> None:
    model.eval()
    folder = model.save_pretrained(tmp_path / "multi")
    assert sorted(p.name for p in folder.iterdir()) == ["captioning", "multitask.json", "vqa"]
    loaded = load_multitask_model(folder)
    assert loaded.tasks == model.tasks
    for part in ("vision", "text", "fusion"):
        assert getattr(loaded.model("vqa"), part) is getattr(loaded.model("captioning"), part)
    batch = {k: v for k, v in _vqa_batch(model).items() if k != "labels"}
    with torch.no_grad():
        expected = model("vqa", **batch).logits
        assert torch.equal(loaded("vqa", **batch).logits, expected)
        alone = load_model(folder / "vqa")
        assert torch.equal(alone(**batch).logits, expected)
    images = [torch.rand(3, 32, 32) for _ in range(2)]
    from torchvision.transforms.functional import to_pil_image

    pil = [to_pil_image(im) for im in images]
    assert loaded.model("captioning").generate(pil, max_new_tokens=4) == model.model("captioning").generate(
        pil, max_new_tokens=4)
    assert loaded.model("vqa").predict(pil, ["what?", "which?"]) == model.model("vqa").predict(pil, ["what?", "which?"])
    with pytest.raises(ModelFolderError, match="multi-task"):
        load_model(folder)


def test_a_bad_multitask_folder_is_an_error_naming_what(model, tmp_path: Path) -> None:
    folder = model.save_pretrained(tmp_path / "multi")
    spec = json.loads((folder / "multitask.json").read_text())
    (folder / "multitask.json").write_text(json.dumps({**spec, "tasks": ["vqa"]}))
    with pytest.raises(ModelFolderError, match="'tasks'"):
        load_multitask_model(folder)
    (folder / "multitask.json").write_text(json.dumps({**spec, "tasks": ["vqa", "classification"]}))
    with pytest.raises(ModelFolderError, match="classification"):
        load_multitask_model(folder)
    (folder / "multitask.json").write_text(json.dumps(spec))
    changed = load_model(folder / "captioning")
    with torch.no_grad():
        next(changed.fusion.parameters()).add_(1.0)
    changed.save_pretrained(folder / "captioning")
    with pytest.raises(ModelFolderError, match="fusion differs"):
        load_multitask_model(folder)


# -- a run -------------------------------------------------------------------------------------


def _run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["task=vqa+captioning", "fusion=co_attention", "data=vqa-jsonl+karpathy-captions",
            f"task_data.vqa={{data_dir: {data / 'vqa'}}}", f"task_data.captioning={{data_dir: {data / 'cap'}}}",
            "vision=tiny", "text=tiny", "log_with=none", "log_every=1", "fusion_kwargs.dim=16", "batch_size=8",
            "max_text_len=12", "epochs=2", "lr=1e-3", "max_new_tokens=5", "save_every=4", "keep_last=10",
            "seed=2", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    from fusionzoo.training.trainer import train

    root = tmp_path_factory.mktemp("multitask")
    write_vqa_jsonl(root / "data" / "vqa", {"train": 48, "test": 11})
    write_karpathy_captions(root / "data" / "cap", {"train": 20, "test": 4})  # 40 captions: 5 batches
    final = train(load_config(None, _run_args(root / "data", root / "run")))
    return root / "data", root / "run", final


def test_a_run_trains_both_tasks_and_saves_a_model_for_each(run) -> None:
    data, out, final = run
    assert final["step"] == 22  # 2 epochs of 6 + 5 batches
    assert final["vqa/num_samples"] == 11 and final["captioning/num_samples"] == 4
    assert "vqa/accuracy" in final and "captioning/CIDEr" in final
    log = train_log(out)
    tasks = Counter("vqa" if "train/vqa" in r else "captioning" for r in log.values())
    assert tasks == {"vqa": 12, "captioning": 10}
    for record in log.values():  # one task a step: the loss logged is that task's
        task = "vqa" if "train/vqa" in record else "captioning"
        assert record["train/loss"] == pytest.approx(record[f"train/{task}"])
    saved = load_multitask_model(out / "final")
    assert saved.tasks == ["vqa", "captioning"]
    run_json = json.loads((out / "final" / "run.json").read_text())
    assert run_json["metrics"]["vqa/accuracy"] == final["vqa/accuracy"]


def test_eval_of_a_multitask_run_scores_every_task_like_the_run(run, capsys: pytest.CaptureFixture[str]) -> None:
    from fusionzoo.cli import main as fusionzoo

    data, out, final = run
    assert fusionzoo(["eval", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("vqa/accuracy", "vqa/loss", "captioning/CIDEr", "captioning/Bleu_4"):
        assert scores[key] == pytest.approx(final[key], rel=1e-6), key
    assert fusionzoo(["eval", str(out / "final" / "vqa")]) == 0  # one task's folder, with its own data
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["accuracy"] == pytest.approx(final["vqa/accuracy"])
    assert fusionzoo(["eval", str(out), f"results={out / 'r.json'}"]) == 2
    assert "one results file per task" in capsys.readouterr().err


def test_predict_on_each_task_of_a_multitask_run(run, capsys: pytest.CaptureFixture[str]) -> None:
    from fusionzoo.cli import main as fusionzoo

    data, out, final = run
    image = str(next((data / "vqa" / "images").iterdir()))
    assert fusionzoo(["predict", str(out / "final" / "vqa"), "--image", image, "--question", "what colour?"]) == 0
    from fixtures import COLOURS

    assert capsys.readouterr().out.strip().splitlines()[-1] in COLOURS  # an answer of the training data
    assert fusionzoo(["predict", str(out / "final" / "captioning"), "max_new_tokens=4", "--image", image]) == 0
    assert capsys.readouterr().out.strip()
    assert fusionzoo(["predict", str(out), "--image", image]) == 2
    assert "multi-task run" in capsys.readouterr().err


def test_a_resumed_multitask_run_continues_step_for_step(run, tmp_path: Path) -> None:
    from fusionzoo.training.trainer import train

    data, out, final = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    for later in ("step-00000012", "step-00000016", "step-00000020", "step-00000022"):
        shutil.rmtree(resumed / "checkpoints" / later)
    lines = (resumed / "train_log.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= 8 or "event" in json.loads(line)]
    (resumed / "train_log.jsonl").write_text("\n".join(kept) + "\n")
    again = train(load_config(None, [*_run_args(data, resumed), "resume=auto"]))  # from step 8, mid-epoch 0
    one, two = train_log(out), train_log(resumed)
    assert sorted(two) == list(range(1, 23))
    for step in range(9, 23):
        assert set(two[step]) == set(one[step]), step  # the same task at every step
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5, abs=1e-6), step
    assert again["vqa/accuracy"] == pytest.approx(final["vqa/accuracy"])


def test_a_multitask_run_refuses_what_it_does_not_support(tmp_path: Path) -> None:
    from fusionzoo.training.trainer import train

    for extra, key in ((["peft=lora"], "'peft'"), (["task_weights=vqa:1"], "task_weights"),
                       (["compile=true"], "'compile'")):
        with pytest.raises(ConfigError, match=key):
            train(load_config(None, [*_run_args(tmp_path, tmp_path / "run"), *extra]))
    retrieval = [a for a in _run_args(tmp_path, tmp_path / "run") if not a.startswith("task_data.captioning")]
    with pytest.raises(ConfigError, match="'retrieval' recipe"):
        train(load_config(None, [*retrieval, "task=vqa+retrieval"]))
