"""Two gloo processes (torchrun) against one: every task x fusion trains, the same losses and learning
rates step for step, a NaN on one process stops both, and a 2-process evaluation prints the 1-process scores.

One launch (``run_jobs.py``) trains every job of :func:`launched`, then runs ``fusionzoo eval`` on some
of the trained models; the one-process references, training and evaluation, run in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusionzoo.cli import main as fusionzoo
from fusionzoo.registry import FUSIONS
from fusionzoo.training.config import load_config
from fusionzoo.training.pretrain import pretrain, pretrain_base_config
from fusionzoo.training.trainer import train

from fixtures import train_log, write_classification_jsonl, write_karpathy_captions, write_vqa_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from image_text_fixtures import write_shards  # noqa: E402

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TASKS = ("vqa", "classification", "captioning", "retrieval")
BUILT_IN = ("albef", "attention_weighted", "co_attention", "early_concat", "late_voting", "merged_transformer")
#: Feature-level fusions whose 2-process losses must equal the 1-process ones (no batch-level auxiliary loss).
EQUAL = ("early_concat", "co_attention", "merged_transformer")
#: Equality jobs trained with ``modality_dropout`` (images and questions dropped per global row).
MODALITY_DROPOUT = {"co_attention": 0.5}
#: LoRA fine-tuning (adapters on both tiny encoders, which then run at every step): two fusions.
EQUAL_LORA = ("co_attention", "merged_transformer")
#: fusions whose 2-process vqa+captioning run is compared with 1 process (the task of each step, every loss)
EQUAL_MULTITASK = ("co_attention", "merged_transformer")
LORA = ["peft=lora", "lora_r=2", "lora_alpha=4"]
#: Retrieval (ITC over the gathered batch + ITM with hard negatives drawn per global row): an
#: Alignment-based fusion and one that aligns itself.
EQUAL_RETRIEVAL = ("merged_transformer", "albef")
#: Streamed pretraining (webdataset shards, each reader its share): one aligning itself, one through an Alignment.
STREAMED = ("albef", "co_attention")
#: ITC-only pretraining: the fusing layers (ITM, MLM) get no gradient, which the run tells DDP.
ITC_ONLY = ["itm_weight=0", "mlm_weight=0"]
QUIET = ["vision=tiny", "text=tiny", "log_with=none", "log_every=1", "seed=1"]
NO_DROPOUT = ["fusion_kwargs.dropout=0.0", "head_kwargs.dropout=0.0"]
#: Retrieval models that ``fusionzoo eval`` scores on 2 processes and on 1: one aligning itself, one through
#: an Alignment. The 2-process evaluations run in the launch that trained them.
EVAL_RETRIEVAL = ("co_attention", "albef")
#: ``fusionzoo eval`` options: VQA on the test split (37 questions at batch 8: the last batch is padded),
#: retrieval on 11 train images at batch 4 (padded too), ITM reranking in batches of 7.
VQA_EVAL = ["split=test", "eval_batch_size=8"]
RETRIEVAL_EVAL = ["split=train", "max_eval_samples=11", "eval_batch_size=4", "rerank_k=5", "rerank_batch_size=7"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def _data_args(task: str, data: Path) -> list[str]:
    if task == "vqa":
        return ["data=vqa-jsonl", f"data_dir={data / 'vqa'}"]
    if task == "classification":
        return ["data=classification-jsonl", f"data_dir={data / 'cls'}"]
    return ["data=karpathy-captions", f"data_dir={data / 'cap'}", "max_text_len=12"]


def _pair_args(task: str, fusion: str, data: Path, out: Path) -> list[str]:
    return [f"task={task}", f"fusion={fusion}", *_data_args(task, data), *QUIET, "fusion_kwargs.dim=16",
            "batch_size=4", "max_steps=3", "max_eval_samples=6", "lr=1e-3", f"output_dir={out}"]


def _equal_args(fusion: str, data: Path, out: Path, batch: int) -> list[str]:
    # warmup then cosine over 10 steps: the learning rate changes at all but one step
    return ["task=vqa", f"fusion={fusion}", *_data_args("vqa", data), *QUIET, *NO_DROPOUT, "fusion_kwargs.dim=16",
            f"batch_size={batch}", "max_steps=10", "warmup_ratio=0.3", "lr=3e-3", "max_eval_samples=0",
            *([f"modality_dropout={MODALITY_DROPOUT[fusion]}"] if fusion in MODALITY_DROPOUT else []),
            f"output_dir={out}"]


def _multitask_args(fusion: str, data: Path, out: Path, batch: int) -> list[str]:
    # 10 VQA and 5 caption batches of 16 an epoch: the 10 steps take a mix of both
    return ["task=vqa+captioning", f"fusion={fusion}", "data=vqa-jsonl+karpathy-captions",
            f"task_data.vqa={{data_dir: {data / 'vqa'}, head_kwargs: {{dropout: 0.0}}}}",
            f"task_data.captioning={{data_dir: {data / 'cap'}}}", "max_text_len=12", *QUIET,
            "fusion_kwargs.dim=16", "fusion_kwargs.dropout=0.0", f"batch_size={batch}", "max_steps=10",
            "warmup_ratio=0.3", "lr=3e-3", "max_eval_samples=0", f"output_dir={out}"]


def _retrieval_args(fusion: str, data: Path, out: Path, batch: int) -> list[str]:
    return ["task=retrieval", f"fusion={fusion}", *_data_args("retrieval", data), *QUIET, "freeze_encoders=true",
            'fusion_kwargs={"dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}', f"batch_size={batch}",
            "max_steps=10", "warmup_ratio=0.3", "lr=3e-3", "max_eval_samples=0", f"output_dir={out}"]


def _pretrain_args(data: Path, out: Path, batch: int, fusion: str = "albef") -> list[str]:
    kwargs = {"dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}
    if fusion == "albef":
        kwargs["embed_dim"] = 8  # albef aligns itself; the others get an Alignment (align_kwargs)
    return [f"fusion={fusion}", f"data_dir={data / 'cap'}", *QUIET, "freeze_encoders=true", "max_text_len=12",
            f"fusion_kwargs={json.dumps(kwargs)}", "align_kwargs.embed_dim=8" if fusion != "albef" else "align_kwargs={}",
            f"batch_size={batch}", "max_steps=10", "warmup_ratio=0.3", "lr=3e-3", "max_eval_samples=0",
            f"output_dir={out}"]


def _streamed_pretrain_args(fusion: str, data: Path, out: Path, batch: int, workers: int) -> list[str]:
    """Pretraining from webdataset shards: 2 readers (processes or workers), 10 steps, 4 passes of the 20 pairs."""
    args = [a for a in _pretrain_args(data, out, batch, fusion) if not a.startswith(("data_dir=", "max_eval"))]
    return [*args, "data=webdataset", f"data_dir={data / 'wds'}", f"num_workers={workers}",
            "data_files={train: 'train/{0000..0003}.tar', val: 'val/0000.tar'}", "data_kwargs.shuffle_buffer=6",
            "max_eval_samples=8", f"eval_batch_size={batch}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    write_vqa_jsonl(root / "vqa", {"train": 160, "test": 37})  # 37: the last evaluation batch is padded
    write_classification_jsonl(root / "cls", {"train": 32, "test": 8})
    write_karpathy_captions(root / "cap", {"train": 40, "val": 4})
    write_shards(root / "wds" / "train", 4, 5)
    write_shards(root / "wds" / "val", 1, 6, start=100)
    return root


def _evals(out: Path) -> dict[str, list[str]]:
    """The launch's evaluations by name, each its ``fusionzoo`` arguments (retrieval also saves its scores)."""
    evals = {"eval-vqa-early_concat": ["eval", str(out / "vqa-early_concat"), *VQA_EVAL]}
    for fusion in EVAL_RETRIEVAL:
        name = f"eval-retrieval-{fusion}"
        evals[name] = ["eval", str(out / f"retrieval-{fusion}"), *RETRIEVAL_EVAL, f"results={out / name}.npz"]
    return evals


@pytest.fixture(scope="module")
def launched(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process launch: every task x registered fusion for 3 steps, the equality jobs, then evaluations."""
    out = tmp_path_factory.mktemp("ddp-runs")
    jobs = [{"kind": "train", "overrides": _pair_args(task, fusion, data, out / f"{task}-{fusion}")}
            for task in TASKS for fusion in FUSIONS.list() if fusion in BUILT_IN]
    jobs += [{"kind": "train", "overrides": _equal_args(fusion, data, out / f"equal-{fusion}", 8)} for fusion in EQUAL]
    jobs += [{"kind": "train", "overrides": [*_equal_args(fusion, data, out / f"equal-lora-{fusion}", 8), *LORA]}
             for fusion in EQUAL_LORA]
    jobs += [{"kind": "train", "overrides": _multitask_args(fusion, data, out / f"equal-multitask-{fusion}", 8)}
             for fusion in EQUAL_MULTITASK]
    jobs.append({"kind": "pretrain", "overrides": _pretrain_args(data, out / "equal-pretrain", 4)})
    jobs.append({"kind": "pretrain", "overrides": [*_pretrain_args(data, out / "equal-pretrain-lora", 4), *LORA,
                                                   "lora_targets=fusion"]})
    jobs.append({"kind": "pretrain", "overrides": [*_pretrain_args(data, out / "equal-pretrain-itc", 4), *ITC_ONLY]})
    jobs.append({"kind": "pretrain", "overrides": _pretrain_args(data, out / "equal-pretrain-merged", 4,
                                                                 "merged_transformer")})
    jobs += [{"kind": "train", "overrides": _retrieval_args(fusion, data, out / f"equal-retrieval-{fusion}", 4)}
             for fusion in EQUAL_RETRIEVAL]
    jobs += [{"kind": "pretrain", "overrides": _streamed_pretrain_args(fusion, data, out / f"streamed-{fusion}", 4, 0)}
             for fusion in STREAMED]
    jobs += [{"kind": "cli", "argv": argv, "stdout": str(out / name)} for name, argv in _evals(out).items()]
    (out / "jobs.json").write_text(json.dumps(jobs))
    result = _torchrun(str(HERE / "run_jobs.py"), str(out / "jobs.json"), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("task", TASKS)
def test_every_fusion_trains_on_two_processes(launched: Path, task: str) -> None:
    for fusion in BUILT_IN:
        run = json.loads((launched / f"{task}-{fusion}" / "final" / "run.json").read_text())
        assert run["num_processes"] == 2 and run["step"] == 3, fusion
        assert len(run["param_checksums"]) == 2 and len(set(run["param_checksums"])) == 1, fusion
        assert run["metrics"]["num_samples"] >= 1, fusion


def _compare_logs(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    log_one, log_two = train_log(one), train_log(two)
    assert sorted(log_one) == sorted(log_two) == list(range(1, 11))
    lrs = [log_one[s]["train/lr"] for s in range(1, 11)]
    assert len(set(lrs)) == 9  # 3 warmup steps up to the peak, which the cosine starts from, then down
    for step in range(1, 11):
        assert log_two[step]["train/lr"] == pytest.approx(log_one[step]["train/lr"], rel=1e-12), step
        for key in keys:
            assert log_two[step][key] == pytest.approx(log_one[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("fusion", EQUAL)
def test_two_processes_at_batch_8_train_like_one_at_16(launched: Path, data: Path, tmp_path: Path,
                                                      fusion: str) -> None:
    one = tmp_path / "one"
    train(load_config(None, [*_equal_args(fusion, data, one, 16), "cpu=true"]))
    _compare_logs(one, launched / f"equal-{fusion}", ("train/loss", "train/vqa"))
    run_one = json.loads((one / "final" / "run.json").read_text())
    run_two = json.loads((launched / f"equal-{fusion}" / "final" / "run.json").read_text())
    # As for retrieval below: Adam divides by the root of tiny second moments, so rounding in the gradient
    # all-reduce shows in the weights more than in the losses (with the frozen encoders' float16 features
    # from the feature cache, up to ~2e-6 here).
    assert run_two["param_checksums"][0] == pytest.approx(run_one["param_checksums"][0], rel=1e-5)


@pytest.mark.parametrize("fusion", EQUAL_LORA)
def test_lora_on_two_processes_at_batch_8_trains_like_one_at_16(launched: Path, data: Path, tmp_path: Path,
                                                               fusion: str) -> None:
    one = tmp_path / "one"
    train(load_config(None, [*_equal_args(fusion, data, one, 16), *LORA, "cpu=true"]))
    _compare_logs(one, launched / f"equal-lora-{fusion}", ("train/loss", "train/vqa"))
    run_one = json.loads((one / "final" / "run.json").read_text())
    run_two = json.loads((launched / f"equal-lora-{fusion}" / "final" / "run.json").read_text())
    assert run_two["param_checksums"][0] == pytest.approx(run_one["param_checksums"][0], rel=1e-5)
    # both saved the adapters, not the encoders' base weights from the model file
    assert (launched / f"equal-lora-{fusion}" / "final" / "adapters.safetensors").is_file()
    assert not (one / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("fusion", EQUAL_MULTITASK)
def test_multitask_on_two_processes_at_batch_8_trains_like_one_at_16(launched: Path, data: Path, tmp_path: Path,
                                                                    fusion: str) -> None:
    one, two = tmp_path / "one", launched / f"equal-multitask-{fusion}"
    train(load_config(None, [*_multitask_args(fusion, data, one, 16), "cpu=true"]))
    log_one, log_two = train_log(one), train_log(two)
    tasks = ["vqa" if "train/vqa" in log_one[s] else "captioning" for s in range(1, 11)]
    assert set(tasks) == {"vqa", "captioning"}  # both tasks within the compared steps
    for step, task in zip(range(1, 11), tasks):
        assert f"train/{task}" in log_two[step], step  # the same task at the same step
    _compare_logs(one, two, ("train/loss",))
    run_one = json.loads((one / "final" / "run.json").read_text())
    run_two = json.loads((two / "final" / "run.json").read_text())
    assert run_two["param_checksums"][0] == pytest.approx(run_one["param_checksums"][0], rel=1e-5)
    assert (two / "final" / "multitask.json").is_file()


@pytest.mark.parametrize("fusion", ["albef", "merged_transformer"])
def test_pretraining_on_two_processes_equals_one(launched: Path, data: Path, tmp_path: Path, fusion: str) -> None:
    """ITC over the gathered batch, ITM negatives drawn per global row, MLM over the global masked count;
    ``merged_transformer`` through the model's Alignment, ``albef`` through its own."""
    one = tmp_path / "one"
    pretrain(load_config(None, [*_pretrain_args(data, one, 8, fusion), "cpu=true"], base=pretrain_base_config()))
    two = launched / ("equal-pretrain" if fusion == "albef" else "equal-pretrain-merged")
    _compare_logs(one, two, ("train/loss", "train/itc", "train/itm", "train/mlm", "train/itm_accuracy"))


def test_lora_pretraining_on_two_processes_equals_one(launched: Path, data: Path, tmp_path: Path) -> None:
    """peft=lora in pretraining, adapters on the fusion (frozen encoders): 2 processes x 4 pairs == 1 process x 8.

    With adapters in the encoders the two differ by about 1e-4 from the second step on (README, LoRA)."""
    one = tmp_path / "one"
    pretrain(load_config(None, [*_pretrain_args(data, one, 8), *LORA, "lora_targets=fusion", "cpu=true"],
                         base=pretrain_base_config()))
    two = launched / "equal-pretrain-lora"
    _compare_logs(one, two, ("train/loss", "train/itc", "train/itm", "train/mlm"))
    assert json.loads((two / "final" / "config.json").read_text())["lora_merged"]["r"] == 2


def test_itc_only_pretraining_on_two_processes_equals_one(launched: Path, data: Path, tmp_path: Path) -> None:
    """2 processes x 4 pairs == 1 process x 8 pairs with ITC alone: the gather of the other process's
    embeddings is differentiable, and the unused fusing layers do not stop DDP."""
    one = tmp_path / "one"
    pretrain(load_config(None, [*_pretrain_args(data, one, 8), *ITC_ONLY, "cpu=true"], base=pretrain_base_config()))
    two = launched / "equal-pretrain-itc"
    _compare_logs(one, two, ("train/loss", "train/itc"))
    run_one = json.loads((one / "final" / "run.json").read_text())
    run_two = json.loads((two / "final" / "run.json").read_text())
    assert run_two["num_processes"] == 2 and len(set(run_two["param_checksums"])) == 1
    assert run_two["param_checksums"][0] == pytest.approx(run_one["param_checksums"][0], rel=1e-6)


@pytest.mark.parametrize("fusion", EQUAL_RETRIEVAL)
def test_retrieval_training_on_two_processes_equals_one(launched: Path, data: Path, tmp_path: Path,
                                                        fusion: str) -> None:
    one = tmp_path / "one"
    train(load_config(None, [*_retrieval_args(fusion, data, one, 8), "cpu=true"]))
    _compare_logs(one, launched / f"equal-retrieval-{fusion}", ("train/loss", "train/itc", "train/itm"))
    run_one = json.loads((one / "final" / "run.json").read_text())
    run_two = json.loads((launched / f"equal-retrieval-{fusion}" / "final" / "run.json").read_text())
    # Adam divides by the root of tiny second moments, so rounding in the gradient all-reduce shows
    # in the weights a little more than in the losses.
    assert run_two["param_checksums"][0] == pytest.approx(run_one["param_checksums"][0], rel=1e-5)


@pytest.mark.parametrize("fusion", STREAMED)
def test_streamed_pretraining_on_two_processes_equals_one_with_two_workers(launched: Path, data: Path,
                                                                          tmp_path: Path, fusion: str) -> None:
    """Two processes reading their shares of the shards at batch 4 train on, and evaluate, what one
    process whose two DataLoader workers read the same two shares does at batch 8."""
    one = tmp_path / "one"
    pretrain(load_config(None, [*_streamed_pretrain_args(fusion, data, one, 8, 2), "cpu=true"],
                         base=pretrain_base_config()))
    two = launched / f"streamed-{fusion}"
    _compare_logs(one, two, ("train/loss", "train/itc", "train/itm", "train/mlm", "train/itm_accuracy"))
    run_one = json.loads((one / "final" / "run.json").read_text())
    run_two = json.loads((two / "final" / "run.json").read_text())
    assert run_one["metrics"]["num_samples"] == run_two["metrics"]["num_samples"] == 8
    for key, value in run_one["metrics"].items():
        assert run_two["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert run_two["param_checksums"][0] == pytest.approx(run_one["param_checksums"][0], rel=1e-5)


NAN_PLUGIN = '''
import torch
import torch.distributed as dist

import fusionzoo
from fusionzoo.fusions.early_concat import EarlyConcatFusion

CALLS = {"n": 0}


@fusionzoo.register_fusion("nan_on_rank_one")
class NanOnRankOne(EarlyConcatFusion):
    """Early concat whose pooled output turns NaN on process 1 only, from its fourth training forward on."""

    def forward(self, text, text_mask, image, image_mask=None, **kwargs):
        out = super().forward(text, text_mask, image, image_mask, **kwargs)
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            CALLS["n"] += 1
            if CALLS["n"] > 3:
                out.pooled = out.pooled * float("nan")
        return out
'''


def test_nan_on_one_process_stops_both_with_one_checkpoint(data: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "nan_plugin.py"
    plugin.write_text(NAN_PLUGIN)
    out = tmp_path / "run"
    started = time.perf_counter()
    result = _torchrun("-m", "fusionzoo", "--import", str(plugin), "train", "task=vqa", "fusion=nan_on_rank_one",
                       *_data_args("vqa", data), *QUIET, "fusion_kwargs.dim=16", "batch_size=4", "max_steps=30",
                       "max_eval_samples=8", f"output_dir={out}", timeout=300)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "the loss of another process is not finite at step 3" in result.stderr  # process 0's message
    assert "loss is nan (vqa=nan) at step 3" in result.stderr  # process 1's
    assert "raise NonFiniteLossError" not in result.stderr  # each process printed one line, no traceback
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003"]
    assert json.loads((out / "checkpoints" / "step-00000003" / "progress.json").read_text())["step"] == 3
    assert not (out / "final").exists()
    assert elapsed < 120, f"took {elapsed:.0f} s: a process waited for the other"


def _printed_by_the_launch(launched: Path, name: str) -> dict:
    """The scores evaluation ``name`` of the launch printed: one JSON line, on the main process only."""
    printed = [[line for line in (launched / f"{name}.rank{rank}").read_text().splitlines() if line.startswith("{")]
               for rank in (0, 1)]
    assert len(printed[0]) == 1 and printed[1] == [], printed
    return json.loads(printed[0][0])


def _printed_by_one_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert fusionzoo(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_two_process_eval_prints_the_one_process_scores(launched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores_two = _printed_by_the_launch(launched, "eval-vqa-early_concat")
    scores_one = _printed_by_one_process(["eval", str(launched / "vqa-early_concat"), *VQA_EVAL], capsys)
    assert scores_one["num_samples"] == scores_two["num_samples"] == 37  # padding duplicates dropped
    assert set(scores_one) == set(scores_two) == {"accuracy", "loss", "num_samples"}
    assert scores_two["accuracy"] == scores_one["accuracy"]
    assert scores_two["loss"] == pytest.approx(scores_one["loss"], rel=1e-6)


@pytest.mark.parametrize("fusion", EVAL_RETRIEVAL)
def test_two_process_retrieval_eval_equals_one_process(launched: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], fusion: str) -> None:
    """Images sharded and gathered, each process reranks its share of the queries: the same scores."""
    name = f"eval-retrieval-{fusion}"
    files = {"one": tmp_path / "one.npz", "two": launched / f"{name}.npz"}
    scores_two = _printed_by_the_launch(launched, name)
    scores_one = _printed_by_one_process(["eval", str(launched / f"retrieval-{fusion}"), *RETRIEVAL_EVAL,
                                          f"results={files['one']}"], capsys)
    assert scores_one["num_images"] == scores_two["num_images"] == 11  # 11 images: the last batch is padded
    recalls = [k for k in scores_one if k.endswith(("_r1", "_r5", "_r10", "r_mean"))]
    assert len(recalls) == 14 and {k: scores_two[k] for k in recalls} == {k: scores_one[k] for k in recalls}
    import numpy as np

    with np.load(files["one"]) as a, np.load(files["two"]) as b:
        assert a["image_ids"].tolist() == b["image_ids"].tolist()
        for key in ("i2t", "t2i", "itc_i2t", "itc_t2i"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_accelerate_launch_with_the_cpu_config_starts_two_processes(data: Path, tmp_path: Path) -> None:
    """The README's CPU form of `accelerate launch` really trains on 2 processes (gloo)."""
    out = tmp_path / "run"
    config = HERE.parents[1] / "configs" / "accelerate" / "cpu_ddp.yaml"
    accelerate = str(Path(sys.executable).with_name("accelerate"))  # the venv's own launcher
    result = subprocess.run([accelerate, "launch", "--config_file", str(config), "--main_process_port",
                             str(_free_port()), "-m", "fusionzoo", "train", "task=vqa", "fusion=early_concat",
                             *_data_args("vqa", data), *QUIET, "fusion_kwargs.dim=16", "batch_size=4", "max_steps=2",
                             "max_eval_samples=4", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "final" / "run.json").read_text())
    assert run["num_processes"] == 2 and len(set(run["param_checksums"])) == 1
