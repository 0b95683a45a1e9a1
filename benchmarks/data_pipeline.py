"""Data-pipeline figures: webdataset reading, pretraining's memory on the feature cache, a cached second epoch.

Three measurements on coco-vqa-mini (``../shared/data/coco-vqa-mini`` next to the repository, or
``--data``; each is skipped, saying so, when the folder is missing). Each prints its figures and
a ratio beside its target; nothing is asserted, as the figures depend on the machine and on its
load, which are printed first.

1. **webdataset reading** (target: at least 80%). Pairs per second through the pretraining read
   path of ``data=webdataset`` (:mod:`fusionzoo.data.webdataset_shards`: tar shards read front to
   back, the shuffle buffer, JPEG decoding, the encoder's preprocessing, the caption collate)
   against decoding and preprocessing the same JPEG files alone (a map-style DataLoader), with
   the same number of DataLoader workers and batch size. The shard set is built in a temporary
   folder (never in the repository) from coco-vqa-mini's 224 px JPEGs: ``--pairs`` samples
   (default 20,000), its 8,127 images repeated under distinct keys, 1,000 samples a shard.
2. **pretraining memory** (target: at most 1.5 GB, 10^9 bytes, a process). ``fusionzoo pretrain`` with
   frozen encoders (configs/pretrain_albef_coco.yaml) on coco-vqa-mini's Karpathy train split,
   in a fresh process (``--processes N``: N processes under torchrun), twice on one new cache
   folder. Reported per process: the peak of its private resident memory (``RssAnon`` +
   ``RssShmem`` of /proc/self/status, sampled every 5 ms) above what it held once the model was
   built, and its peak file-backed resident pages (``RssFile``: the memory-mapped cache and the
   libraries, shared between processes through the page cache and reclaimable), with what the
   feature cache did (the second run must extract nothing). For scale, the float32 table of image
   tokens that pretraining used to hold in every process is printed too.
3. **second epoch** (target: at least 3x faster). ``fusionzoo train`` for captioning with frozen
   encoders (configs/captioning/co_attention.yaml), two epochs on a new cache folder: the first
   epoch's time (hashing and extracting the features, then training on them) against the
   second's (training on them), and the images decoded in each. ``--uncached`` adds the same run
   with ``feature_cache=false``, where every epoch decodes and encodes.

Usage::

    python benchmarks/data_pipeline.py                      # all three, full settings
    python benchmarks/data_pipeline.py --quick              # small settings: a few minutes on 2 cores
    python benchmarks/data_pipeline.py --only webdataset --pairs 2000
    python benchmarks/data_pipeline.py --only pretrain --processes 2
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
from fusionzoo.hardware import describe_machine  # noqa: E402  (imports no torch)
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "coco-vqa-mini"
PRETRAIN_CONFIG = REPO_ROOT / "configs" / "pretrain_albef_coco.yaml"
CAPTION_CONFIG = REPO_ROOT / "configs" / "captioning" / "co_attention.yaml"
#: Karpathy's COCO training split (train + restval), the size the old in-RAM table is scaled to.
KARPATHY_TRAIN_IMAGES = 113_287
MiB = 1024 * 1024
GB = 1e9
_START = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr with the seconds since the start (stdout is the report)."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def _target(value: float, target: float, shown: str, more_is_better: bool = True) -> str:
    """``target >= 80%: met`` (or ``NOT met``)."""
    met = value >= target if more_is_better else value <= target
    return f"target {'>=' if more_is_better else '<='} {shown}: {'met' if met else 'NOT met'}"


# -- 1. webdataset reading -------------------------------------------------------
def image_files(data: Path) -> list[Path]:
    return sorted((data / "images").rglob("*.jpg"))


def build_shards(images: list[Path], pairs: int, per_shard: int, folder: Path) -> list[Path]:
    """``pairs`` webdataset samples (``<key>.jpg`` + ``<key>.txt``) in tar files of ``per_shard`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    tar: tarfile.TarFile | None = None
    try:
        for k in range(pairs):
            if k % per_shard == 0:
                if tar is not None:
                    tar.close()
                shards.append(folder / f"train-{len(shards):05d}.tar")
                tar = tarfile.open(shards[-1], "w")
            source = images[k % len(images)]
            for suffix, payload in (("jpg", source.read_bytes()),
                                    ("txt", f"photograph {source.stem}, sample {k}".encode())):
                member = tarfile.TarInfo(f"{k:08d}.{suffix}")  # distinct keys: the images repeat, samples do not
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    finally:
        if tar is not None:
            tar.close()
    return shards


class _DecodeOnly:
    """Map-style dataset: path -> the encoder's preprocessing of the decoded image (3, H, W)."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        from fusionzoo.data.common import open_image

        return self.transform(open_image(self.paths[index]))


def _stack(items: list[Any]) -> Any:
    import torch

    return torch.stack(items)


def _drain(loader: Any, count: Any) -> tuple[int, float]:
    """(samples, seconds) of one pass over ``loader`` (workers' start-up included)."""
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += count(batch)
    return seen, time.perf_counter() - start


def measure_webdataset(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from fusionzoo.encoders import build_text_encoder, build_vision_encoder
    from fusionzoo.data.webdataset_shards import load_webdataset

    images = image_files(data)
    if not images:
        return {"skipped": f"no JPEG images under {data / 'images'}"}
    folder = Path(tempfile.mkdtemp(prefix="fusionzoo-wds-"))
    try:
        progress(f"webdataset: writing {args.pairs:,} samples from {len(images):,} images to {folder}")
        shards = build_shards(images, args.pairs, args.per_shard, folder)
        vision = build_vision_encoder(args.vision, pretrained=False)  # the transform is all that is needed
        text = build_text_encoder(args.text, pretrained=False)
        transform = vision.transform(train=False)
        stream_data = load_webdataset(folder).with_image_transform(transform)
        stream = (stream_data.pairs("train").with_options(shuffle=True, repeat=False, seed=0)
                  .for_process(0, 1))
        collate = stream_data.collator(text.tokenize, 32)
        paths = [images[k % len(images)] for k in range(args.pairs)]
        runs: dict[str, list[float]] = {"webdataset": [], "decode_only": []}
        for repeat in range(args.repeats):  # alternated, so that a change in the machine's load hits both
            progress(f"webdataset: decode + preprocess alone, {args.workers} workers (pass {repeat + 1})")
            loader = DataLoader(_DecodeOnly(paths, transform), batch_size=args.batch_size,
                                num_workers=args.workers, collate_fn=_stack)
            seen, seconds = _drain(loader, len)
            assert seen == args.pairs
            runs["decode_only"].append(seen / seconds)
            progress(f"webdataset: the pretraining read path, {args.workers} workers (pass {repeat + 1})")
            loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
            seen, seconds = _drain(loader, lambda batch: len(batch["input_ids"]))
            if seen != args.pairs:
                raise RuntimeError(f"the webdataset pass gave {seen} pairs, not {args.pairs}")
            runs["webdataset"].append(seen / seconds)
        best = {name: max(values) for name, values in runs.items()}
        return {"pairs": args.pairs, "shards": len(shards), "workers": args.workers, "batch_size": args.batch_size,
                "image_size": list(vision.data_config["input_size"]), "pairs_per_second": runs,
                "best_webdataset": best["webdataset"], "best_decode_only": best["decode_only"],
                "ratio": best["webdataset"] / best["decode_only"]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- 2. pretraining memory ----------------------------------------------------------
def memory_worker(payload: dict[str, Any]) -> None:
    """One pretraining run in this process (under torchrun: in each), its memory written to a JSON file."""
    from fusionzoo.hardware import RssSampler
    from fusionzoo.training.config import load_config
    from fusionzoo.training.loop import run
    from fusionzoo.training.pretrain import PretrainRecipe, pretrain_base_config

    with RssSampler(interval_s=0.005, by_kind=True) as sampler:  # VmRSS, RssAnon, RssFile, RssShmem, private

        class Measured(PretrainRecipe):
            def build_model(self, config: Any, accelerator: Any) -> Any:
                model = super().build_model(config, accelerator)
                gc.collect()
                sampler.reset()  # sampler.start: what the process holds once the model is built
                return model

        config = load_config(payload["config"], payload["overrides"], base=pretrain_base_config())
        run(Measured(), config)
    peak = sampler.peak
    rank = int(os.environ.get("RANK", "0"))
    run_json = json.loads((Path(config.output_dir) / "final" / "run.json").read_text())
    report = {"rank": rank, "after_model": sampler.start, "peak": peak,
              "beyond_model_private": peak["private"] - sampler.start["private"],
              "beyond_model_rss": peak["VmRSS"] - sampler.start["VmRSS"],
              "feature_cache": run_json.get("feature_cache")}
    Path(f"{payload['report']}.rank{rank}.json").write_text(json.dumps(report))


def _launch_memory_worker(args: argparse.Namespace, overrides: list[str], report: Path) -> list[dict[str, Any]]:
    payload = json.dumps({"config": str(PRETRAIN_CONFIG), "overrides": overrides, "report": str(report)})
    script = [str(Path(__file__).resolve()), "--memory-worker", payload]
    if args.processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes), *script]
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the pretraining worker failed:\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(args.processes)]


def measure_pretrain_memory(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="fusionzoo-pretrain-"))
    try:
        cache = work / "cache"
        runs = []
        for attempt in ("first", "second"):
            progress(f"pretrain: {attempt} run on {args.processes} process(es), cache {cache}")
            overrides = [f"data_dir={data}", f"output_dir={work / attempt}", f"cache_dir={cache}",
                         f"max_steps={args.pretrain_steps}", "log_with=none", "log_every=10", "save_every=null",
                         "eval_every=null", f"max_eval_samples={args.pretrain_eval_samples}", "overwrite=true"]
            runs.append(_launch_memory_worker(args, overrides, work / f"memory-{attempt}"))
        images = next(e for e in runs[0][0]["feature_cache"]["entries"] if e["name"].startswith("image-"))
        tokens = np.load(Path(images["path"]) / "tokens.npy", mmap_mode="r")
        old_table = {"images": int(tokens.shape[0]), "tokens_per_image": int(tokens.shape[1]),
                     "width": int(tokens.shape[2]),
                     "bytes_here": int(tokens.shape[0] * tokens.shape[1] * tokens.shape[2] * 4),
                     "bytes_karpathy_train": int(KARPATHY_TRAIN_IMAGES * tokens.shape[1] * tokens.shape[2] * 4)}
        worst = max(r["beyond_model_private"] for r in runs[0] + runs[1])
        return {"processes": args.processes, "steps": args.pretrain_steps, "runs": runs, "old_table": old_table,
                "worst_beyond_model_private": worst,
                # every process counts the entries it took part in building: process 0's counts are the run's
                "second_run_misses": runs[1][0]["feature_cache"]["misses"],
                "first_run_misses": runs[0][0]["feature_cache"]["misses"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- 3. second epoch ---------------------------------------------------------------
def timed_caption_run(data: Path, work: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """Two epochs of captioning: each epoch's time and the images decoded before and in each."""
    from fusionzoo.features import extract
    from fusionzoo.data import common
    from fusionzoo.training.config import load_config
    from fusionzoo.training.loop import run
    from fusionzoo.training.trainer import FinetuneRecipe

    decoded: dict[str, int] = {}
    state: dict[str, Any] = {"phase": "features", "step_end": {}}
    originals = {module: module.open_image for module in (common, extract)}  # rows' images, extraction's

    def counting(module: Any) -> Any:
        def open_image(*a: Any, **kw: Any) -> Any:
            decoded[state["phase"]] = decoded.get(state["phase"], 0) + 1
            return originals[module](*a, **kw)
        return open_image

    class Timed(FinetuneRecipe):
        def prepare_data(self, config: Any, model: Any, accelerator: Any) -> Any:
            start = time.perf_counter()
            prepared = super().prepare_data(config, model, accelerator)  # hashing and extraction, when cached
            state["prepare_seconds"], state["ready"] = time.perf_counter() - start, time.perf_counter()
            state["phase"] = "epoch 1"
            return prepared

        def forward(self, model: Any, unwrapped: Any, batch: Any, context: Any) -> Any:
            state["context"] = context
            return super().forward(model, unwrapped, batch, context)

        def after_optimizer_step(self, unwrapped: Any) -> None:
            super().after_optimizer_step(unwrapped)
            context = state["context"]
            state["step_end"][context.epoch] = time.perf_counter()
            # An epoch's loader has read all its batches by its last step: what is decoded next is the next epoch's.
            state["phase"] = f"epoch {(context.step + 1) // context.steps_per_epoch + 1}"

    config = load_config(CAPTION_CONFIG, [f"data_dir={data}", f"output_dir={work / name}",
                                          f"cache_dir={work / 'cache'}", "epochs=2", "max_eval_samples=0",
                                          "log_with=none", "overwrite=true", *overrides])
    try:
        for module in originals:
            module.open_image = counting(module)
        run(Timed(), config)
    finally:
        for module, original in originals.items():
            module.open_image = original
    ends = state["step_end"]
    epochs = [ends[0] - state["ready"], ends[1] - ends[0]]
    run_json = json.loads((work / name / "final" / "run.json").read_text())
    return {"prepare_seconds": state["prepare_seconds"], "epoch_train_seconds": epochs,
            "first_epoch_seconds": state["prepare_seconds"] + epochs[0], "second_epoch_seconds": epochs[1],
            "decoded": {k: decoded.get(k, 0) for k in ("features", "epoch 1", "epoch 2")},
            "feature_cache": run_json.get("feature_cache"), "steps": run_json["step"]}


def measure_second_epoch(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fusionzoo-epochs-"))
    extra = [] if args.train_samples is None else [f"max_train_samples={args.train_samples}"]
    try:
        progress("second epoch: captioning with the feature cache (a new cache folder)")
        cached = timed_caption_run(data, work, "cached", extra)
        report = {"cached": cached, "ratio": cached["first_epoch_seconds"] / cached["second_epoch_seconds"],
                  "train_samples": args.train_samples}
        if args.uncached:
            progress("second epoch: captioning with feature_cache=false")
            live = timed_caption_run(data, work, "uncached", [*extra, "feature_cache=false"])
            report["uncached"] = live
            report["live_over_cached_epoch"] = live["second_epoch_seconds"] / cached["second_epoch_seconds"]
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- printing ------------------------------------------------------------------------
def print_webdataset(r: dict[str, Any]) -> None:
    print(f"webdataset: {r['pairs']:,} pairs in {r['shards']} shards, {r['workers']} workers, batch {r['batch_size']}, "
          f"images preprocessed to {r['image_size']}")
    print(f"  pretraining read path  {r['best_webdataset']:8.1f} pairs/s  (passes: "
          f"{', '.join(f'{v:.1f}' for v in r['pairs_per_second']['webdataset'])})")
    print(f"  decode + preprocess    {r['best_decode_only']:8.1f} images/s (passes: "
          f"{', '.join(f'{v:.1f}' for v in r['pairs_per_second']['decode_only'])})")
    print(f"  ratio {r['ratio']:.1%} of decoding alone ({_target(r['ratio'], 0.8, '80%')})")


def print_pretrain(r: dict[str, Any]) -> None:
    print(f"pretrain: configs/pretrain_albef_coco.yaml, {r['steps']} steps, {r['processes']} process(es), "
          "twice on one new cache folder")
    for label, runs in zip(("first", "second"), r["runs"]):
        for w in runs:
            cache = w["feature_cache"]
            print(f"  {label} run, process {w['rank']}: private memory beyond the model "
                  f"{w['beyond_model_private'] / MiB:7.1f} MiB (peak {w['peak']['private'] / MiB:.0f} MiB, "
                  f"{w['after_model']['private'] / MiB:.0f} MiB with the model); RSS beyond the model "
                  f"{w['beyond_model_rss'] / MiB:.1f} MiB; file-backed pages (cache, libraries) peak "
                  f"{w['peak']['RssFile'] / MiB:.0f} MiB; cache: {cache['hits']} hits, {cache['misses']} extracted "
                  f"({cache['extraction_seconds']:.1f} s)")
    worst = r["worst_beyond_model_private"] / GB
    print(f"  worst process: {worst:.2f} GB beyond the model ({_target(worst, 1.5, '1.5 GB', False)}); "
          f"second run extracted {r['second_run_misses']} entries (first: {r['first_run_misses']})")
    t = r["old_table"]
    print(f"  the float32 image-token table each process used to hold: {t['bytes_here'] / MiB:.0f} MiB here "
          f"({t['images']} images x {t['tokens_per_image']} x {t['width']}), "
          f"{t['bytes_karpathy_train'] / GB:.1f} GB for Karpathy's {KARPATHY_TRAIN_IMAGES:,} training images")


def print_epochs(r: dict[str, Any]) -> None:
    c = r["cached"]
    samples = "all" if r["train_samples"] is None else f"{r['train_samples']:,}"
    print(f"second epoch: configs/captioning/co_attention.yaml, 2 epochs of {c['steps'] // 2} steps "
          f"({samples} training captions)")
    print(f"  with the cache:    first epoch {c['first_epoch_seconds']:7.1f} s (features {c['prepare_seconds']:.1f} s "
          f"+ training {c['epoch_train_seconds'][0]:.1f} s), second {c['second_epoch_seconds']:7.1f} s; "
          f"images decoded: {c['decoded']}")
    print(f"  ratio first / second {r['ratio']:.2f}x ({_target(r['ratio'], 3.0, '3x')})")
    if "uncached" in r:
        u = r["uncached"]
        print(f"  feature_cache=false: first epoch {u['first_epoch_seconds']:7.1f} s, second "
              f"{u['second_epoch_seconds']:7.1f} s; images decoded: {u['decoded']}")
        print(f"  an epoch without the cache / with it: {r['live_over_cached_epoch']:.2f}x")


# -- main ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the coco-vqa-mini folder")
    parser.add_argument("--only", choices=("webdataset", "pretrain", "epochs"), action="append",
                        help="run only these measurements (repeatable; default all three)")
    parser.add_argument("--quick", action="store_true",
                        help="small settings: --pairs 2000, 10 pretraining steps, 512 training captions")
    parser.add_argument("--pairs", type=int, default=None, help="webdataset samples (default 20000; 2000 --quick)")
    parser.add_argument("--per-shard", type=int, default=1000, help="webdataset samples a shard")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="webdataset batch size")
    parser.add_argument("--repeats", type=int, default=2, help="passes of each webdataset measurement (best kept)")
    parser.add_argument("--vision", default="efficientnet-lite0", help="the encoder whose preprocessing is used")
    parser.add_argument("--text", default="minilm-l6", help="the tokenizer of the caption collate")
    parser.add_argument("--processes", type=int, default=1, help="pretraining processes (torchrun when > 1)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default 100; 10 --quick)")
    parser.add_argument("--pretrain-eval-samples", type=int, default=256, help="pretraining evaluation pairs")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="captioning training captions (default all, about 4,200; 512 --quick)")
    parser.add_argument("--uncached", action="store_true", help="also time captioning with feature_cache=false")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a pretraining worker may run")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.workers = cores if args.workers is None else args.workers
    args.pairs = args.pairs or (2000 if args.quick else 20000)
    args.pretrain_steps = args.pretrain_steps or (10 if args.quick else 100)
    if args.train_samples is None and args.quick:
        args.train_samples = 512
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory_worker is not None:  # internal: one pretraining process of measure_pretrain_memory
        memory_worker(json.loads(args.memory_worker))
        return {}
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads"
          + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + f"); torch {machine['torch']}, "
          f"python {machine['python']}")
    print(f"load average at start (1/5/15 min): {machine['loadavg_start']}  (other processes share these cores)")
    results: dict[str, Any] = {"machine": machine}
    wanted = args.only or ["webdataset", "pretrain", "epochs"]
    if not args.data.is_dir():
        message = f"{args.data} is missing (coco-vqa-mini): every measurement skipped"
        print(message)
        results["skipped"] = message
        return results
    if "webdataset" in wanted:
        results["webdataset"] = measure_webdataset(args, args.data)
        if "skipped" in results["webdataset"]:
            print(f"webdataset: skipped: {results['webdataset']['skipped']}")
        else:
            print_webdataset(results["webdataset"])
    if "pretrain" in wanted:
        results["pretrain"] = measure_pretrain_memory(args, args.data)
        print_pretrain(results["pretrain"])
    if "epochs" in wanted:
        results["epochs"] = measure_second_epoch(args, args.data)
        print_epochs(results["epochs"])
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at end: {results['loadavg_end']}")
    summary = {"cpu": machine["cpu"], "cores": machine["cpu_cores"]}
    if "webdataset" in results and "ratio" in results["webdataset"]:
        summary["webdataset_ratio"] = round(results["webdataset"]["ratio"], 3)
    if "pretrain" in results:
        summary["pretrain_beyond_model_gb"] = round(results["pretrain"]["worst_beyond_model_private"] / GB, 3)
        summary["pretrain_second_run_extractions"] = results["pretrain"]["second_run_misses"]
    if "epochs" in results:
        summary["second_epoch_speedup"] = round(results["epochs"]["ratio"], 2)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
