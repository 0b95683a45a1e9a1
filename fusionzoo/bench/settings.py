"""How every row of the benchmark is trained: the per-task settings, each fusion's changes, the fusions' widths.

* :class:`TrainSettings` (and :class:`RetrievalSettings` for a retrieval task): epochs,
  batch, learning rate and the rest of one task's training;
* :data:`TASK_SETTINGS` per task, :data:`FUSION_SETTINGS` per task and fusion (what
  ``--tune`` chose on the validation splits), and :func:`settings_for`, which merges them
  with ``--epochs`` / ``--quick``;
* :data:`COMMON_FUSION_KWARGS`, :data:`TASK_FUSION_KWARGS`, :data:`FUSION_KWARGS` and
  :func:`fusion_kwargs_for`: the fusions' constructor arguments;
* the frozen encoders a run uses unless told otherwise (:data:`VISION_ENCODER`, :data:`TEXT_ENCODER`).

The settings were chosen so that the default easy-VQA run stays short on a CPU; the README's
benchmark section reports what they give, how long they take and on which machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..decoding import DecodingOptions
from ..training.step import bf16_unsafe

#: The frozen encoders of a run (``--vision``, ``--text``).
VISION_ENCODER = "efficientnet-lite0"
TEXT_ENCODER = "minilm-l6"


@dataclass(frozen=True)
class TrainSettings:
    """How one task's models are trained.

    Attributes:
        epochs: passes over the train split.
        batch_size: samples per optimiser step.
        lr: AdamW peak learning rate (warmup, then cosine to 0).
        weight_decay: AdamW weight decay of matrices.
        warmup_ratio: fraction of steps of linear warmup (as `fusionzoo train`'s `warmup_ratio`).
        max_text_len: tokens kept per question / caption.
        eval_batch_size: samples per inference call.
        decoding: how captions are generated (beams, lengths, repetition options; transformers' meanings).
        compile: compile the trained modules for the training step (``fusionzoo train``'s
            ``compile``; :func:`~fusionzoo.bench.loop.train_model`); the seconds spent compiling
            are left out of the row's training seconds.
        modality_dropout: the chance that a training sample loses its image or its question
            (``--modality-dropout``; :mod:`fusionzoo.training.modality_dropout`); VQA and classification rows.
        robustness: score the trained row again on corrupted test inputs (``--robustness``;
            :mod:`fusionzoo.bench.robustness`); VQA and classification rows.
    """

    epochs: float
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_text_len: int = 32
    eval_batch_size: int = 1024
    decoding: DecodingOptions = DecodingOptions()
    compile: bool = False
    modality_dropout: float = 0.0
    robustness: bool = False


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
    "coco-captioning": TrainSettings(epochs=8, batch_size=64, lr=5e-4, eval_batch_size=128,
                                     decoding=DecodingOptions(max_new_tokens=20)),
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
    # the best (the README's COCO tables give the run: its commit, machine and precision).
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
#: and on a CPU drawing the dropout masks (``bernoulli_``) is a large share of a small fusion's step.
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
    # ALBEF without its in-batch ITC loss: every scene shows all six colours and every question is
    # one of six templates, so no question picks out its scene and ITC has nothing to learn; its
    # gradient into the shared image projection left one seed in three on the position plateau
    # (left/right at chance) in bf16 and in float32. Validation, bf16, seeds 0-2: 89.85 +- 0.24
    # (non-relational 97.9, left/right 96.6 +- 0.5) with itc_weight=0.
    "sort-of-clevr": {"early_concat": {"num_layers": 0}, "merged_transformer": {"num_layers": 2},
                      "albef": {"itc_weight": 0.0}},
}
#: Per-fusion changes for every task (applied last).
FUSION_KWARGS: dict[str, dict[str, Any]] = {}

#: ``--quick``: at most this many epochs (the data is a few hundred samples).
QUICK_EPOCHS = 2


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


def row_precision(fusion: str, precision: str, auto: bool, fusion_kwargs: dict[str, Any] | None = None) -> str:
    """The precision a row trains in: ``precision``, except float32 (``no``) for a fusion that
    :func:`~fusionzoo.training.step.bf16_unsafe` names with the row's ``fusion_kwargs`` when
    ``--mixed-precision auto`` chose bf16 (an explicit bf16 is kept), as ``fusionzoo train`` does."""
    if auto and precision == "bf16" and bf16_unsafe(fusion, fusion_kwargs):
        return "no"
    return precision
