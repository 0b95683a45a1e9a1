"""Where one row of ``fusionzoo bench`` spends its training step, and how near it runs to the matmul peak.

It builds one row of the default benchmark (suite ``sort-of-clevr``) the way the bench does --
the task's data and the cached frozen-encoder features (:func:`fusionzoo.bench.suites.load_tasks`,
:func:`fusionzoo.bench.run_features.extract_features`), the row's settings
(:func:`fusionzoo.bench.settings.settings_for`), its model (:func:`fusionzoo.bench.row.build_bench_model`
under the seed), its precision (``--mixed-precision`` resolved as the bench does, per row) -- and
takes the bench's training step: a batch gathered from the feature arrays
(:meth:`~fusionzoo.bench.loop.FeatureView.batch`), the forward pass under the precision's
autocast, the non-finite check, then :func:`fusionzoo.training.step.optimizer_step` (backward,
clipping, fused AdamW over the project's decay groups), with the warmup-cosine rate set first.
It runs on the torch threads such a row gets: on a CPU the bench trains several rows at once in
worker processes that share the cores (:func:`row_threads`).

After a few warmup steps it times steps alone (the median is the step time), then runs more
steps under ``torch.profiler`` and prints:

* where a step's time goes, in categories (matrix products, attention and softmax, layer norm,
  element-wise ops and reductions, dtype casts and copies, the optimizer with gradient clipping
  and zeroing, gathering the batch, other), in ms per step and % of the profiled step, and the
  step's phases (gathering, forward, backward, optimizer); then the 15 ops with the most self time.
  Every op's *self* time (on the CPU; on CUDA the time of the kernels it launched) goes to one
  category; "other" holds the ops of no category and the time between ops (Python, the
  profiler's own bookkeeping; on CUDA also the GPU idling), so the categories sum to the step.
  The profiler slows a step down, so the profiled step is longer than the timed one;
* the step's model FLOPs (``torch.utils.flop_counter.FlopCounterMode`` on one forward +
  backward: matrix products and attention; element-wise work is not counted, as usual for MFU),
  the achieved TFLOP/s at the median step time, and the utilisation: that over the matmul peak
  this machine reaches at the step's precision (``benchmarks/perf.py``'s ``matmul_peak``,
  measured in this run on the step's threads before and after the steps, the better kept);
* the machine (:func:`fusionzoo.hardware.describe_machine`).

``--quick`` keeps the row's model, settings and step but feeds it a small synthetic feature set
of the row's shapes (Sort-of-CLEVR's questions tokenized, random states and image tokens of the
suite's grid and widths), takes a few steps and measures a small matmul peak: seconds, for a test.

Usage::

    python benchmarks/bench_profile.py                          # merged_transformer, the row's settings
    python benchmarks/bench_profile.py --fusion co_attention --precision bf16 --out profile.json
    python benchmarks/bench_profile.py --quick --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import bisect
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf.py, beside this file

from perf import FULL, QUICK, matmul_peak, measure_peaks, sync, timed, train_flops  # noqa: E402

from fusionzoo.bench.config import resolve_device, resolve_fusions, resolve_jobs  # noqa: E402
from fusionzoo.bench.features import add_position_channels, pool_image_tokens  # noqa: E402
from fusionzoo.bench.loop import FeatureView, resolve_precision, seeded, train_model  # noqa: E402
from fusionzoo.bench.row import build_bench_model, count_parameters  # noqa: E402
from fusionzoo.bench.run_features import Features, extract_features  # noqa: E402
from fusionzoo.bench.settings import (  # noqa: E402
    TEXT_ENCODER, VISION_ENCODER, TrainSettings, fusion_kwargs_for, row_precision, settings_for,
)
from fusionzoo.bench.suites import SUITES, BenchTask, SplitData, load_tasks  # noqa: E402
from fusionzoo.data.sort_of_clevr import COLORS, TEMPLATES, answer_vocabulary, question_text  # noqa: E402
from fusionzoo.encoders import TextEncoder, VisionEncoder, build_text_encoder, build_vision_encoder  # noqa: E402
from fusionzoo.errors import FusionZooError  # noqa: E402
from fusionzoo.features.cache import FeatureCache  # noqa: E402
from fusionzoo.features.layout import default_cache_dir  # noqa: E402
from fusionzoo.hardware import describe_machine  # noqa: E402
from fusionzoo.model import FusionModel  # noqa: E402
from fusionzoo.training.optim import ENCODER_PREFIXES, build_optimizer  # noqa: E402
from fusionzoo.training.step import (  # noqa: E402
    PRECISIONS, LearningRates, LocalAccelerator, check_finite, optimizer_step, plan_steps,
)

SUITE = "sort-of-clevr"
#: The bench clips a row's gradients to train_model's default norm.
MAX_GRAD_NORM = inspect.signature(train_model).parameters["max_grad_norm"].default

# record_function scopes the step is marked with (the optimizer marks its own step and zero_grad).
STEP, GATHER, FORWARD, BACKWARD, CLIP = "profiled step", "gather batch", "forward", "backward", "clip gradients"
OPTIMIZER_SCOPE = "Optimizer."  # the prefix of torch.optim's own marks
#: The categories, in print order; "other" last.
CATEGORIES = ("matmul / linear / bmm", "attention / softmax", "layer norm", "element-wise / reductions",
              "dtype casts / copies", "optimizer", "data gathering / indexing", "other")
PHASES = ("gather batch", "forward", "backward", "optimizer", "other")
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot", "einsum",
              "_addmm_activation", "mkldnn_linear"}
CAST_OPS = {"to", "_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "clone", "contiguous"}
INDEX_OPS = {"index", "index_select", "index_put_", "_index_put_impl_", "gather", "scatter", "scatter_add_",
             "embedding", "embedding_backward", "embedding_dense_backward", "masked_select", "take",
             "index_add_", "_embedding_bag"}
ELEMENTWISE_OPS = {
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "pow", "sqrt", "rsqrt", "exp", "log", "reciprocal",
    "gelu", "relu", "silu", "tanh", "sigmoid", "threshold", "clamp", "clamp_min", "clamp_max", "where",
    "masked_fill", "fill", "zero", "zeros", "zeros_like", "ones_like", "full", "lerp", "addcmul", "addcdiv",
    "sum", "mean", "amax", "max", "min", "norm", "linalg_vector_norm", "var", "std", "prod", "logsumexp",
    "binary_cross_entropy_with_logits", "cross_entropy", "nll_loss", "mse_loss", "eq", "ne", "gt", "lt",
    "ge", "le", "logical_not", "bitwise_not", "sign", "cat", "stack", "dropout", "native_dropout", "bernoulli",
}


# -- the row ------------------------------------------------------------------
def bench_features(task_name: str, vision: VisionEncoder, text: TextEncoder, device: torch.device,
                   cache_dir: str | None) -> tuple[BenchTask, Features, str]:
    """The row's task and features as ``fusionzoo bench`` gets them (the feature cache, extracting on a miss)."""
    suite = SUITES[SUITE]
    task, = load_tasks(suite, [task_name], None, quick=False)
    cache = FeatureCache(Path(cache_dir) if cache_dir else default_cache_dir())
    features, _ = extract_features([task], vision, text, None, cache, suite.image_size, device, progress=False,
                                   image_grid=suite.image_grid, image_stage=suite.image_stage,
                                   image_positions=suite.image_positions)
    return task, features, f"the bench's cached features ({cache.root})"


def synthetic_features(task_name: str, vision: VisionEncoder, text: TextEncoder, settings: TrainSettings,
                       samples: int = 256, images: int = 32) -> tuple[BenchTask, Features, str]:
    """A small feature set of the row's shapes: the suite's image grid and channels, tokenized questions.

    Image tokens: random values at the image encoder's stage map (its channels and stride at the
    suite's image size), pooled and given position channels as the bench does. Texts: every
    Sort-of-CLEVR question (template x colour), tokenized by the text encoder; random states of its width.
    """
    suite = SUITES[SUITE]
    g = torch.Generator().manual_seed(0)
    stage = vision.stages()[vision.stage_index(suite.image_stage)]
    side = suite.image_size // stage["reduction"]
    encoder_tokens = torch.randn(images, side * side, stage["num_chs"], generator=g)  # (U, side^2, C)
    image_tokens = add_position_channels(pool_image_tokens(encoder_tokens, suite.image_grid), suite.image_positions)
    questions = [question_text(template, color) for template in TEMPLATES for color in COLORS]
    tokens = text.tokenize(questions, max_length=settings.max_text_len)
    mask = tokens["attention_mask"].bool()  # (Q, T)
    states = torch.randn(*mask.shape, text.out_dim, generator=g).half()  # (Q, T, Dt), as cached
    answers = answer_vocabulary()
    labels = torch.zeros(samples, len(answers))
    labels[torch.arange(samples), torch.randint(len(answers), (samples,), generator=g)] = 1.0  # (S, A)
    paths = [f"synthetic/{i}.png" for i in range(images)]
    split = SplitData(image_paths=[paths[i % images] for i in range(samples)],
                      texts=[questions[i % len(questions)] for i in range(samples)], labels=labels)
    task = BenchTask(name=task_name, task="vqa", metric="accuracy", vocabulary=answers, train=split, test=split)
    arrays = {"input_ids": tokens["input_ids"].int(), "mask": mask, "states": states}  # the cache's dtypes
    features = Features(image_tokens=image_tokens.half(), image_row={p: i for i, p in enumerate(paths)},
                        texts={False: (arrays, {q: i for i, q in enumerate(questions)})},
                        image_grid=suite.image_grid, image_positions=suite.image_positions)
    return task, features, f"synthetic ({samples} samples of the row's shapes)"


class MarkedAccelerator(LocalAccelerator):
    """The bench's :class:`LocalAccelerator`, with its backward and clipping marked for the profiler."""

    def backward(self, loss: torch.Tensor) -> None:
        with record_function(BACKWARD):
            super().backward(loss)

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        with record_function(CLIP):
            return super().clip_grad_norm_(parameters, max_norm)


class RowStep:
    """One training step of the row, as :func:`fusionzoo.bench.loop.train_model` takes it; call it to step."""

    def __init__(self, model: FusionModel, view: FeatureView, settings: TrainSettings, precision: str,
                 device: torch.device, seed: int) -> None:
        self.model, self.view, self.device, self.settings = model, view, device, settings
        self.accelerator = MarkedAccelerator(precision, device)
        optimizer = build_optimizer(model, lr=settings.lr, weight_decay=settings.weight_decay,
                                    encoder_prefixes=ENCODER_PREFIXES)
        plan = plan_steps(math.ceil(len(view) / settings.batch_size), epochs=settings.epochs,
                          warmup_ratio=settings.warmup_ratio)
        self.rates = LearningRates(optimizer, plan)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.batches = self._shuffled(torch.Generator().manual_seed(seed))
        self.steps = 0
        model.train()

    def _shuffled(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Full batches of sample indices from shuffled passes over the split, without end."""
        size = min(self.settings.batch_size, len(self.view))
        while True:
            order = torch.randperm(len(self.view), generator=generator)
            for begin in range(0, len(order) - size + 1, size):
                yield order[begin: begin + size]

    def batch(self) -> dict[str, torch.Tensor]:
        """The model inputs of the next batch."""
        with record_function(GATHER):
            return self.view.batch(next(self.batches), self.device)

    def __call__(self) -> float:
        self.rates.set(self.steps % self.rates.plan.total)
        inputs = self.batch()
        with record_function(FORWARD), self.accelerator.autocast():
            out = self.model(**inputs)
        check_finite(out.loss, out.losses, where=f"at profiled step {self.steps}", advice="Try --precision no.")
        optimizer_step(self.accelerator, self.model, self.optimizer, out.loss, MAX_GRAD_NORM)
        self.steps += 1
        return float(out.loss.detach())  # as the bench logs every step's loss


# -- the profile ----------------------------------------------------------------
def op_category(name: str) -> str:
    """The category of an op by its name (``aten::addmm`` -> matmul)."""
    base = name.split("::", 1)[-1]
    if base in MATMUL_OPS:
        return CATEGORIES[0]
    if "softmax" in base or "scaled_dot_product" in base or "attention" in base:
        return CATEGORIES[1]
    if "layer_norm" in base or "rms_norm" in base:
        return CATEGORIES[2]
    if base.startswith("_foreach_") or "adam" in base:
        return CATEGORIES[5]
    if base in CAST_OPS:
        return CATEGORIES[4]
    if base in INDEX_OPS:
        return CATEGORIES[6]
    plain = base.rstrip("_").removesuffix("_backward")
    if plain in ELEMENTWISE_OPS or plain.rstrip("_") in ELEMENTWISE_OPS:
        return CATEGORIES[3]
    return CATEGORIES[-1]


class Spans:
    """Time spans of one mark on the stepping thread, to find which span an op started in."""

    def __init__(self, spans: list[tuple[float, float]]) -> None:
        self.spans = sorted(spans)
        self.starts = [start for start, _ in self.spans]

    def holds(self, t: float) -> bool:
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t <= self.spans[i][1]


def breakdown(events: Any, steps: int, on_cuda: bool) -> dict[str, Any]:
    """Categories, phases and top ops of the profiled steps, in ms per step (see the module docstring)."""
    cpu = [e for e in events if str(e.device_type).endswith("CPU")]
    step_events = [e for e in cpu if e.name == STEP]
    marks = {name: Spans([(e.time_range.start, e.time_range.end) for e in cpu
                          if e.name == name or name == OPTIMIZER_SCOPE and e.name.startswith(name)])
             for name in (STEP, GATHER, FORWARD, BACKWARD, CLIP, OPTIMIZER_SCOPE)}
    total_us = sum(e.cpu_time_total for e in step_events)
    categories: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [calls, self us]
    between_us = 0.0
    for e in cpu:
        start = e.time_range.start
        if not marks[STEP].holds(start):
            continue
        spent = (e.self_device_time_total if on_cuda else e.self_cpu_time_total)
        if marks[GATHER].holds(start):
            phase, category = PHASES[0], CATEGORIES[6]
        elif marks[CLIP].holds(start) or marks[OPTIMIZER_SCOPE].holds(start):
            phase, category = PHASES[3], CATEGORIES[5]
        else:
            phase = PHASES[1] if marks[FORWARD].holds(start) else PHASES[2] if marks[BACKWARD].holds(start) \
                else PHASES[4]
            category = CATEGORIES[-1] if e.name in (STEP, FORWARD, BACKWARD) else op_category(e.name)
        if e.name in (STEP, GATHER, FORWARD, BACKWARD, CLIP):  # a mark, not an op
            if category == CATEGORIES[-1]:
                between_us += spent  # its own time: Python and bookkeeping between the ops
        else:
            ops[e.name][0] += 1
            ops[e.name][1] += spent
        categories[category] += spent
        phases[phase] += spent
    untracked = total_us - sum(categories.values())  # CUDA: the GPU idle between kernels; CPU: ~0
    categories[CATEGORIES[-1]] += untracked
    phases[PHASES[4]] += untracked
    step_ms = total_us / 1e3 / steps
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    top = sorted(ops.items(), key=lambda item: -item[1][1])[:15]
    return {
        "profiled_step_ms": step_ms,
        "categories": {name: {"ms": per_step(us), "percent": 100 * us / total_us} for name, us in categories.items()},
        "other_between_ops_ms": per_step(between_us + untracked),
        "phases": {name: {"ms": per_step(us), "percent": 100 * us / total_us} for name, us in phases.items()},
        "top_ops": [{"name": name, "category": op_category(name), "calls_per_step": calls / steps,
                     "self_ms_per_step": per_step(us), "percent": 100 * us / total_us}
                    for name, (calls, us) in top],
        "time_source": "self CUDA time of each op's kernels" if on_cuda else "self CPU time",
    }


def profile_steps(step: Callable[[], float], steps: int, device: torch.device) -> Any:
    """``steps`` calls of ``step`` under ``torch.profiler``, each inside a :data:`STEP` mark; the events."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
                sync(device)  # the mark ends when the GPU is done
    return prof.events()


# -- FLOPs and the peak -----------------------------------------------------------
def _flash_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_backward(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                    **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


#: FlopCounterMode has formulas for the CUDA attention kernels but not PyTorch's CPU flash attention,
#: which the fusions' float32 attention takes on the CPU; the same formulas count it.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward,
}


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Model FLOPs of one forward + backward (:func:`perf.train_flops`, CPU attention counted too)."""
    return train_flops(model, batch, custom_mapping=CPU_ATTENTION_FLOPS)


def peak_gflops(device: torch.device, precision: str, quick: bool) -> tuple[float, str]:
    """The machine's matmul peak at ``precision`` (GFLOP/s) and what was measured (``perf.py``'s way).

    Measured before and after the steps, the best kept: a peak taken while other processes were
    busy would understate the machine and inflate the utilisation."""
    cfg = QUICK if quick else FULL
    if precision == "no":
        return matmul_peak(device, cfg, "fp32")["gflops"], "fp32"
    # bf16 autocast (fp16 too: this script measures no fp16 peak; on GPUs the two are the same
    # tensor-core rate): the faster of the bf16 kernels and bf16 through the fp32 units
    return measure_peaks(device, cfg)["bf16_gflops"], "bf16"


def row_threads(device: torch.device) -> int:
    """The torch threads of one row in a default ``fusionzoo bench`` run of the suite: on a CPU, torch's
    threads shared by the rows it trains at once (its default ``--jobs``), as its row workers get them."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() // resolve_jobs(None, device, rows=len(resolve_fusions(None))))


def commit() -> str | None:
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or None outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


# -- main ----------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fusion", default="merged_transformer",
                        help="the row's fusion: a registered fusion or a reference row (text_only, image_only); "
                             "default merged_transformer")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="as fusionzoo bench's --mixed-precision: auto picks bf16 where the device has fast "
                             "bf16 (keeping the fusions that are unsafe in bf16 in float32), else no (float32); "
                             "default auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda (CUDA synchronised timing, the CUDA "
                        "profiler, peak memory) or auto (cuda where available; the default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps under the profiler (default 10; 3 with --quick)")
    parser.add_argument("--timed-steps", type=int, default=None,
                        help="steps timed without the profiler; their median is the step time "
                             "(default 20; 5 with --quick)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the row's seed: its weights and batches (default 0, the bench's first seed)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: those of one row of a default fusionzoo bench run, which "
                             "on a CPU shares torch's threads among the rows it trains at once; 1 with --quick)")
    parser.add_argument("--cache-dir", default=None,
                        help="the bench's feature cache (default: fusionzoo bench's, $FUSIONZOO_CACHE or "
                             "~/.cache/fusionzoo/features); a miss extracts the features first")
    parser.add_argument("--quick", action="store_true",
                        help="synthetic features of the row's shapes, few steps, a small matmul peak: seconds")
    parser.add_argument("--out", default=None, help="also write every figure as JSON to this file (default: none)")
    args = parser.parse_args(argv)
    for name, full, quick in (("warmup", 5, 2), ("steps", 10, 3), ("timed_steps", 20, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the row, time and profile its step, count its FLOPs, measure the peak; the report."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or (1 if args.quick else row_threads(device)))
    machine = describe_machine(device)  # its load average is the start's
    fusion, = resolve_fusions([args.fusion])
    task_name = SUITES[SUITE].tasks[0]
    precision = row_precision(fusion, resolve_precision(args.precision, device), auto=args.precision == "auto",
                              fusion_kwargs=fusion_kwargs_for(fusion, task_name))
    settings = settings_for(task_name, fusion)
    torch.manual_seed(0)  # as fusionzoo bench builds its encoders
    vision = build_vision_encoder(VISION_ENCODER, pretrained=True)
    text = build_text_encoder(TEXT_ENCODER)
    vision.freeze()
    text.freeze()
    if args.quick:
        task, features, source = synthetic_features(task_name, vision, text, settings)
    else:
        task, features, source = bench_features(task_name, vision.to(device), text.to(device), device,
                                                args.cache_dir)
    view = features.view(task.train, False)
    kwargs = fusion_kwargs_for(fusion, task.name)
    with seeded(args.seed, device):
        model = build_bench_model(task, fusion, vision, text, kwargs, settings.max_text_len,
                                  features.stats(task.train, False), image_dim=features.image_dim).to(device)
    step = RowStep(model, view, settings, precision, device, args.seed)
    peaks = [peak_gflops(device, precision, args.quick)]  # at the start and at the end: the best of the two
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(step, device) for _ in range(args.timed_steps)]
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    profiled = breakdown(profile_steps(step, args.steps, device), args.steps, device.type == "cuda")
    flops = step_flops(model, step.batch())
    peaks.append(peak_gflops(device, precision, args.quick))
    peak, peak_kind = max(peaks)
    step_s = statistics.median(seconds)
    achieved = flops / step_s / 1e12
    return {
        "machine": machine,
        "commit": commit(),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "row": {"suite": SUITE, "task": task.name, "fusion": fusion, "precision": precision,
                "precision_asked": args.precision, "seed": args.seed, **asdict(settings), "fusion_kwargs": kwargs,
                "train_samples": len(view), "params_trainable": count_parameters(model)[0], "features": source,
                "max_grad_norm": MAX_GRAD_NORM},
        "steps": {"warmup": args.warmup, "timed": args.timed_steps, "profiled": args.steps},
        "step_ms": step_s * 1e3,
        "step_samples_ms": [round(s * 1e3, 3) for s in seconds],
        **profiled,
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "peak_tflops": peak / 1e3,
        "peak_kind": peak_kind,
        "peak_tflops_start_end": [gflops / 1e3 for gflops, _ in peaks],
        "utilisation": achieved / (peak / 1e3),
        "peak_memory_mib": peak_memory,
    }


def print_report(report: dict[str, Any]) -> None:
    machine, row = report["machine"], report["row"]
    print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads, "
          f"{machine['cpu_capability']}, bf16 instructions: {machine['cpu_bf16_instructions']})"
          + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
          + f"; torch {machine['torch']}; load average {machine['loadavg_start']} -> {report['loadavg_end']}")
    print(f"row: {row['suite']} / {row['fusion']}, {row['precision']} (asked {row['precision_asked']}), "
          f"batch {row['batch_size']}, {row['params_trainable']:,} trainable parameters, features: {row['features']}"
          + (f"; commit {report['commit']}" if report["commit"] else ""))
    print(f"\nprofiled step ({report['steps']['profiled']} steps, {report['time_source']}): "
          f"{report['profiled_step_ms']:.2f} ms; timed without the profiler: median {report['step_ms']:.2f} ms "
          f"of {report['steps']['timed']}")
    print(f"{'category':<28}{'ms/step':>9}{'%':>7}")
    for name, entry in report["categories"].items():
        print(f"{name:<28}{entry['ms']:>9.2f}{entry['percent']:>7.1f}")
    print(f"  (other includes {report['other_between_ops_ms']:.2f} ms between ops: Python, profiler, idle)")
    print("phases: " + ", ".join(f"{name} {entry['ms']:.2f} ms ({entry['percent']:.0f}%)"
                                 for name, entry in report["phases"].items()))
    print(f"\n{'top ops by self time':<52}{'calls':>7}{'ms/step':>9}{'%':>7}  category (by name; inside the "
          "batch gathering and the optimizer, the table above counts an op as theirs)")
    for op in report["top_ops"]:
        print(f"{op['name'][:51]:<52}{op['calls_per_step']:>7.0f}{op['self_ms_per_step']:>9.2f}"
              f"{op['percent']:>7.1f}  {op['category']}")
    print(f"\nFLOPs per step (FlopCounterMode, forward + backward): {report['flops_per_step'] / 1e9:.3f} GFLOP; "
          f"at {report['step_ms']:.2f} ms: {report['achieved_tflops'] * 1e3:.1f} GFLOP/s; "
          f"{report['peak_kind']} matmul peak {report['peak_tflops'] * 1e3:.1f} GFLOP/s; "
          f"utilisation {report['utilisation']:.1%}")
    if report["peak_memory_mib"] is not None:
        print(f"peak memory (torch.cuda.max_memory_allocated): {report['peak_memory_mib']:.1f} MiB")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        report = run(args)
    except FusionZooError as exc:  # an unknown fusion, --device cuda without CUDA, ...
        sys.exit(f"bench_profile.py: {exc}")
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
