"""The benchmark run: load a suite, cache encoder features, train and score every fusion, write the report.

:func:`run_bench` does, in order:

1. load the suite's tasks (``--quick``: a small image subset, see
   :mod:`fusionzoo.bench.suites`);
2. build the frozen encoders once (``efficientnet-lite0``, ``minilm-l6``; a causal
   MiniLM for captioning) and get their features from the
   :class:`~fusionzoo.features.cache.FeatureCache`: one entry for every distinct
   image of the run, one for every distinct question / text, one for every
   distinct training caption (causal states). A warm cache skips extraction;
3. for each task, fusion and seed: build the fusion and head under the seed,
   train them on the train split (:func:`~fusionzoo.bench.loop.train_model`),
   score the test split, and average over the seeds (a retrieval task's rows --
   the dual-encoder ``itc`` reference and each fusion reranking -- are
   :mod:`fusionzoo.bench.retrieval`'s);
4. write ``results.json``, ``results.md``, ``run.json``, the plots, the retrieval
   score files and the VQA results files (:mod:`fusionzoo.bench.report`) to ``--out``, replacing the report
   there, and print the results tables.

``--train-encoders N`` (:mod:`fusionzoo.bench.tails`) caches the inputs of the encoders' last N
blocks instead of their outputs in step 2, and in step 3 trains a copy of those blocks with
each fusion and head.

Training settings (:data:`TASK_SETTINGS`, :data:`FUSION_SETTINGS`, :data:`COMMON_FUSION_KWARGS`,
:data:`TASK_FUSION_KWARGS`) were tuned so
the default easy-VQA run fits its time budget on a 2-core CPU; the README's
benchmark section reports what they give.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..encoders import TextEncoder, VisionEncoder, build_text_encoder, build_vision_encoder
from ..model import FusionModel
from ..model_config import model_config
from ..registry import FUSIONS, HEADS, RegistryError
from ..tasks import get_task
from ..training.optim import ENCODER_PREFIXES
from .baselines import REFERENCES
from ..features.cache import FeatureCache
from ..features.layout import default_cache_dir
from .features import add_position_channels, image_features, image_preprocessing, pool_image_tokens, text_features
from .loop import (
    FeatureView,
    PeakMemory,
    as_tensor,
    generate_captions,
    predict_logits,
    resolve_precision,
    seeded,
    train_model,
)
from ..tasks.scoring import (
    question_prior,
)
from .standardize import StandardizedFusion, channel_stats
from .tails import (EncoderTailsModel, check_tail_blocks, check_tail_tasks, untrained_image_tokens,
                    untrained_text_states, with_encoder_tails)

#: The key under which a retrieval row carries its score matrices (see :mod:`fusionzoo.bench.retrieval`).
SCORES_KEY = "_scores"
#: The key under which a VQA row with official question ids carries its first seed's answers,
#: ``[{"question_id", "answer"}]`` (VQA v2's results format; :func:`~fusionzoo.bench.report.write_report`).
ANSWERS_KEY = "_answers"
from .suites import SUITES, BenchError, BenchTask, SplitData, load_tasks
from .tune import apply_trial, grid_for, grid_trials, tune_record

logger = logging.getLogger(__name__)

VISION_ENCODER = "efficientnet-lite0"
TEXT_ENCODER = "minilm-l6"


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """How one task's models are trained.

    Attributes:
        epochs: passes over the train split.
        batch_size: samples per optimiser step.
        lr: AdamW peak learning rate (warmup, then cosine to 0).
        weight_decay: AdamW weight decay of matrices.
        warmup: fraction of steps of linear warmup.
        max_text_len: tokens kept per question / caption.
        eval_batch_size: samples per inference call.
        num_beams: beams for caption generation (1 = greedy).
        max_new_tokens: longest generated caption.
    """

    epochs: float
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup: float = 0.05
    max_text_len: int = 32
    eval_batch_size: int = 1024
    num_beams: int = 1
    max_new_tokens: int = 20


@dataclass(frozen=True)
class RetrievalSettings(TrainSettings):
    """:class:`TrainSettings` of a retrieval task, plus its objectives, alignment and reranking.

    Attributes:
        itc_weight, itm_weight: ``loss = itc_weight * ITC + itm_weight * ITM``
            (:class:`~fusionzoo.training.pretrain_model.PretrainModel`); ``itm_weight=0`` trains
            the alignment alone (the dual-encoder row).
        embed_dim: width of the :class:`~fusionzoo.alignment.Alignment` embeddings (a
            fusion that aligns itself, ``albef``, takes its own ``embed_dim`` from its kwargs).
        text_summary: how the Alignment summarises a caption's states (``mean`` / ``first``).
        temperature: initial ITC temperature.
        standardize: feed the Alignment per-channel standardised features, as the fusions
            are (:mod:`~fusionzoo.bench.standardize`).
        rerank_k: ITC candidates per query that the fusion's ITM head reranks
            (each fusion row is also scored with ``rerank_k="all"``).
        rerank_itc_weight: a shortlisted pair scores its ITM log-odds plus this times its
            ITC logit (:func:`~fusionzoo.tasks.retrieval.score_matrices`; 0 = ITM alone).
    """

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    embed_dim: int = 256
    text_summary: str = "mean"
    temperature: float = 0.07
    standardize: bool = True
    rerank_k: int = 16
    rerank_itc_weight: float = 0.0


TASK_SETTINGS: dict[str, TrainSettings] = {
    "easy-vqa": TrainSettings(epochs=2, batch_size=64, lr=1e-3),
    # Chosen on the validation split (300 scenes, 3,600 questions; see FUSION_SETTINGS below).
    "sort-of-clevr": TrainSettings(epochs=8, batch_size=64, lr=1e-3),
    "coco-yesno": TrainSettings(epochs=6, batch_size=128, lr=3e-4, weight_decay=0.05),
    "coco-captioning": TrainSettings(epochs=8, batch_size=64, lr=5e-4, eval_batch_size=128, max_new_tokens=20),
    "coco-match": TrainSettings(epochs=6, batch_size=128, lr=3e-4, weight_decay=0.05),
    # Chosen on the Karpathy validation split (95 images x 475 captions; r_mean): fusions 3
    # epochs at 5e-4, batch 64, unstandardised features into a 512-wide Alignment over
    # mean-pooled captions (early_concat 60.9-62.5, 3 epochs against 48.6-57.4 at larger
    # batches or rates). Reranking by ITM alone stayed below ITC on validation (early_concat
    # 58.5 against 73.8 after 5 epochs), adding the ITC logit (BLIP's sum) lifted it to 74.8, so
    # rerank_itc_weight=1.
    "coco-retrieval": RetrievalSettings(epochs=3, batch_size=64, lr=5e-4, weight_decay=0.05, embed_dim=512,
                                        standardize=False, rerank_itc_weight=1.0),
}
# Flickr30k's tasks train as COCO's (photographs with five captions each, the same encoders);
# VQA v2 as the COCO yes/no questions, at batch 256 (443,757 training questions against 9,515).
TASK_SETTINGS["flickr30k-captioning"] = TASK_SETTINGS["coco-captioning"]
TASK_SETTINGS["flickr30k-match"] = TASK_SETTINGS["coco-match"]
TASK_SETTINGS["flickr30k-retrieval"] = TASK_SETTINGS["coco-retrieval"]
TASK_SETTINGS["vqav2"] = replace(TASK_SETTINGS["coco-yesno"], batch_size=256)

#: Per task, per fusion: changes to the task's :class:`TrainSettings`. easy-VQA's are what
#: ``fusionzoo bench --suite easy-vqa --tune`` chose on its validation split (3,801 questions of
#: 400 held-out train images; 8 trials a row: epochs {2, 6} x batch {256, 64} x lr {1e-3, 2e-3};
#: the first trial within 0.5% of the best). The fusions that join the modalities by a sum
#: (attention_weighted's convex mix, ALBEF's cross-attended [CLS]) learn the yes/no questions --
#: a match between the asked and the seen colour or shape -- only in 6 epochs at batch 64
#: (validation 99.6 / 99.3; 97.3 / 96.9 at batch 256); the one-modality rows and the late vote
#: reach their ceiling in 2 epochs.
FUSION_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "easy-vqa": {
        "early_concat": {"epochs": 2, "batch_size": 64, "lr": 2e-3},
        "attention_weighted": {"epochs": 6, "batch_size": 64, "lr": 1e-3},
        "co_attention": {"epochs": 6, "batch_size": 256, "lr": 1e-3},
        "merged_transformer": {"epochs": 6, "batch_size": 256, "lr": 1e-3},
        "albef": {"epochs": 6, "batch_size": 64, "lr": 1e-3},
        "late_voting": {"epochs": 2, "batch_size": 256, "lr": 2e-3},
        "text_only": {"epochs": 2, "batch_size": 256, "lr": 1e-3},
        "image_only": {"epochs": 2, "batch_size": 64, "lr": 2e-3},
    },
    # Sort-of-CLEVR: every fusion 8 epochs at batch 64, 1e-3. Reading an object's position
    # takes token-level fusions a plateau of several epochs (on validation: merged_transformer
    # answered left/right at chance after 2 epochs on an 8x8 grid and 98% after 4 on the 4x4
    # grid; ALBEF was still at chance after 4). The late vote and the one-modality rows cannot
    # combine the modalities and stay at the text prior: 2 epochs at batch 256.
    "sort-of-clevr": {
        "late_voting": {"epochs": 2, "batch_size": 256},
        "text_only": {"epochs": 2, "batch_size": 256},
        "image_only": {"epochs": 2, "batch_size": 256},
    },
    # The coco suite's four tasks: what ``fusionzoo bench --suite coco --tune`` chose on the
    # validation splits (yes/no: 10% of the train images held out by seed; captioning, match and
    # retrieval: Karpathy val, 95 images), 4 trials a row (TUNE_GRIDS), the first within 0.5% of
    # the best (commit c31cfcb, 2-core Xeon with AMX, bf16; the README's COCO tables).
    "coco-yesno": {
        "early_concat": {"epochs": 6, "lr": 1e-3},
        "attention_weighted": {"epochs": 6, "lr": 3e-4},
        "co_attention": {"epochs": 6, "lr": 1e-3},
        "merged_transformer": {"epochs": 6, "lr": 1e-3},
        "albef": {"epochs": 6, "lr": 1e-3},
        "late_voting": {"epochs": 3, "lr": 1e-3},
        "text_only": {"epochs": 3, "lr": 3e-4},
        "image_only": {"epochs": 6, "lr": 1e-3},
    },
    "coco-captioning": {
        "early_concat": {"epochs": 8, "lr": 5e-4},
        "attention_weighted": {"epochs": 8, "lr": 1e-3},
        "co_attention": {"epochs": 8, "lr": 5e-4},
        "merged_transformer": {"epochs": 4, "lr": 1e-3},
        "albef": {"epochs": 8, "lr": 1e-3},
        "late_voting": {"epochs": 4, "lr": 5e-4},
        "text_only": {"epochs": 4, "lr": 1e-3},
        "image_only": {"epochs": 8, "lr": 1e-3},
    },
    "coco-match": {
        "early_concat": {"epochs": 6, "lr": 3e-4},
        "attention_weighted": {"epochs": 3, "lr": 1e-3},
        "co_attention": {"epochs": 6, "lr": 1e-3},
        "merged_transformer": {"epochs": 6, "lr": 1e-3},
        "albef": {"epochs": 3, "lr": 1e-3},
        "late_voting": {"epochs": 3, "lr": 3e-4},
        "text_only": {"epochs": 3, "lr": 1e-3},
        "image_only": {"epochs": 3, "lr": 3e-4},
    },
    # the dual encoder keeps ITC alone at batch 256 (validation r_mean 75.8 against 70-74 for
    # 5-40 epochs x 3e-4-3e-3 x batch 64-256 by hand); --tune chose its epochs and rate as for the rest
    "coco-retrieval": {
        "early_concat": {"epochs": 3, "lr": 1e-3},
        "attention_weighted": {"epochs": 5, "lr": 1e-3},
        "co_attention": {"epochs": 3, "lr": 1e-3},
        "merged_transformer": {"epochs": 3, "lr": 1e-3},
        "albef": {"epochs": 5, "lr": 1e-3},
        "late_voting": {"epochs": 3, "lr": 1e-3},
        "itc": {"itm_weight": 0.0, "batch_size": 256, "epochs": 3, "lr": 1e-3},
    },
}
FUSION_SETTINGS["flickr30k-retrieval"] = FUSION_SETTINGS["coco-retrieval"]
FUSION_SETTINGS["flickr30k-captioning"] = FUSION_SETTINGS["coco-captioning"]
FUSION_SETTINGS["flickr30k-match"] = FUSION_SETTINGS["coco-match"]

#: Fusion hyperparameters used for every task (merged over each fusion's defaults).
#: No dropout: the encoders are frozen, the fusions small and trained for a few epochs,
#: and CPU dropout (``bernoulli_``) took 38% of an early_concat step.
COMMON_FUSION_KWARGS: dict[str, Any] = {"dim": 128, "num_layers": 1, "num_heads": 4, "dropout": 0.0}
#: Per task: changes to :data:`COMMON_FUSION_KWARGS` for every fusion (``"*"``), then per fusion.
TASK_FUSION_KWARGS: dict[str, dict[str, dict[str, Any]]] = {
    # Synthetic shapes: 64 wide reaches the accuracy of 128 in less time, except for the convex
    # mix of attention_weighted (92.3% at 64 against 99.6% at 128 after 6 epochs).
    "easy-vqa": {"*": {"dim": 64}, "attention_weighted": {"dim": 128}},
    # Sort-of-CLEVR: early concatenation is the pooled-summary baseline (no Transformer layer
    # over the tokens: image tokens averaged, as the CNN + MLP of Santoro et al. 2017); the merged
    # Transformer gets two layers -- with one, the [CLS] state must find the asked object and
    # the one nearest to it in the same attention step (validation, 4 epochs: relational 81.8%
    # with one layer; 86.5% with two after 8 epochs).
    "sort-of-clevr": {"early_concat": {"num_layers": 0}, "merged_transformer": {"num_layers": 2}},
}
#: Per-fusion changes for every task (applied last).
FUSION_KWARGS: dict[str, dict[str, Any]] = {}

#: ``--quick``: at most this many epochs (the data is a few hundred samples).
QUICK_EPOCHS = 2


@dataclass
class BenchConfig:
    """Everything ``fusionzoo bench`` takes (see ``fusionzoo bench --help``).

    Attributes:
        suite: ``sort-of-clevr`` (the default), ``easy-vqa``, ``coco``, ``vqav2`` or ``flickr30k``.
        data_dir: the data folder of the ``coco``, ``vqav2`` and ``flickr30k`` suites (layouts:
            :mod:`fusionzoo.bench.suites`); for ``sort-of-clevr``, where its generated sets are cached.
        fusions: fusion names (registered fusions and ``text_only`` / ``image_only``);
            None = every registered fusion plus both references.
        tasks: task names of the suite; None = all.
        epochs: overrides every task's epochs.
        seeds: one model per seed; scores averaged, spread reported.
        out: report folder.
        mixed_precision: ``auto``, ``no``, ``bf16`` or ``fp16``.
        quick: a few hundred samples per task (tests, smoke runs).
        cache_dir: feature cache folder; None = ``$FUSIONZOO_CACHE`` or
            ``~/.cache/fusionzoo/features``.
        no_cache: extract features in memory, never read or write the cache.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        jobs: rows trained at once in worker processes (None = 2 on a multi-core CPU,
            1 on CUDA); see :func:`resolve_jobs`.
        image_size: overrides the suite's encoder input size.
        image_grid: overrides the suite's pooled token grid (0 = keep every token).
        vision: the frozen image encoder: a preset (``efficientnet-lite0/1/2``), a timm model
            name or a spec dict (:func:`~fusionzoo.encoders.build_vision_encoder`).
        text: the frozen text encoder: a preset (``minilm-l6``), a transformers hub id or a local
            folder (:func:`~fusionzoo.encoders.build_text_encoder`).
        eval_split: ``test`` (the report's numbers) or ``val`` (choosing settings): every task's
            validation split, its own or one held out of train by image
            (:func:`~fusionzoo.bench.suites.carve_validation`).
        max_train, max_test: at most this many images of each task's train split and of its
            scored split (``eval_split``), a seeded choice keeping every sample of each kept
            image (quick studies on the full datasets); None = all.
        vision_weights: ``pretrained`` (the preset's or timm's weights) or ``random`` (the
            same architecture, initialised under seed 0: a control, or a timm model offline).
        tune: choose each row's settings on the validation split first
            (:mod:`fusionzoo.bench.tune`), then train with them and score ``eval_split`` once.
        tune_grid: the grid ``tune`` tries for every row (setting -> values); None = each
            task's :func:`~fusionzoo.bench.tune.grid_for`.
        train_encoders: 0 = frozen encoders; N > 0 = fine-tune the last N blocks of both encoders
            with every row (each row its own copy; the cache keeps the inputs of those blocks;
            VQA and classification tasks only; meant for a GPU): :mod:`fusionzoo.bench.tails`.
        progress: show progress bars.
    """

    suite: str = "sort-of-clevr"
    data_dir: Path | None = None
    fusions: list[str] | None = None
    tasks: list[str] | None = None
    epochs: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    out: Path = Path("bench-results")
    mixed_precision: str = "auto"
    quick: bool = False
    cache_dir: Path | None = None
    no_cache: bool = False
    device: str = "auto"
    jobs: int | None = None
    image_size: int | None = None
    image_grid: int | None = None
    vision: str = VISION_ENCODER
    text: str = TEXT_ENCODER
    eval_split: str = "test"
    max_train: int | None = None
    max_test: int | None = None
    vision_weights: str = "pretrained"
    tune: bool = False
    tune_grid: dict[str, list[Any]] | None = None
    train_encoders: int = 0
    progress: bool = True


def reference_fusions() -> list[str]:
    return list(REFERENCES)


def resolve_fusions(names: Sequence[str] | None) -> list[str]:
    """The fusions of the run: registered ones first, references last; unknown names fail clearly."""
    if not names:
        return FUSIONS.list() + reference_fusions()
    unknown = [n for n in names if n not in FUSIONS and n not in REFERENCES]
    if unknown:
        raise BenchError(f"unknown fusion(s) {', '.join(map(repr, unknown))}; expected registered fusions "
                         f"({', '.join(FUSIONS.list())}) or references ({', '.join(REFERENCES)})")
    ordered = list(dict.fromkeys(names))
    return [n for n in ordered if n not in REFERENCES] + [n for n in ordered if n in REFERENCES]


def resolve_tasks(suite: str, names: Sequence[str] | None) -> list[str]:
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    available = SUITES[suite].tasks
    if not names:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BenchError(f"suite {suite!r} has no task(s) {', '.join(map(repr, unknown))}; "
                         f"its tasks: {', '.join(available)}")
    return [n for n in available if n in names]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def fusion_kwargs_for(fusion: str, task: str | None = None) -> dict[str, Any]:
    """The fusion's constructor arguments in the benchmark: common, then the task's, then the fusion's."""
    per_task = TASK_FUSION_KWARGS.get(task or "", {})
    return {**COMMON_FUSION_KWARGS, **per_task.get("*", {}), **per_task.get(fusion, {}),
            **FUSION_KWARGS.get(fusion, {})}


def settings_for(task: str, fusion: str, epochs: float | None = None, quick: bool = False) -> TrainSettings:
    """The training settings of one row: the task's, the fusion's changes, then ``--epochs`` / ``--quick``."""
    settings = replace(TASK_SETTINGS[task], **FUSION_SETTINGS.get(task, {}).get(fusion, {}))
    if epochs is not None:
        return replace(settings, epochs=epochs)
    if quick:
        return replace(settings, epochs=min(settings.epochs, QUICK_EPOCHS))
    return settings


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def build_bench_model(task: BenchTask, fusion: str, vision: VisionEncoder, text: TextEncoder,
                      fusion_kwargs: dict[str, Any], max_text_len: int,
                      stats: dict[str, torch.Tensor] | None = None,
                      head_kwargs: dict[str, Any] | None = None, image_dim: int | None = None) -> FusionModel:
    """A :class:`FusionModel` around the shared frozen encoders (as ``create_model`` builds one).

    The encoders are built once per run and shared by every model (they are
    frozen); the fusion is a registered one or a one-modality reference, wrapped
    in a :class:`~fusionzoo.bench.standardize.StandardizedFusion` when ``stats``
    (``text_mean``, ``text_std``, ``image_mean``, ``image_std``) are given.
    ``image_dim`` is the width of the image tokens the fusion will be fed (default the
    encoder's last map; an intermediate stage with position channels is another width).
    """
    fusion_cls = REFERENCES.get(fusion) or FUSIONS.get(fusion)
    fusion_module = fusion_cls(text.out_dim, image_dim or vision.out_dim, **fusion_kwargs)
    if stats is not None:
        fusion_module = StandardizedFusion(fusion_module, **stats)
    task_object = get_task(task.task)
    head_name = task_object.head
    head = HEADS.get(head_name).from_parts(fusion_module, text, task.vocabulary, **(head_kwargs or {}))
    config = model_config(task.task, fusion, fusion_module, vision, text, max_text_len=max_text_len,
                          freeze_encoders=True, head_kwargs=head_kwargs, vocabulary=task.vocabulary)
    return FusionModel(vision, text, fusion_module, head, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------
@dataclass
class Features:
    """The run's cached arrays as tensors, with lookups from image path / text to row.

    Attributes:
        image_tokens: (U, G, Di) the image tokens the fusions are fed, one row per image (with
            ``--train-encoders``: the untrained tails' tokens, the statistics' source).
        image_row: image path -> row.
        texts: causal? -> (arrays, text -> row); arrays ``input_ids``, ``mask``, ``states``
            (with ``--train-encoders``: the untrained tail's states) and, with
            ``--train-encoders``, ``tail_inputs`` (U, T, Dt).
        train_encoders: ``--train-encoders`` (0 = frozen encoders).
        image_tail_inputs: with ``--train-encoders``: (U, ...) the image encoder's tail inputs.
        image_grid, image_positions: how image tokens are finished after the encoder
            (:func:`pool_image_tokens`, :func:`add_position_channels`); the tails' rows do it in the model.
    """

    image_tokens: torch.Tensor
    image_row: dict[str, int]
    texts: dict[bool, tuple[dict[str, torch.Tensor], dict[str, int]]]  # causal? -> (arrays, text -> row)
    train_encoders: int = 0
    image_tail_inputs: torch.Tensor | None = None
    image_grid: int | None = None
    image_positions: int = 0

    @property
    def image_dim(self) -> int:
        """Width of the image tokens the fusions are fed."""
        return int(self.image_tokens.shape[-1])

    def stats(self, split: SplitData, causal: bool) -> dict[str, torch.Tensor]:
        """Per-channel mean and std of the image tokens and text states of ``split`` (its distinct rows)."""
        images = torch.as_tensor(sorted({self.image_row[p] for p in split.image_paths}), dtype=torch.long)
        image_mean, image_std = channel_stats(self.image_tokens, images)
        arrays, row = self.texts[causal]
        texts = torch.as_tensor(sorted({row[t] for t in split.texts}), dtype=torch.long)
        text_mean, text_std = channel_stats(arrays["states"], texts, arrays["mask"])
        return {"text_mean": text_mean, "text_std": text_std, "image_mean": image_mean, "image_std": image_std}

    def token_ids(self, split: SplitData, causal: bool) -> list[int]:
        """The distinct token ids of the texts of ``split`` (padding excluded).

        A captioning head's output vocabulary: every token it is trained to predict.
        """
        arrays, row = self.texts[causal]
        rows = torch.as_tensor(sorted({row[t] for t in split.texts}), dtype=torch.long)
        ids = torch.as_tensor(arrays["input_ids"][rows]).long()  # (R, T)
        return torch.unique(ids[torch.as_tensor(arrays["mask"][rows]).bool()]).tolist()

    def view(self, split: SplitData, causal: bool) -> FeatureView:
        """The samples of ``split`` as rows of the arrays: final states, or with ``--train-encoders`` tail inputs."""
        image_rows = torch.as_tensor([self.image_row[p] for p in split.image_paths], dtype=torch.long)
        if self.train_encoders:
            view = FeatureView(image_tokens=self.image_tail_inputs, image_rows=image_rows, labels=split.labels,
                               image_input="image_tail_inputs", text_input="text_tail_inputs")
        else:
            view = FeatureView(image_tokens=self.image_tokens, image_rows=image_rows, labels=split.labels)
        if split.texts is not None:
            arrays, row = self.texts[causal]
            view.text_rows = torch.as_tensor([row[t] for t in split.texts], dtype=torch.long)
            view.text_states = arrays["tail_inputs" if self.train_encoders else "states"]
            view.text_ids, view.text_mask = arrays["input_ids"], arrays["mask"]
        return view


def extract_features(tasks: Sequence[BenchTask], vision: VisionEncoder, text: TextEncoder,
                     causal_text: TextEncoder | None, cache: FeatureCache, image_size: int,
                     device: torch.device, progress: bool, image_grid: int | None = None,
                     image_stage: int | None = None, image_positions: int = 0, train_encoders: int = 0
                     ) -> tuple[Features, dict[str, Any]]:
    """Get (from the cache, or by extracting) every feature the run's tasks need.

    ``image_grid`` pools the image tokens (:func:`pool_image_tokens`) after the cache:
    the cache always holds the encoder's full token grid. ``image_stage`` takes an
    intermediate feature map instead of the last (:meth:`VisionEncoder.stage_tokens`),
    ``image_positions`` appends that many frequencies of 2-D position channels per axis
    after pooling (:func:`add_position_channels`). ``train_encoders`` > 0 caches the inputs
    of both encoders' last ``train_encoders`` blocks instead, and runs the untrained tails
    over them once for the image tokens and text states (:mod:`fusionzoo.bench.tails`).
    """
    paths = sorted({p for task in tasks for split in (task.train, task.test) for p in split.image_paths})
    data_config = image_preprocessing(vision, image_size)
    images = image_features(cache, vision, paths, data_config, device=device, progress=progress, stage=image_stage,
                            tail=train_encoders or None)
    image_tail_inputs = None
    if train_encoders:
        image_tail_inputs = as_tensor(images["tail_inputs"])  # (U, ...)
        pooled, encoder_tokens = untrained_image_tokens(vision.tail(train_encoders), image_tail_inputs, image_grid,
                                                        device=device, progress=progress)
    else:
        pooled, encoder_tokens = pool_image_tokens(images["tokens"], image_grid), list(images["tokens"].shape[1:])
    image_tokens = add_position_channels(pooled, image_positions)
    info: dict[str, Any] = {"images": len(paths), "image_size": image_size,
                            "encoder_tokens": encoder_tokens, "image_stage": image_stage,
                            "position_channels": 4 * max(0, image_positions),
                            "image_tokens": list(image_tokens.shape[1:])}
    if train_encoders:
        info["tail_inputs"] = {"blocks": train_encoders, "image": list(image_tail_inputs.shape[1:])}
    texts: dict[bool, tuple[dict[str, torch.Tensor], dict[str, int]]] = {}
    for causal, encoder in ((False, text), (True, causal_text)):
        wanted = sorted({t for task in tasks if task.causal_text == causal
                         for split in (task.train, task.test) if split.texts is not None for t in split.texts})
        if not wanted:
            continue
        max_len = max(TASK_SETTINGS[task.name].max_text_len for task in tasks if task.causal_text == causal)
        entry = text_features(cache, encoder, wanted, max_length=max_len, device=device, progress=progress,
                              tail=train_encoders or None)
        if train_encoders:
            arrays = {name: as_tensor(entry[name]) for name in ("input_ids", "mask", "tail_inputs")}
            arrays["states"] = untrained_text_states(encoder.tail(train_encoders), arrays["tail_inputs"],
                                                     arrays["mask"], device=device, progress=progress)
        else:
            arrays = {name: as_tensor(entry[name]) for name in ("input_ids", "mask", "states")}
        texts[causal] = (arrays, {t: i for i, t in enumerate(wanted)})
        info["captions" if causal else "texts"] = len(wanted)
    features = Features(image_tokens=image_tokens, image_row={p: i for i, p in enumerate(paths)},
                        texts=texts, train_encoders=train_encoders, image_tail_inputs=image_tail_inputs,
                        image_grid=image_grid, image_positions=image_positions)
    return features, info


# --------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------
def _mean_metrics(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every number (nested dicts too); ``<name>_std`` for top-level numbers of several seeds."""
    out: dict[str, Any] = {}
    for name, first in per_seed[0].items():
        if isinstance(first, dict):
            out[name] = _mean_metrics([m[name] for m in per_seed])
        else:
            values = [float(m[name]) for m in per_seed]
            out[name] = float(np.mean(values))
            if len(values) > 1:
                out[f"{name}_std"] = float(np.std(values, ddof=1))
    return out


def run_row(task: BenchTask, fusion: str, settings: TrainSettings, features: Features, encoders: dict[str, Any],
            seeds: Sequence[int], precision: str, device: torch.device, progress: bool,
            captions_out: dict[str, Any]) -> dict[str, Any]:
    """Train and score one fusion on one task for every seed; the aggregated results row.

    A retrieval task's rows are :func:`~fusionzoo.bench.retrieval.run_retrieval_row`'s. With
    ``features.train_encoders``, every seed's model trains its own copies of the encoder tails
    (``encoders["vision_tail"]``, ``encoders["text_tail"]``; :func:`~fusionzoo.bench.tails.with_encoder_tails`).
    """
    if task.task == "retrieval":
        from .retrieval import run_retrieval_row

        return run_retrieval_row(task, fusion, settings, features, encoders, seeds, precision, device, progress)
    train_view = features.view(task.train, task.causal_text)
    test_view = features.view(task.test, task.causal_text)
    text = encoders["causal_text"] if task.causal_text else encoders["text"]
    kwargs = fusion_kwargs_for(fusion, task.name)
    feature_stats = features.stats(task.train, task.causal_text)
    # Captioning: predict only the tokens of the training captions (their [SEP] end token included).
    task_object = get_task(task.task)
    head_kwargs = {"output_ids": features.token_ids(task.train, True)} if task_object.generates_text else None
    per_seed, seconds, throughput, memory, losses = [], [], [], [], []
    params = (0, 0)
    answers = None  # VQA with official question ids: the first seed's answers, for the results file
    trained = features.train_encoders  # --train-encoders N: last blocks each model trains
    if trained and (task_object.generates_text or task.task == "retrieval"):  # run_bench refuses these first
        raise BenchError(f"--train-encoders does not train {task.task} rows ({task.name})")
    for seed in seeds:
        with seeded(seed, device):
            model = build_bench_model(task, fusion, encoders["vision"], text, kwargs, settings.max_text_len,
                                      feature_stats, head_kwargs, image_dim=features.image_dim)
            if trained:  # the tails are copied under the seed, as the fusion and head are built
                model = with_encoder_tails(model, encoders["vision_tail"], encoders["text_tail"],
                                           features.image_grid, features.image_positions)
            model = model.to(device)
        params = count_parameters(model)
        if trained:  # the frozen blocks the tails stand in for never run: the same total as a frozen row
            params = (params[0], params[1] - model.replaced_parameters)
        with PeakMemory(device) as peak:
            train_stats = train_model(model, train_view, epochs=settings.epochs, batch_size=settings.batch_size,
                                      lr=settings.lr, weight_decay=settings.weight_decay, warmup=settings.warmup,
                                      precision=precision, device=device, seed=seed,
                                      desc=f"{task.name} {fusion} seed {seed}", progress=progress,
                                      encoder_prefixes=EncoderTailsModel.ENCODER_PREFIXES if trained
                                      else ENCODER_PREFIXES)
            if task_object.generates_text:
                outputs, eval_seconds = generate_captions(
                    model, test_view, batch_size=settings.eval_batch_size, precision=precision, device=device,
                    max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams)
            else:
                outputs, eval_seconds = predict_logits(model, test_view, batch_size=settings.eval_batch_size,
                                                       precision=precision, device=device)
        metrics = task_object.bench_metrics(task, task.test, outputs)
        if answers is None and task.test.question_ids is not None:  # logits (S, A) over task.vocabulary
            answers = [{"question_id": int(q), "answer": task.vocabulary[a]}
                       for q, a in zip(task.test.question_ids, outputs.argmax(dim=-1).tolist())]
        if task_object.generates_text:
            captions_out.setdefault(task.name, {}).setdefault(fusion, {})[str(seed)] = dict(
                zip(map(str, task.test.image_ids), outputs))
        per_seed.append(metrics)
        seconds.append(train_stats.seconds)
        throughput.append(len(test_view) / max(eval_seconds, 1e-9))
        memory.append(peak.peak_mb)
        losses.append(train_stats.final_loss)
        del model
    metrics = _mean_metrics(per_seed)
    metrics["final_train_loss"] = float(np.mean(losses))
    if len(seeds) > 1:
        metrics["per_seed"] = [{"seed": s, **{k: v for k, v in m.items() if not isinstance(v, dict)}}
                               for s, m in zip(seeds, per_seed)]
    row = result_row(task, fusion, metrics, params, seconds, throughput, memory, seeds, {
        "reference": fusion in REFERENCES,
        "fusion_kwargs": kwargs,
        **{k: v for k, v in asdict(settings).items()},
        "precision": precision,
        "device": str(device),
        "train_samples": len(train_view),
        "test_samples": len(test_view),
        "train_encoders": trained,
    })
    if answers is not None:
        row[ANSWERS_KEY] = answers
    return row


def result_row(task: BenchTask, fusion: str, metrics: dict[str, Any], params: tuple[int, int],
               seconds: Sequence[float], throughput: Sequence[float], memory: Sequence[float],
               seeds: Sequence[int], config: dict[str, Any]) -> dict[str, Any]:
    """One row of ``results.json``: metrics, parameter counts, per-seed means of the costs, the row's config."""
    return {
        "task": task.name,
        "fusion": fusion,
        "metrics": metrics,
        "params_trainable": params[0],
        "params_total": params[1],
        "train_seconds": round(float(np.mean(seconds)), 3),
        "eval_samples_per_second": round(float(np.mean(throughput)), 1),
        "peak_memory_mb": round(float(np.max(memory)), 1),
        "seeds": list(seeds),
        "config": {"reference": config.pop("reference"), "model_task": task.task, "headline_metric": task.metric,
                   **config, "vision": VISION_ENCODER, "text": TEXT_ENCODER,
                   "frozen_encoders": not config.get("train_encoders")},
    }


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, GPU name: what the README's numbers need next to them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count() if device.index is None else 1
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _spec_name(spec: Any) -> str:
    """How the report names an encoder spec: the string as given, or a spec dict's preset / name."""
    if isinstance(spec, dict):
        return str(spec.get("preset") or spec.get("name"))
    return str(spec)


def resolve_jobs(jobs: int | None, device: torch.device, rows: int, gpus: int | None = None) -> int:
    """Rows trained at once: ``--jobs``, else 2 on a CPU with 2+ cores or every GPU on CUDA; never more than rows.

    On CPU the benchmark's fusions are small: a training step is mostly per-operator
    overhead that one thread carries, so two 1-thread processes finish two rows in
    about the time one 2-thread process takes for 1.3 of them (co_attention: 17.9 ms
    a step with 2 threads, 23.2 ms with 1, on the 2-core machine of the README).
    On CUDA each row at a time has a GPU of its own (:func:`row_devices`): ``--device
    cuda`` uses all of them (``gpus``, default ``torch.cuda.device_count()``), ``cuda:N``
    only that one.
    """
    if device.type == "cuda":
        available = 1 if device.index is not None else max(1, gpus if gpus is not None else torch.cuda.device_count())
        if jobs is None:
            jobs = available
        elif jobs > available:
            raise BenchError(f"--jobs {jobs}: on CUDA each row at a time needs a GPU of its own, and --device "
                             f"{device} gives {available}" + ("" if device.index is None else
                                                              " (--device cuda uses every GPU)"))
    elif jobs is None:
        jobs = min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise BenchError(f"--jobs must be >= 1, got {jobs}")
    return max(1, min(jobs, rows))


def row_devices(device: torch.device, jobs: int) -> list[torch.device]:
    """The device of each row slot: ``cuda:0`` .. ``cuda:jobs-1`` for ``--device cuda``, else ``device``."""
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(jobs)]
    return [device] * jobs


def row_cost(task: BenchTask, fusion: str, settings: TrainSettings) -> float:
    """A row's rough cost, to start the longest rows first: fusion passes over training samples.

    A retrieval step runs the fusion on three pairs per sample (the positive and two hard
    negatives) and its scoring on every test pair; the dual-encoder row runs no fusion.
    """
    if task.task == "retrieval":
        from .retrieval import ITC_ROW

        if fusion == ITC_ROW:
            return 0.0
        images = len(set(task.test.image_paths))
        return settings.epochs * len(task.train) * 3 + 2 * images * len(task.test)
    return settings.epochs * len(task.train)


def task_rows(task: BenchTask, fusions: Sequence[str]) -> list[str]:
    """The rows of ``task``: the run's fusions; for retrieval its own (:func:`~fusionzoo.bench.retrieval.row_names`)."""
    if task.task == "retrieval":
        from .retrieval import row_names

        return row_names(fusions)
    return list(fusions)


#: What forked row workers read (set by :func:`run_rows` just before it forks).
_WORKER_STATE: dict[str, Any] = {}


def _row_worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _row_worker(index: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    state = _WORKER_STATE
    t, fusion, settings = state["work"][index]
    captions: dict[str, Any] = {}
    row = run_row(state["tasks"][t], fusion, settings, state["features"], state["encoders"], state["seeds"],
                  state["precision"], state["device"], False, captions)
    return index, row, captions


def run_rows(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask], features: Features,
             encoders: dict[str, Any], config: BenchConfig, precision: str, device: torch.device, jobs: int):
    """Train and score every (task, fusion, settings) of ``work``; yield ``(index, row, captions)`` as rows finish.

    ``jobs == 1``: in this process, in order, with per-step progress bars. More:
    forked worker processes of ``torch.get_num_threads() // jobs`` threads each
    (the features and encoders are inherited, not copied), the longest rows
    (most training samples) started first; a bar counts finished rows.
    """
    if device.type == "cuda" and jobs > 1:
        yield from run_rows_on_devices(work, tasks, features, encoders, config, precision, row_devices(device, jobs))
        return
    if jobs == 1:
        for index, (t, fusion, settings) in enumerate(work):
            captions: dict[str, Any] = {}
            row = run_row(tasks[t], fusion, settings, features, encoders, config.seeds, precision, device,
                          config.progress, captions)
            yield index, row, captions
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    _WORKER_STATE.update(work=work, tasks=tasks, features=features, encoders=encoders, seeds=list(config.seeds),
                         precision=precision, device=device)
    cost = lambda i: -row_cost(tasks[work[i][0]], work[i][1], work[i][2])  # noqa: E731  (longest first)
    threads = max(1, torch.get_num_threads() // jobs)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_row_worker_init, initargs=(threads,)) as pool, \
                tqdm(total=len(work), desc=f"rows ({jobs} at once)", unit="row", disable=not config.progress) as bar:
            futures = [pool.submit(_row_worker, i) for i in sorted(range(len(work)), key=cost)]
            for future in as_completed(futures):
                bar.update(1)
                yield future.result()
    finally:
        _WORKER_STATE.clear()


def run_rows_on_devices(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask], features: Features,
                        encoders: dict[str, Any], config: BenchConfig, precision: str, devices: Sequence[torch.device]):
    """:func:`run_rows` with one row at a time per device of ``devices`` (one per GPU), in threads.

    Threads, not processes: a forked process cannot use CUDA once its parent has, and the
    features are shared, not copied. Each device gets its own copy of the frozen encoders
    (the models hold them as submodules and are moved to their device); the GPUs run the
    kernels while the threads take turns in Python. Longest rows first, as :func:`run_rows`.
    """
    import copy
    import queue
    from concurrent.futures import ThreadPoolExecutor, as_completed

    per_device = []
    for k, device in enumerate(devices):
        copied = encoders if k == 0 else {name: copy.deepcopy(module) for name, module in encoders.items()}
        per_device.append({name: (module.to(device) if module is not None else None)
                           for name, module in copied.items()})
    threads = max(1, torch.get_num_threads() // len(devices))  # CPU "devices" (tests) share the cores
    free: "queue.Queue[int]" = queue.Queue()
    for k in range(len(devices)):
        free.put(k)

    def one(index: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        k = free.get()
        if devices[k].type == "cpu":
            torch.set_num_threads(threads)  # per thread: a new thread starts with the default count
        try:
            t, fusion, settings = work[index]
            captions: dict[str, Any] = {}
            row = run_row(tasks[t], fusion, settings, features, per_device[k], config.seeds, precision, devices[k],
                          False, captions)
            return index, row, captions
        finally:
            free.put(k)

    cost = lambda i: -row_cost(tasks[work[i][0]], work[i][1], work[i][2])  # noqa: E731  (longest first)
    with ThreadPoolExecutor(len(devices)) as pool, \
            tqdm(total=len(work), desc=f"rows ({len(devices)} devices)", unit="row", disable=not config.progress) as bar:
        futures = [pool.submit(one, i) for i in sorted(range(len(work)), key=cost)]
        for future in as_completed(futures):
            bar.update(1)
            yield future.result()


def tune_settings(work: list[tuple[int, str, TrainSettings]], tasks: Sequence[BenchTask],
                  val_tasks: Sequence[BenchTask], grids: dict[str, dict[str, list[Any]]], features: Features,
                  encoders: dict[str, Any], config: BenchConfig, precision: str, device: torch.device,
                  echo: Callable[[str], None]) -> tuple[list[tuple[int, str, TrainSettings]], dict[int, dict[str, Any]]]:
    """``--tune``: every row of ``work`` with its best trial's settings on the validation split.

    ``val_tasks[t]`` is ``tasks[t]`` loaded with its validation split as the scored one (the
    same train split); ``features`` cover both. Every trial of every row is one row of
    :func:`run_rows` (first seed only), scored on validation. Returns the new work list and,
    per index, the row's tuning record (:func:`fusionzoo.bench.tune.tune_record`).
    """
    started = time.perf_counter()
    cap = QUICK_EPOCHS if config.quick and config.epochs is None else None
    trials: list[tuple[int, dict[str, Any]]] = []  # (index in work, trial)
    trial_work: list[tuple[int, str, TrainSettings]] = []
    if cap is not None:  # --quick: the grid's epochs capped as every row's are (and trials that became equal, once)
        grids = {name: {key: list(dict.fromkeys(min(v, cap) if key == "epochs" else v for v in values))
                        for key, values in grid.items()} for name, grid in grids.items()}
    for index, (t, fusion, settings) in enumerate(work):
        for trial in grid_trials(grids[tasks[t].name]):
            trials.append((index, trial))
            trial_work.append((len(tasks) + t, fusion, apply_trial(settings, trial, cap)))
    echo(f"--tune: {len(trial_work)} trials ({len(work)} rows x their task's grid) on the validation split, "
         f"seed {config.seeds[0]}")
    scores: dict[int, float] = {}
    jobs = resolve_jobs(config.jobs, device, len(trial_work))
    for i, row, _ in run_rows(trial_work, [*tasks, *val_tasks], features, encoders,
                              replace(config, seeds=config.seeds[:1]), precision, device, jobs):
        scores[i] = float(row["metrics"][tasks[work[trials[i][0]][0]].metric])
    tuned, records = [], {}
    for index, (t, fusion, settings) in enumerate(work):
        mine = [i for i, (owner, _) in enumerate(trials) if owner == index]
        record = tune_record(grids[tasks[t].name], [trials[i][1] for i in mine], [scores[i] for i in mine],
                             config.seeds[0])
        records[index] = record
        tuned.append((t, fusion, apply_trial(settings, record["chosen"], cap)))
    echo(f"--tune: chose every row's settings on validation in {time.perf_counter() - started:.0f}s; "
         "training them and scoring the test split")
    return tuned, records


def run_bench(config: BenchConfig, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the benchmark described by ``config``; write the report; return the results rows.

    Args:
        config: see :class:`BenchConfig`.
        echo: where the status messages, the per-task summary lines and the final results tables go.
    """
    from .report import majority_prior, print_results, summary_line, write_report

    started = time.perf_counter()
    suite = SUITES.get(config.suite)
    task_names = resolve_tasks(config.suite, config.tasks)
    fusions = resolve_fusions(config.fusions)
    device = resolve_device(config.device)
    precision = resolve_precision(config.mixed_precision, device)
    if not config.seeds:
        raise BenchError("--seeds needs at least one seed")
    resolve_jobs(config.jobs, device, rows=1)  # --jobs checked before any data is generated or extracted
    if config.epochs is not None and config.epochs <= 0:
        raise BenchError(f"--epochs must be > 0, got {config.epochs}")
    image_size = config.image_size or suite.image_size
    image_grid = suite.image_grid if config.image_grid is None else config.image_grid
    if image_grid is not None and image_grid < 0:
        raise BenchError(f"--image-grid must be >= 0 (0 = every token), got {image_grid}")

    for option, limit in (("--max-train", config.max_train), ("--max-test", config.max_test)):
        if limit is not None and limit < 1:  # before any data is read (load_tasks checks them too)
            raise BenchError(f"{option} must be a whole number of images >= 1, got {limit!r}")
    if config.vision_weights not in ("pretrained", "random"):
        raise BenchError(f"--vision-weights must be pretrained or random, got {config.vision_weights!r}")
    check_tail_tasks(config.train_encoders, suite, task_names)  # --train-encoders: which suites and tasks
    if config.tune:
        if config.eval_split != "test":
            raise BenchError("--tune scores the validation split itself, then the test split: leave --eval-split "
                             "at test")
        grids = {name: config.tune_grid or grid_for(name, TASK_SETTINGS[name]) for name in task_names}
        if config.epochs is not None and any("epochs" in grid for grid in grids.values()):
            raise BenchError("--epochs fixes what the --tune grid chooses; give one of them, or a --tune-grid "
                             "without epochs")

    # Encoders first: a name that cannot be built fails before any data is generated or read.
    try:
        torch.manual_seed(0)  # --vision-weights random: the same initial weights (and cache entry) every run
        vision = build_vision_encoder(config.vision, pretrained=config.vision_weights == "pretrained")
    except (RegistryError, RuntimeError, ImportError, FileNotFoundError) as exc:
        hint = " (here: --vision-weights random)" if config.vision_weights == "pretrained" else ""
        raise BenchError(f"--vision {config.vision}: {exc}{hint}") from exc
    vision.freeze()
    if suite.image_stage is not None:
        try:
            vision.stage_index(suite.image_stage)
        except ValueError as exc:
            raise BenchError(f"the {suite.name!r} suite reads stage {suite.image_stage} of the image encoder's "
                             f"feature maps, which --vision {config.vision} cannot give: {exc}") from exc
    try:
        text = build_text_encoder(config.text)
    except (RegistryError, RuntimeError, ImportError, FileNotFoundError, OSError) as exc:
        raise BenchError(f"--text {config.text}: {exc}") from exc
    text.freeze()
    if config.train_encoders:
        check_tail_blocks(config.train_encoders, vision, text, _spec_name(config.vision), _spec_name(config.text))
    tasks = load_tasks(suite, task_names, config.data_dir, config.quick, eval_split=config.eval_split,
                       max_train=config.max_train, max_test=config.max_test, drop_missing=not config.tasks)
    causal_text = None
    if any(task.causal_text for task in tasks):
        causal_text = build_text_encoder(config.text, causal=True)
        causal_text.freeze()
    encoders = {"vision": vision.to(device), "text": text.to(device),
                "causal_text": causal_text.to(device) if causal_text is not None else None}
    if config.train_encoders:  # views of the frozen encoders' last blocks; every row trains a copy
        encoders.update(vision_tail=vision.tail(config.train_encoders), text_tail=text.tail(config.train_encoders))

    cache = FeatureCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir(),
                         enabled=not config.no_cache)
    # --tune: the same tasks (and train images), scored on validation for the trials
    val_tasks = (load_tasks(suite, [task.name for task in tasks], config.data_dir, config.quick, eval_split="val",
                            max_train=config.max_train, max_test=config.max_test) if config.tune else [])
    features, feature_info = extract_features([*tasks, *val_tasks], vision, text, causal_text, cache, image_size,
                                              device,
                                              config.progress, image_grid, suite.image_stage,
                                              suite.image_positions, config.train_encoders)
    if not cache.enabled:
        echo(f"feature cache off (--no-cache): extracted features in {cache.extraction_seconds:.1f}s")
    elif cache.misses == 0:
        echo(f"feature cache: {cache.hits} hits, 0 misses -- extraction skipped ({cache.root})")
    else:
        echo(f"feature cache: {cache.hits} hits, {cache.misses} misses -- extracted in "
             f"{cache.extraction_seconds:.1f}s, stored in {cache.root}")

    work = [(t, fusion, settings_for(task.name, fusion, config.epochs, config.quick))
            for t, task in enumerate(tasks) for fusion in task_rows(task, fusions)]
    tuning: dict[int, dict[str, Any]] = {}  # index in `work` -> its tuning record
    if config.tune:
        work, tuning = tune_settings(work, tasks, val_tasks, grids, features, encoders, config, precision, device,
                                     echo)
    jobs = resolve_jobs(config.jobs, device, len(work))
    captions: dict[str, Any] = {}
    scores: dict[tuple[str, str], dict[str, Any]] = {}  # (task, row) -> seed -> retrieval score arrays
    answers: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (task, fusion) -> VQA results entries
    finished: dict[int, dict[str, Any]] = {}  # index in `work` -> row; rows finish in any order
    rows_start = time.perf_counter()
    for index, row, row_captions in run_rows(work, tasks, features, encoders, config, precision, device, jobs):
        t = work[index][0]
        if SCORES_KEY in row:  # retrieval: the score matrices go to their own files, not results.json
            scores[(row["task"], row["fusion"])] = row.pop(SCORES_KEY)
        if ANSWERS_KEY in row:  # VQA with official question ids: a results file of its own
            answers[(row["task"], row["fusion"])] = row.pop(ANSWERS_KEY)
        row["config"].update(image_size=image_size, image_grid=image_grid, image_stage=suite.image_stage,
                             image_positions=suite.image_positions, eval_split=config.eval_split,
                             vision=_spec_name(config.vision), text=_spec_name(config.text),
                             quick=config.quick, jobs=jobs)
        for task_name, per_fusion in row_captions.items():
            captions.setdefault(task_name, {}).update(per_fusion)
        logger.info("%s %s: %s", tasks[t].name, row["fusion"], row["metrics"].get(tasks[t].metric))
        finished[index] = row
        of_task = [i for i, (task_index, _, _) in enumerate(work) if task_index == t]
        if all(i in finished for i in of_task):
            with tqdm.external_write_mode():  # above the progress bar, not glued to its line
                echo(summary_line(tasks[t], [finished[i] for i in of_task], time.perf_counter() - rows_start))
                sys.stdout.flush()
    rows = [finished[i] for i in range(len(work))]  # `work` is in task, then fusion order
    for index, record in tuning.items():
        rows[index]["tune"] = record

    run_info = {
        "suite": config.suite,
        "tasks": [task.name for task in tasks],
        "task_descriptions": {task.name: task.description for task in tasks},
        "question_prior": {task.name: prior for task in tasks if (prior := question_prior(task)) is not None},
        "majority_prior": {task.name: prior for task in tasks if (prior := majority_prior(task)) is not None},
        "headline_metrics": {task.name: task.metric for task in tasks},
        "fusions": fusions,
        "seeds": list(config.seeds),
        "quick": config.quick,
        "precision": precision,
        "machine": machine_description(device),
        "features": feature_info,
        "cache": cache.stats(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    write_report(Path(config.out), rows, run_info, captions, scores, answers)
    run_info["wall_seconds"] = round(time.perf_counter() - started, 1)
    echo(f"wrote {Path(config.out) / 'results.md'} (and results.json, run.json, plots) "
         f"in {run_info['wall_seconds']:.0f}s")
    print_results(rows, run_info, echo)
    return rows
