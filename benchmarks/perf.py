"""Speed of every fusion, side by side with transformers' ViLT, and against the machine's own peak.

For every registered fusion, at one stated configuration (``--quick`` shrinks it), this
measures on the CPU, or on the GPU when one is present:

* the training step: forward + backward + AdamW step, in fp32 and under bf16 autocast
  (median of several timed steps after warmup);
* its model FLOPs utilisation (MFU): the step's FLOPs, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward (matrix
  multiplications, convolutions and attention; element-wise work is not counted, as
  usual for MFU), divided by the step time and by the matmul peak this script measured
  on the same machine (large square matmuls, best of several);
* peak training memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was
  allocated before the step; on the CPU the process RSS sampled every millisecond by a
  thread (:class:`fusionzoo.hardware.RssSampler`) in a separate worker process started with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors go back to the OS: the peak
  above the RSS before the step (activations and gradients; weights and AdamW state are
  reported apart);
* inference samples/s (eval mode, no gradients) in fp32 and bf16;
* caption generation tokens/s with and without the key/value cache (beam search, EOS
  disabled so every run decodes exactly the same number of tokens).

With ``--vs-vilt`` it also builds ``transformers.ViltForQuestionAnswering`` (random
init from a ``ViltConfig``; nothing is downloaded) at the same configuration, prints both
parameter counts, and times ViLT's and our ``merged_transformer`` training steps in the
same process, alternating one step of each so that a change in the machine's load hits
both; the last stdout line is then one JSON object with ``vilt_ratio_fp32``,
``vilt_ratio_bf16`` (ours / theirs step time), ``mfu_bf16``, ``kv_cache_speedup`` and more.

The equal configuration (ViLT-B/32 shrunk to ViLT's "small" width): hidden 384, 6
layers, 6 heads, MLP 1536, 16 text tokens, 224x224 images in 32x32 patches (49 patches
and an image [CLS]), batch 32, 13 answers, a 30522-token vocabulary. Our side: the
image path is ViLT's patch embedding (a 32x32, stride-32 patchifier with the weights
of ``Conv2d(3, 384, 32, 32)``, computed as one matrix multiplication over the
unfolded patches) plus an image [CLS]; the text side is BERT's embeddings only (a
text encoder with 0 layers, like ViLT's text embeddings); ``merged_transformer``
plays ViLT's Transformer and the VQA head its classifier. Both sides train with the
same optimiser (AdamW, fused kernel where PyTorch has one) on batches already in
memory, so the data path never waits.

Usage::

    python benchmarks/perf.py                 # every fusion (minutes on a CPU)
    python benchmarks/perf.py --vs-vilt       # ... and the ViLT comparison
    python benchmarks/perf.py --quick --vs-vilt --out /tmp/perf.json   # smoke run, seconds
    python benchmarks/perf.py --fusions merged_transformer --vs-vilt --compile
    python benchmarks/perf.py --fusions merged_transformer --vs-vilt --compile --compile-vilt   # both compiled
    python benchmarks/perf.py --int8 runs/vqa/final   # INT8 against float32: CPU batch-predict latency, size
    python benchmarks/perf.py --int8 --quick          # the same on a tiny random VQA model, seconds

With ``--int8 [MODEL]`` it measures only that: a saved float model (or, without MODEL, a tiny
random VQA ``merged_transformer``) and its INT8 copy (:mod:`fusionzoo.quantize`) answer the
same batch of images and questions with ``predict`` on the CPU, one call of each per round
(``--repeats`` rounds, interleaved as everywhere here; the forward after the image encoder is timed
the same way in a group of its own, so that the seconds-long ``predict`` calls do not spend its time
budget), and both are saved to compare the bytes of their ``model.safetensors``; the last stdout line has ``int8_latency_ratio`` and
``int8_size_ratio`` (INT8 / float32), ``int8_after_vision_ratio`` (the same forward from the image
encoder's tokens on: the text encoder, fusion and head) and how many of the batch's answers agree.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

# OpenMP's wait policy is left to the environment. OMP_WAIT_POLICY=PASSIVE (idle threads sleep)
# helps only when other processes share the cores; on an idle machine it slows cached caption
# decoding -- many tiny ops, each waking the threads -- and leaves the large training matmuls as
# they are (the README's benchmark section has the figure).

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import fusionzoo  # noqa: E402
from fusionzoo.encoders import VisionEncoder  # noqa: E402
from fusionzoo.hardware import RssSampler, describe_machine, rss_bytes, rss_is_current  # noqa: E402
from fusionzoo.layers import Linear, cpu_has_optimized_bf16_kernels  # noqa: E402
from fusionzoo.model import FusionModel  # noqa: E402

VOCAB_SIZE = 30522  # BERT's uncased vocabulary, ViLT's and the MiniLM tokenizer's
MAX_POSITIONS = 40  # ViLT's max_position_embeddings
PATCH_PRESET = "perf-patch-embed"


# -- configuration -----------------------------------------------------------
@dataclass(frozen=True)
class PerfConfig:
    """The model shape and workload of every measurement of this script (the ViLT comparison uses it too).

    Not :class:`fusionzoo.bench.BenchConfig`, which configures ``fusionzoo bench`` (training and scoring).

    Attributes:
        batch: training and inference batch size.
        text_len: text tokens per sample.
        image_size: square image side in pixels.
        patch: patch side in pixels (``(image_size / patch) ** 2`` patch tokens + [CLS]).
        dim, layers, heads, mlp_ratio: the fusion's width, depth, heads, MLP ratio.
        num_answers: VQA answers.
        caption_text_layers: layers of the causal text encoder of the captioning models
            (the VQA models' text side has none; a key/value cache needs at least one).
        gen_images, gen_tokens, beams: caption generation workload.
        warmup, repeats: untimed and timed calls per measurement.
        budget_s: stop adding timed repeats to a measurement after this many seconds.
        slow_s: a warmup call slower than this counts as the measurement's only sample
            (its one-time costs are noise next to it).
        peak_sizes: square matmul sizes for the machine's peak.
    """

    batch: int = 32
    text_len: int = 16
    image_size: int = 224
    patch: int = 32
    dim: int = 384
    layers: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    num_answers: int = 13
    caption_text_layers: int = 1
    gen_images: int = 2
    gen_tokens: int = 20
    beams: int = 3
    warmup: int = 1
    repeats: int = 3
    budget_s: float = 25.0
    slow_s: float = 20.0
    peak_sizes: tuple[int, ...] = (1024, 2048, 4096)

    @property
    def image_tokens(self) -> int:
        """Patch tokens plus the image [CLS]."""
        return (self.image_size // self.patch) ** 2 + 1


FULL = PerfConfig()
QUICK = PerfConfig(
    batch=4, text_len=8, image_size=64, patch=32, dim=32, layers=1, heads=2, num_answers=13,
    gen_images=1, gen_tokens=4, beams=3, warmup=1, repeats=2, budget_s=2.0, slow_s=5.0,
    peak_sizes=(128, 256),
)


_START = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr, with the seconds since the start (stdout stays the report)."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# -- timing ------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call: the median of ``samples``; ``first_counted`` if the only sample is the first call."""

    median_s: float
    samples: list[float]
    first_counted: bool = False


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, cfg: PerfConfig,
    first_calls: dict[str, float] | None = None,
) -> dict[str, Timing]:
    """Time several callables one call of each per round, so that load changes hit all of them.

    Each is warmed up ``cfg.warmup`` times first. A callable whose warmup call takes
    longer than ``cfg.slow_s`` keeps that call as its only sample. The others run
    ``cfg.repeats`` rounds, fewer when ``cfg.budget_s`` is spent (at least one).

    ``first_calls`` (a dict to fill): each callable is called once before its warmup and
    that call's seconds are stored there under its name, never a sample nor judged slow --
    a compiled model's first call is its compilation, which would otherwise become its
    only sample.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    slow: set[str] = set()
    if first_calls is not None:
        for name, fn in fns.items():
            first_calls[name] = timed(fn, device)
    for name, fn in fns.items():
        for _ in range(cfg.warmup):
            seconds = timed(fn, device)
            if seconds > cfg.slow_s:
                samples[name].append(seconds)
                slow.add(name)
                break
    start = time.perf_counter()
    for _ in range(cfg.repeats):
        for name, fn in fns.items():
            if name not in slow:
                samples[name].append(timed(fn, device))
        if time.perf_counter() - start > cfg.budget_s:
            break
    return {name: Timing(statistics.median(s), s, name in slow) for name, s in samples.items()}


# -- memory ------------------------------------------------------------------
def rss_mb() -> float:
    return rss_bytes() / 2**20


def step_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call of ``step`` needs above what was in use before it, in MiB."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with RssSampler(interval_s=0.001) as sampler:
        step()
    return sampler.increase() / 2**20


# -- models ------------------------------------------------------------------
class PatchEmbedder(nn.Module):
    """ViLT's patch embedding as a headless timm-style image model: patches -> tokens, plus an image [CLS].

    ``proj`` holds the weights of ``Conv2d(3, dim, patch, stride=patch)`` flattened in the
    conv's (channel, row, column) order; the conv is computed as one matrix
    multiplication over the unfolded, non-overlapping patches. ``forward_features``
    returns (B, 1 + (H/patch) * (W/patch), dim), the [CLS] first; position embeddings
    are the fusion's business.
    """

    num_classes = 0

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.num_features = dim
        self.proj = Linear(3 * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, pixels: Tensor) -> Tensor:
        b, c, h, w = pixels.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image sides {h}x{w} must be multiples of the patch size {p}")
        patches = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        tokens = self.proj(patches.reshape(b, (h // p) * (w // p), c * p * p))  # (B, N, D)
        return torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + N, D)

    def forward_head(self, features: Tensor, pre_logits: bool = True) -> Tensor:
        return features[:, 0]  # (B, D): the image [CLS]


def patch_embed_encoder(pretrained: bool = False, dim: int = 384, patch: int = 32, image_size: int = 224) -> VisionEncoder:
    """The benchmark's image encoder: :class:`PatchEmbedder`, random weights."""
    data_config = {
        "input_size": (3, image_size, image_size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
    }
    return VisionEncoder(PatchEmbedder(dim, patch), {"preset": PATCH_PRESET}, data_config=data_config)


def build_ours(task: str, fusion: str, cfg: PerfConfig) -> FusionModel:
    """A fusionzoo model at ``cfg``: patch embedding, BERT embeddings (0 layers; 1 for captioning), the fusion."""
    if PATCH_PRESET not in fusionzoo.VISION_ENCODERS:
        fusionzoo.register_vision_encoder(PATCH_PRESET)(patch_embed_encoder)
    captioning = task == "captioning"
    text = {
        "preset": "tiny",
        "kwargs": {
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.caption_text_layers if captioning else 0,
            "num_attention_heads": cfg.heads,
            "intermediate_size": int(cfg.dim * cfg.mlp_ratio),
            "max_position_embeddings": MAX_POSITIONS,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
    }
    fusion_kwargs: dict[str, Any] = {
        "dim": cfg.dim, "num_layers": cfg.layers, "num_heads": cfg.heads, "mlp_ratio": cfg.mlp_ratio, "dropout": 0.0,
    }
    if fusion == "merged_transformer":  # position tables of ViLT's sizes
        fusion_kwargs.update(max_text_len=MAX_POSITIONS, max_image_tokens=cfg.image_tokens)
    model = fusionzoo.create_model(
        task,
        fusion,
        vision={"preset": PATCH_PRESET, "kwargs": {"dim": cfg.dim, "patch": cfg.patch, "image_size": cfg.image_size}},
        text=text,
        pretrained=False,
        answers=None if captioning else [f"answer {i}" for i in range(cfg.num_answers)],
        fusion_kwargs=fusion_kwargs,
        head_kwargs=None if captioning else {"dropout": 0.0},
        max_text_len=cfg.text_len,
    )
    return model


def build_vilt(cfg: PerfConfig) -> nn.Module:
    """``transformers.ViltForQuestionAnswering`` at ``cfg``, randomly initialised (no download)."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    config = ViltConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=int(cfg.dim * cfg.mlp_ratio),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        image_size=cfg.image_size,
        patch_size=cfg.patch,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=cfg.num_answers,
        id2label={i: f"answer {i}" for i in range(cfg.num_answers)},
        label2id={f"answer {i}": i for i in range(cfg.num_answers)},
    )
    return ViltForQuestionAnswering(config)


def vqa_batch(cfg: PerfConfig, device: torch.device, vilt: bool = False) -> dict[str, Tensor]:
    """A synthetic VQA batch, already on ``device`` (the data path never makes the model wait)."""
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=g),
        "input_ids": torch.randint(1000, VOCAB_SIZE, (cfg.batch, cfg.text_len), generator=g),
        "attention_mask": torch.ones(cfg.batch, cfg.text_len, dtype=torch.long),
        "labels": torch.rand(cfg.batch, cfg.num_answers, generator=g),  # VQA soft scores
    }
    if vilt:
        batch["pixel_mask"] = torch.ones(cfg.batch, cfg.image_size, cfg.image_size, dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The same optimiser for both sides: AdamW with the fused kernel, else the foreach one."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError):  # no fused AdamW for this device / PyTorch
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)


def train_step(model: nn.Module, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               device: torch.device, precision: str) -> Callable[[], None]:
    """One forward + backward + optimiser step (works for our models and for ViLT: both return ``.loss``)."""

    def step() -> None:
        with autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_flops(model: nn.Module, batch: dict[str, Tensor], custom_mapping: dict[Any, Any] | None = None) -> int:
    """FLOPs of one forward + backward (FlopCounterMode: matmuls, convolutions, attention; ``custom_mapping``:
    formulas for more ops, as FlopCounterMode takes them)."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=custom_mapping or {}) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    return torch.compile(model) if enabled else model


# -- the machine's peak ------------------------------------------------------
def matmul_peak(device: torch.device, cfg: PerfConfig, kind: str) -> dict[str, Any]:
    """Best GFLOP/s of square matmuls ``a @ b`` and ``a @ b.T`` (3 timed runs each, after one warmup).

    ``kind``: ``"fp32"``; ``"bf16"`` (PyTorch's bf16 kernels); ``"bf16_via_fp32"`` (a bf16
    activation times an fp32 weight on the fp32 kernels, the result rounded to bf16:
    what :class:`fusionzoo.layers.Linear` does on CPUs without optimised bf16 kernels).
    Sizes grow through ``cfg.peak_sizes`` until one call takes longer than a second.
    """
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    best, results = 0.0, {}
    for n in cfg.peak_sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        calls = {
            "a@b": lambda: a @ b,
            "a@b.T": lambda: a @ b.t(),
        }
        if kind == "bf16_via_fp32":  # bf16 activations a, fp32 weights w, bf16 result
            w = b.float()
            calls = {
                "a@b": lambda: (a.float() @ w).to(dtype),
                "a@b.T": lambda: (a.float() @ w.t()).to(dtype),
            }
        too_slow = False
        for layout, fn in calls.items():
            first = timed(fn, device)
            seconds = min([first] + [timed(fn, device) for _ in range(0 if first > 1.0 else 3)])
            gflops = 2 * n**3 / seconds / 1e9
            results[f"{n}:{layout}"] = round(gflops, 2)
            best = max(best, gflops)
            too_slow = too_slow or first > 1.0
        if too_slow:
            break
    return {"gflops": round(best, 2), "by_size_and_layout": results}


def measure_peaks(device: torch.device, cfg: PerfConfig) -> dict[str, Any]:
    """fp32 and bf16 matmul peaks; on a CPU without optimised bf16 kernels also bf16 through the fp32 units.

    ``bf16_gflops`` is the fastest way this machine multiplies bf16 matrices in PyTorch
    (the larger of the two bf16 figures): the reference for the bf16 MFU.
    """
    peaks: dict[str, Any] = {"fp32": matmul_peak(device, cfg, "fp32"), "bf16": matmul_peak(device, cfg, "bf16")}
    if device.type == "cpu" and not cpu_has_optimized_bf16_kernels():
        peaks["bf16_via_fp32"] = matmul_peak(device, cfg, "bf16_via_fp32")
    set_reference_peaks(peaks)
    return peaks


def set_reference_peaks(peaks: dict[str, Any]) -> None:
    """``fp32_gflops`` and ``bf16_gflops`` (the faster of the two bf16 ways) from the measured kinds."""
    peaks["fp32_gflops"] = peaks["fp32"]["gflops"]
    peaks["bf16_gflops"] = max(peaks[k]["gflops"] for k in ("bf16", "bf16_via_fp32") if k in peaks)


def recheck_peaks(peaks: dict[str, Any], device: torch.device, cfg: PerfConfig) -> None:
    """Measure the fp32 (and bf16-through-fp32) peak again at one size and keep the best.

    Called before each fusion: a peak taken while other processes were busy would
    understate the machine and inflate every MFU. Native bf16 kernels are not
    rechecked where they are the slow fallback.
    """
    sizes = cfg.peak_sizes[-2:-1] or cfg.peak_sizes[-1:]
    kinds = ["fp32"] + (["bf16_via_fp32"] if "bf16_via_fp32" in peaks else ["bf16"])
    for kind in kinds:
        gflops = matmul_peak(device, replace(cfg, peak_sizes=sizes), kind)["gflops"]
        peaks[kind].setdefault("rechecks", []).append(gflops)
        peaks[kind]["gflops"] = max(peaks[kind]["gflops"], gflops)
    set_reference_peaks(peaks)


def add_mfu(results: list["FusionResult"], vilt: dict[str, Any] | None, peaks: dict[str, Any]) -> None:
    """Model FLOPs utilisation of every training step against the best peak seen in the run."""
    reference = {"fp32": peaks["fp32_gflops"], "bf16": peaks["bf16_gflops"]}
    for r in results:
        r.mfu = {p: r.train_gflop / (ms / 1e3) / reference[p] for p, ms in r.train_ms.items()}
    if vilt is not None:
        for precision, peak in reference.items():
            for side in ("ours", "vilt"):
                vilt[f"mfu_{side}_{precision}"] = vilt[f"gflop_{side}"] / (vilt[f"{side}_ms_{precision}"] / 1e3) / peak


# -- per-fusion measurements ---------------------------------------------------
@dataclass
class FusionResult:
    """Everything measured for one fusion (times in ms, memory in MiB)."""

    fusion: str
    params: int
    train_ms: dict[str, float] = field(default_factory=dict)
    train_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    train_gflop: float = 0.0
    mfu: dict[str, float] = field(default_factory=dict)
    infer_samples_per_s: dict[str, float] = field(default_factory=dict)
    caption_tokens_per_s: dict[str, float] = field(default_factory=dict)
    kv_cache_speedup: float = 0.0
    memory_mb: dict[str, float] = field(default_factory=dict)
    loadavg: list[float] = field(default_factory=list)
    #: with --compile: seconds of each step's first call (its compilation), left out of the timings
    compile_s: dict[str, float] = field(default_factory=dict)


def measure_training(model: nn.Module, batch: dict[str, Tensor], device: torch.device, cfg: PerfConfig,
                     precisions: tuple[str, ...], first_calls: dict[str, float] | None = None) -> dict[str, Timing]:
    """Training-step timings for each precision, interleaved (one optimiser, shared by both);
    ``first_calls``: as :func:`time_interleaved`'s (a compiled model's compile seconds)."""
    model.train()
    optimizer = make_adamw(model)
    steps = {p: train_step(model, batch, optimizer, device, p) for p in precisions}
    return time_interleaved(steps, device, cfg, first_calls)


def measure_inference(model: FusionModel, batch: dict[str, Tensor], device: torch.device, cfg: PerfConfig,
                      precisions: tuple[str, ...], first_calls: dict[str, float] | None = None) -> dict[str, float]:
    """Eval-mode forward samples/s (no labels, no gradients) per precision; ``first_calls`` as
    :func:`time_interleaved`'s."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(precision: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device, precision):
                model(**inputs)
        return run

    timings = time_interleaved({p: forward(p) for p in precisions}, device, cfg, first_calls)
    model.train()
    return {p: cfg.batch / t.median_s for p, t in timings.items()}


def measure_generation(fusion: str, device: torch.device, cfg: PerfConfig) -> tuple[dict[str, float], float]:
    """Caption tokens/s with and without the key/value cache, and the speedup (fp32).

    EOS is disabled on this model instance so that both runs decode exactly
    ``cfg.gen_tokens`` tokens per image (a random model may otherwise stop at once).
    """
    torch.manual_seed(0)
    model = build_ours("captioning", fusion, cfg).to(device).eval()
    model.text.eos_token_id = -1  # never produced: every beam runs the full length
    pixels = torch.randn(cfg.gen_images, 3, cfg.image_size, cfg.image_size, device=device)

    def generate(use_cache: bool) -> Callable[[], None]:
        def run() -> None:
            ids = model.generate_ids(pixels, max_new_tokens=cfg.gen_tokens, num_beams=cfg.beams, use_cache=use_cache)
            if ids.shape[1] != cfg.gen_tokens + 1:
                raise RuntimeError(f"expected {cfg.gen_tokens} generated tokens, got {ids.shape[1] - 1}")
        return run

    timings = time_interleaved({"kv_cache": generate(True), "no_cache": generate(False)}, device, cfg)
    tokens = cfg.gen_images * cfg.gen_tokens
    rates = {k: tokens / t.median_s for k, t in timings.items()}
    return rates, timings["no_cache"].median_s / timings["kv_cache"].median_s


def measure_fusion(fusion: str, device: torch.device, cfg: PerfConfig, compile_model: bool) -> FusionResult:
    """Training, FLOPs/MFU, inference and generation for one fusion (memory comes from the worker)."""
    torch.manual_seed(0)
    model = build_ours("vqa", fusion, cfg).to(device)
    batch = vqa_batch(cfg, device)
    result = FusionResult(fusion=fusion, params=num_params(model))
    result.train_gflop = train_flops(model, batch) / 1e9
    runnable = maybe_compile(model, compile_model)
    compiling: dict[str, float] | None = {} if compile_model else None
    timings = measure_training(runnable, batch, device, cfg, ("fp32", "bf16"), compiling)
    for precision, timing in timings.items():
        result.train_ms[precision] = timing.median_s * 1e3
        result.train_samples_ms[precision] = [round(s * 1e3, 1) for s in timing.samples]
    if compiling is not None:
        result.compile_s.update({f"train_{p}": round(s, 2) for p, s in compiling.items()})
    progress(f"  {fusion}: inference")
    compiling = {} if compile_model else None
    result.infer_samples_per_s = measure_inference(runnable, batch, device, cfg, ("fp32", "bf16"), compiling)
    if compiling is not None:
        result.compile_s.update({f"infer_{p}": round(s, 2) for p, s in compiling.items()})
    del runnable, model
    gc.collect()
    progress(f"  {fusion}: caption generation")
    result.caption_tokens_per_s, result.kv_cache_speedup = measure_generation(fusion, device, cfg)
    result.loadavg = [round(x, 2) for x in os.getloadavg()]
    return result


# -- memory worker (a separate process: see the module docstring) ---------------------
def memory_worker(cfg: PerfConfig, fusions: list[str], with_vilt: bool, device: torch.device) -> dict[str, Any]:
    """Peak training-step memory above the RSS before the step, per fusion (and ViLT), per precision.

    Runs in a fresh process. Each model: build it and its optimiser, one fp32 step (so
    AdamW's state exists), then one sampled step per precision. ``state_mb`` is the RSS
    growth from building to after the first step (weights, AdamW state, caches).
    bf16 is skipped for ViLT on CPUs without optimised bf16 kernels (one step takes minutes).
    """
    out: dict[str, Any] = {}
    names = list(fusions) + (["vilt"] if with_vilt else [])
    for name in names:
        gc.collect()
        start = rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
        torch.manual_seed(0)
        model = (build_vilt(cfg) if name == "vilt" else build_ours("vqa", name, cfg)).to(device).train()
        batch = vqa_batch(cfg, device, vilt=name == "vilt")
        optimizer = make_adamw(model)
        train_step(model, batch, optimizer, device, "fp32")()
        sync(device)
        after = rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
        entry: dict[str, float] = {"state_mb": round(after - start, 1)}
        precisions = ["fp32", "bf16"]
        if name == "vilt" and device.type == "cpu" and not cpu_has_optimized_bf16_kernels():
            precisions = ["fp32"]
        for precision in precisions:
            entry[precision] = round(step_memory_mb(train_step(model, batch, optimizer, device, precision), device), 1)
        out[name] = entry
        del model, optimizer, batch
    return out


def run_memory_worker(cfg: PerfConfig, fusions: list[str], with_vilt: bool, device: torch.device) -> dict[str, Any]:
    """Start :func:`memory_worker` in a fresh process; on CUDA run it here (the allocator keeps exact counts)."""
    if device.type == "cuda":
        return memory_worker(cfg, fusions, with_vilt, device)
    if not rss_is_current():
        return {"error": "no way to read this process's current RSS here (no /proc/self/statm, psutil not "
                         "installed): no CPU memory figures (pip install psutil)"}
    payload = json.dumps({"cfg": asdict(cfg), "fusions": fusions, "vilt": with_vilt})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", payload, "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, env=env, check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"memory worker failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


# -- ViLT, side by side ------------------------------------------------------------
def compare_with_vilt(device: torch.device, cfg: PerfConfig, compile_model: bool,
                      compile_vilt: bool = False) -> dict[str, Any]:
    """Our merged_transformer and transformers' ViLT at one configuration, steps alternating.

    ``compile_model`` / ``compile_vilt``: torch.compile that side; a compiled side takes one step
    per precision before the timing (compilation, reported as ``<side>_compile_s_<precision>``)."""
    torch.manual_seed(0)
    ours = build_ours("vqa", "merged_transformer", cfg).to(device).train()
    vilt = build_vilt(cfg).to(device).train()
    ours_batch, vilt_batch = vqa_batch(cfg, device), vqa_batch(cfg, device, vilt=True)
    report: dict[str, Any] = {
        "params_ours": num_params(ours),
        "params_vilt": num_params(vilt),
        "gflop_ours": train_flops(ours, ours_batch) / 1e9,
        "gflop_vilt": train_flops(vilt, vilt_batch) / 1e9,
    }
    report["params_ratio"] = report["params_ours"] / report["params_vilt"]
    report["compiled"] = {"ours": compile_model, "vilt": compile_vilt}
    ours_run, vilt_run = maybe_compile(ours, compile_model), maybe_compile(vilt, compile_vilt)
    ours_opt, vilt_opt = make_adamw(ours), make_adamw(vilt)
    for precision in ("fp32", "bf16"):
        steps = {
            "ours": train_step(ours_run, ours_batch, ours_opt, device, precision),
            "vilt": train_step(vilt_run, vilt_batch, vilt_opt, device, precision),
        }
        for side in (side for side, compiled in report["compiled"].items() if compiled):
            report[f"{side}_compile_s_{precision}"] = timed(steps[side], device)  # outside the timed rounds
        timings = time_interleaved(steps, device, cfg)
        for side in ("ours", "vilt"):
            t = timings[side]
            report[f"{side}_ms_{precision}"] = t.median_s * 1e3
            report[f"{side}_samples_ms_{precision}"] = [round(s * 1e3, 1) for s in t.samples]
            report[f"{side}_first_step_counted_{precision}"] = t.first_counted
        report[f"vilt_ratio_{precision}"] = timings["ours"].median_s / timings["vilt"].median_s
        report[f"loadavg_after_{precision}"] = [round(x, 2) for x in os.getloadavg()]
    return report


# -- printing ----------------------------------------------------------------
def print_table(results: list[FusionResult], memory: dict[str, Any]) -> None:
    head = (
        f"{'fusion':<20}{'params':>8}{'GFLOP':>7}{'fp32 ms':>9}{'bf16 ms':>9}{'MFU32':>7}{'MFU16':>7}"
        f"{'mem32':>8}{'mem16':>8}{'inf32/s':>9}{'inf16/s':>9}{'kv tok/s':>10}{'no-kv':>8}{'kv x':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        mem = memory.get(r.fusion, {}) if isinstance(memory, dict) else {}
        print(
            f"{r.fusion:<20}{r.params / 1e6:>7.1f}M{r.train_gflop:>7.1f}{r.train_ms['fp32']:>9.0f}"
            f"{r.train_ms['bf16']:>9.0f}{r.mfu['fp32']:>7.1%}{r.mfu['bf16']:>7.1%}"
            f"{mem.get('fp32', float('nan')):>8.0f}{mem.get('bf16', float('nan')):>8.0f}"
            f"{r.infer_samples_per_s['fp32']:>9.1f}{r.infer_samples_per_s['bf16']:>9.1f}"
            f"{r.caption_tokens_per_s['kv_cache']:>10.1f}{r.caption_tokens_per_s['no_cache']:>8.1f}"
            f"{r.kv_cache_speedup:>6.1f}"
        )
    for r in results:
        if r.compile_s:  # --compile: the first calls, kept out of the columns above
            print(f"{r.fusion}: compiling (first call, untimed) " +
                  ", ".join(f"{key} {seconds:.1f} s" for key, seconds in r.compile_s.items()))


def print_vilt(report: dict[str, Any]) -> None:
    print(f"parameters: ours (merged_transformer) {report['params_ours']:,}  ViLT {report['params_vilt']:,}  "
          f"(ours/ViLT {report['params_ratio']:.3f})")
    print(f"GFLOP per training step (FlopCounterMode): ours {report['gflop_ours']:.1f}  ViLT {report['gflop_vilt']:.1f}")
    for precision in ("fp32", "bf16"):
        note = "  (ViLT: one step only, it is that slow)" if report[f"vilt_first_step_counted_{precision}"] else ""
        print(
            f"{precision}: ours {report[f'ours_ms_{precision}']:.0f} ms  ViLT {report[f'vilt_ms_{precision}']:.0f} ms  "
            f"ratio ours/ViLT {report[f'vilt_ratio_{precision}']:.3f}  MFU ours {report[f'mfu_ours_{precision}']:.1%} "
            f"ViLT {report[f'mfu_vilt_{precision}']:.1%}{note}"
        )


# -- INT8 against float32 -------------------------------------------------------
def measure_int8(model_dir: str | None, cfg: PerfConfig, batch: int, threads: int) -> dict[str, Any]:
    """CPU batch-predict latency and saved size of a float model and its INT8 copy (see the module docstring)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from fusionzoo.model_folder import WEIGHTS_NAME
    from fusionzoo.quantize import quantize_model

    if model_dir is None:
        torch.manual_seed(0)
        model = fusionzoo.create_model("vqa", "merged_transformer", "tiny", "tiny",
                                       answers=[f"answer {i}" for i in range(cfg.num_answers)]).eval()
    else:
        model = fusionzoo.load_model(model_dir)
    if model.head.causal:
        raise SystemExit(f"--int8 times predict (VQA, classification); {model_dir} is a {model.task} model")
    int8 = quantize_model(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(batch)]
    words = ["what", "color", "shape", "is", "the", "there", "a", "red", "circle", "in", "image"]
    questions = [" ".join(rng.choice(words, size=6)) + "?" for _ in range(batch)]
    with tempfile.TemporaryDirectory(prefix="perf-int8-") as tmp:
        sizes = {name: (m.save_pretrained(Path(tmp) / name) / WEIGHTS_NAME).stat().st_size
                 for name, m in (("fp32", model), ("int8", int8))}
    answers = {name: m.predict(images, questions) for name, m in (("fp32", model), ("int8", int8))}
    # The same models after the image encoder (its tokens given): the text encoder, fusion and head, where
    # the Linear layers are; an EfficientNet image encoder is convolutions, the same in both.
    with torch.no_grad():
        image_states = model.vision(model.vision.preprocess(images)).tokens  # (B, N, Di)
    text = model.text.tokenize(questions, max_length=model.max_text_len)

    def after_vision(m: nn.Module) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                m(image_states=image_states, **text)
        return run

    # two interleaved timings: a predict call is seconds, so its budget would leave the short ones few rounds
    timings = time_interleaved({"fp32": lambda: model.predict(images, questions),
                                "int8": lambda: int8.predict(images, questions)}, torch.device("cpu"), cfg)
    timings.update(time_interleaved({"fp32_after_vision": after_vision(model),
                                     "int8_after_vision": after_vision(int8)}, torch.device("cpu"), cfg))
    ms = {name: 1e3 * t.median_s for name, t in timings.items()}
    agree = sum(a == b for a, b in zip(answers["fp32"], answers["int8"]))
    return {
        "model": model_dir or "tiny random vqa/merged_transformer", "batch": batch, "threads": threads,
        "quantized_layers": int8.config["quantization"]["quantized_layers"],
        "fp32_ms": ms["fp32"], "int8_ms": ms["int8"],
        "fp32_samples_ms": [1e3 * t for t in timings["fp32"].samples],
        "int8_samples_ms": [1e3 * t for t in timings["int8"].samples],
        "int8_latency_ratio": ms["int8"] / ms["fp32"],
        "fp32_after_vision_ms": ms["fp32_after_vision"], "int8_after_vision_ms": ms["int8_after_vision"],
        "int8_after_vision_ratio": ms["int8_after_vision"] / ms["fp32_after_vision"],
        "after_vision_rounds": len(timings["int8_after_vision"].samples),
        "fp32_bytes": sizes["fp32"], "int8_bytes": sizes["int8"], "int8_size_ratio": sizes["int8"] / sizes["fp32"],
        "answers_agree": agree,
    }


def print_int8(report: dict[str, Any]) -> None:
    print(f"INT8 against float32: {report['model']}, {report['quantized_layers']} Linear layers quantised")
    print(f"  predict, batch {report['batch']}, CPU, {report['threads']} threads: float32 {report['fp32_ms']:.1f} ms, "
          f"INT8 {report['int8_ms']:.1f} ms -> {report['int8_latency_ratio']:.3f}x "
          f"({len(report['int8_samples_ms'])} interleaved rounds)")
    print(f"  the same after the image encoder (text encoder, fusion, head): float32 "
          f"{report['fp32_after_vision_ms']:.1f} ms, INT8 {report['int8_after_vision_ms']:.1f} ms -> "
          f"{report['int8_after_vision_ratio']:.3f}x ({report['after_vision_rounds']} interleaved rounds)")
    print(f"  saved weights (model.safetensors): float32 {report['fp32_bytes']:,} bytes, INT8 {report['int8_bytes']:,} bytes "
          f"-> {report['int8_size_ratio']:.3f}x")
    print(f"  answers agreeing on the batch: {report['answers_agree']} of {report['batch']}")


# -- main --------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke test, seconds)")
    parser.add_argument("--vs-vilt", action="store_true", help="also time transformers' ViLT side by side")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile our models (ViLT stays eager unless --compile-vilt)")
    parser.add_argument("--compile-vilt", action="store_true",
                        help="with --vs-vilt --compile: torch.compile ViLT too, compiled against compiled")
    parser.add_argument("--fusions", default="all", help="comma-separated fusion names (default: all registered)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores this process may use; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per measurement (default: the config's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory worker process")
    parser.add_argument("--out", default="perf.json", help="where to write the JSON results")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--int8", nargs="?", const="", default=None, metavar="MODEL",
                        help="only time CPU batch predict and compare the saved size of MODEL (a saved float VQA or "
                        "classification model; none: a tiny random one) against its INT8 copy (fusionzoo quantize)")
    parser.add_argument("--batch", type=int, default=0, help="with --int8: images per predict call (default: the config's)")
    args = parser.parse_args(argv)
    if args.compile_vilt and not (args.vs_vilt and args.compile):
        parser.error("--compile-vilt compiles ViLT beside our compiled model: give it with --vs-vilt --compile")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Tiny --quick tensors run fastest on one thread (and dodge waits for a busy second core).
    threads = args.threads or (1 if args.quick else cores)
    torch.set_num_threads(threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    if args.memory_worker is not None:  # internal: the fresh process of run_memory_worker
        payload = json.loads(args.memory_worker)
        cfg = PerfConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["cfg"].items()})
        print(json.dumps(memory_worker(cfg, payload["fusions"], payload["vilt"], device)))
        return {}

    cfg = QUICK if args.quick else FULL
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.int8 is not None:  # INT8 against float32 only, on the CPU
        machine = describe_machine(torch.device("cpu"))
        print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores, {threads} torch threads, "
              f"{machine['cpu_capability']}); torch {machine['torch']}; load average {machine['loadavg_start']}")
        report = {"machine": machine, **measure_int8(args.int8 or None, cfg, args.batch or cfg.batch, threads)}
        print_int8(report)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("int8_latency_ratio", "int8_size_ratio", "int8_after_vision_ratio",
                                                 "fp32_ms", "int8_ms", "fp32_after_vision_ms", "int8_after_vision_ms",
                                                 "fp32_bytes", "int8_bytes", "answers_agree", "batch", "threads")}))
        return report
    fusions = fusionzoo.list_fusions() if args.fusions == "all" else [f.strip() for f in args.fusions.split(",")]
    for name in fusions:
        fusionzoo.FUSIONS.get(name)  # unknown names fail here, listing what exists

    machine = {**describe_machine(device), "cpu_native_bf16": cpu_has_optimized_bf16_kernels()}
    print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores, {threads} torch threads, "
          f"{machine['cpu_capability']}, native bf16: {machine['cpu_native_bf16']}, "
          f"OMP_WAIT_POLICY={machine['omp_wait_policy']})"
          + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + f"; torch {machine['torch']}")
    print(f"load average at start (1/5/15 min): {machine['loadavg_start']}  (other processes share these cores)")
    print(f"configuration: {json.dumps(asdict(cfg))}")
    if args.compile:
        print("torch.compile: on for our models (compilation happens in the warmup, untimed); "
              + ("ViLT compiled too" if args.compile_vilt else "ViLT stays eager"))

    progress("measuring the matmul peaks")
    peaks = measure_peaks(device, cfg)
    print(f"matmul peak at the start: fp32 {peaks['fp32_gflops']:.1f} GFLOP/s, bf16 kernels {peaks['bf16']['gflops']:.1f} GFLOP/s"
          + (f", bf16 through the fp32 units {peaks['bf16_via_fp32']['gflops']:.1f} GFLOP/s"
             if "bf16_via_fp32" in peaks else "")
          + f" -> bf16 reference {peaks['bf16_gflops']:.1f} GFLOP/s")

    if not args.no_memory:
        progress("measuring training memory in a worker process")
    memory = {} if args.no_memory else run_memory_worker(cfg, fusions, args.vs_vilt, device)
    memory_method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "RSS (fusionzoo.hardware.RssSampler) sampled every 1 ms in a fresh worker process "
                     "(MALLOC_MMAP_THRESHOLD_=65536)")
    if isinstance(memory, dict) and "error" in memory:
        print(f"memory: {memory['error']}")

    results = []
    for name in fusions:
        progress(f"measuring {name}")
        recheck_peaks(peaks, device, cfg)
        results.append(measure_fusion(name, device, cfg, args.compile))
    vilt: dict[str, Any] | None = None
    if args.vs_vilt:
        progress("comparing with ViLT")
        recheck_peaks(peaks, device, cfg)
        vilt = compare_with_vilt(device, cfg, args.compile, args.compile_vilt)
    add_mfu(results, vilt, peaks)

    print()
    print(f"matmul peak, best seen in the run: fp32 {peaks['fp32_gflops']:.1f} GFLOP/s, "
          f"bf16 reference {peaks['bf16_gflops']:.1f} GFLOP/s")
    print(f"training step = forward + backward + AdamW (fused), batch {cfg.batch}; MFU vs that peak; "
          f"mem = MiB above the step's start ({memory_method}); caption: {cfg.gen_images} images, "
          f"{cfg.gen_tokens} tokens, beam {cfg.beams}, fp32")
    print_table(results, memory)
    if vilt is not None:
        print()
        print_vilt(vilt)

    load_end = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at end: {load_end}")
    merged = next((r for r in results if r.fusion == "merged_transformer"), None)
    summary: dict[str, Any] = {
        "device": machine["device"],
        "quick": args.quick,
        "compile": args.compile,
        "compile_vilt": args.compile_vilt,
        "loadavg_start": machine["loadavg_start"],
        "loadavg_end": load_end,
        "peak_gflops_fp32": peaks["fp32_gflops"],
        "peak_gflops_bf16": peaks["bf16_gflops"],
    }
    if merged is not None:
        summary["kv_cache_speedup"] = merged.kv_cache_speedup
        summary["mfu_bf16"] = merged.mfu["bf16"]
        summary["mfu_fp32"] = merged.mfu["fp32"]
    if vilt is not None:
        summary.update({
            "vilt_ratio_fp32": vilt["vilt_ratio_fp32"],
            "vilt_ratio_bf16": vilt["vilt_ratio_bf16"],
            "mfu_bf16": vilt["mfu_ours_bf16"],
            "mfu_fp32": vilt["mfu_ours_fp32"],
            "ours_ms_fp32": vilt["ours_ms_fp32"],
            "vilt_ms_fp32": vilt["vilt_ms_fp32"],
            "ours_ms_bf16": vilt["ours_ms_bf16"],
            "vilt_ms_bf16": vilt["vilt_ms_bf16"],
            "params_ours": vilt["params_ours"],
            "params_vilt": vilt["params_vilt"],
        })
    full = {
        "machine": machine,
        "config": asdict(cfg),
        "peaks": peaks,
        "memory_method": memory_method,
        "memory": memory,
        "fusions": [asdict(r) for r in results],
        "vilt": vilt,
        "summary": summary,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(full, indent=2) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps(summary))
    return full


if __name__ == "__main__":
    main()
