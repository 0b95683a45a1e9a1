"""The ``coco-retrieval`` task of the benchmark: ITC for a shortlist, each fusion's ITM head to rerank it.

Rows (one model per row and seed, trained and scored on cached features):

* ``itc`` (the reference): a dual encoder -- the :class:`~fusionzoo.alignment.Alignment`
  of a retrieval model trained with ITC alone (``itm_weight=0``); its ranking is the
  cosine of the two embeddings (the ``itc_*`` metrics of
  :func:`~fusionzoo.tasks.retrieval.score_matrices`). Its model carries a tiny frozen
  fusion and ITM head that it never runs (a :class:`~fusionzoo.model.FusionModel`
  needs both), which its parameter counts leave out.
* one row per fusion: a retrieval model (the Alignment, or the fusion's own alignment
  for ``albef``, plus the fusion and its ITM head) trained with ITC + ITM, scored with
  each query's ``rerank_k`` (16) best ITC candidates reranked by the ITM log-odds, and
  also with ``rerank_k="all"`` (ITM on every pair). Its metrics: ``txt_r1`` ...
  ``r_mean`` (reranked with ``rerank_k``), ``all_txt_r1`` ... ``all_r_mean`` (every pair),
  ``itc_txt_r1`` ... ``itc_r_mean`` (its own ITC ranking), and seconds per query
  (images + captions) of the shortlisting (``itc_seconds_per_query``), of the reranking
  (``rerank_seconds_per_query``, ``all_rerank_seconds_per_query``) and of both
  (``seconds_per_query``, ``all_seconds_per_query``); ``rerank_cost_ratio`` is the
  reranking's seconds with ``rerank_k`` over those with every pair.

Training (:func:`train_retrieval_model`) is the step of ``fusionzoo train
task=retrieval`` (:class:`~fusionzoo.training.retrieval.RetrievalRecipe`) on cached
image tokens and cached caption states: the model's modules wrapped in
:class:`~fusionzoo.training.pretrain_model.PretrainModel` (ITC over the batch with the captions
of one image as positives of each other, ITM on the positives and on hard negatives drawn
by ITC similarity with per-row generators, no MLM), through the bench's loop
(:func:`~fusionzoo.bench.loop.train_model`: AdamW, warmup then cosine, full batches).
Scoring (:func:`score_split`) embeds the split's images and captions from the cache and
calls :func:`~fusionzoo.tasks.retrieval.score_matrices`; recall@K is
:func:`~fusionzoo.tasks.retrieval_eval.recall_at_k`.

Rows hand their score matrices to the report under the private key ``_scores``
(:data:`SCORES_KEY`); :func:`~fusionzoo.bench.runner.run_bench` moves them to
``scores_<task>_<row>_seed<seed>.npz`` (``fusionzoo score retrieval`` reads them).

Settings were chosen on the validation split (:func:`select_settings`); see
:data:`~fusionzoo.bench.settings.TASK_SETTINGS`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..alignment import Alignment, summarise
from ..encoders import TextEncoder, VisionEncoder
from ..losses import ITMLoss
from ..model import FusionModel
from ..model_config import model_config
from ..registry import FUSIONS
from ..processes import OneProcess
from ..tasks.retrieval import Captions, Gallery, score_matrices
from ..tasks.retrieval_eval import recall_at_k
from ..training.pretrain import row_generators
from ..training.pretrain_model import PretrainModel
from .baselines import REFERENCES, TEXT_ONLY
from .config import resolve_device
from .loop import PeakMemory, autocast, seeded, train_model
from .row import SCORES_KEY, count_parameters, mean_metrics, result_row
from .run_features import Features, extract_features
from .settings import TEXT_ENCODER, VISION_ENCODER, fusion_kwargs_for, settings_for
from .standardize import STD_FLOOR, StandardizedAligningFusion, StandardizedFusion
from .suites import BenchTask, SplitData

#: The row name of the dual-encoder reference.
ITC_ROW = "itc"
#: What the dual encoder's FusionModel carries as its (frozen, never run) fusion: the
#: smallest module that honours the fusion contract.
ITC_CARRIER, ITC_CARRIER_KWARGS = TEXT_ONLY, {"dim": 8}
RECALLS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def row_names(fusions: Sequence[str]) -> list[str]:
    """The rows of a retrieval task: each requested fusion (not the one-modality references), then ``itc``.

    A text-only or image-only model cannot tell a matching pair from a mismatched one, so
    the retrieval task's reference is the dual encoder instead.
    """
    return [f for f in fusions if f not in REFERENCES and f != ITC_ROW] + [ITC_ROW]


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
class StandardizedAlignment(Alignment):
    """:class:`~fusionzoo.alignment.Alignment` of per-channel standardised summaries.

    The summary (masked mean, or first token) of ``(x - mean) / (std + 0.01)`` is the
    standardised summary, so the map is applied after summarising (cheaper, same values).
    Statistics left out (None) leave that modality as it is.
    """

    def __init__(self, text_dim: int, image_dim: int, *, text_mean: Tensor | None = None,
                 text_std: Tensor | None = None, image_mean: Tensor | None = None,
                 image_std: Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(text_dim, image_dim, **kwargs)
        for name, mean, std, width in (("text", text_mean, text_std, text_dim),
                                       ("image", image_mean, image_std, image_dim)):
            shift = mean if mean is not None else torch.zeros(width)
            scale = 1.0 / (std + STD_FLOOR) if std is not None else torch.ones(width)
            self.register_buffer(f"{name}_shift", shift.float().clone())
            self.register_buffer(f"{name}_scale", scale.float().clone())

    def embed_images(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        summary = summarise(image, image_mask, self.image_summary)  # (B, Di)
        summary = (summary - self.image_shift.to(summary.dtype)) * self.image_scale.to(summary.dtype)
        return F.normalize(self.image_proj(summary), dim=-1)

    def embed_texts(self, text: Tensor, text_mask: Tensor) -> Tensor:
        summary = summarise(text, text_mask, self.text_summary)  # (B, Dt)
        summary = (summary - self.text_shift.to(summary.dtype)) * self.text_scale.to(summary.dtype)
        return F.normalize(self.text_proj(summary), dim=-1)


def build_retrieval_model(task: BenchTask, fusion: str, vision: VisionEncoder, text: TextEncoder,
                          fusion_kwargs: dict[str, Any], settings: Any,
                          stats: dict[str, Tensor] | None = None) -> FusionModel:
    """A retrieval :class:`FusionModel` around the shared frozen encoders (as ``create_model("retrieval", ...)``).

    The fusion (standardised with ``stats`` as in the other tasks, and built for a head
    that reads ``pooled`` where it can) gets the ITM head; a fusion that does not align
    its own streams gets an Alignment (:class:`StandardizedAlignment` with
    ``settings.standardize``). ``fusion="itc"``: the dual encoder (module docstring).
    """
    from ..tasks import get_task
    from ..registry import HEADS

    carrier = fusion == ITC_ROW
    name = ITC_CARRIER if carrier else fusion
    fusion_cls = REFERENCES.get(name) or FUSIONS.get(name)
    head_cls = HEADS.get(get_task(task.task).head)
    kwargs = dict(ITC_CARRIER_KWARGS) if carrier else dict(fusion_kwargs)
    if getattr(fusion_cls, "supports_head_reads", False):
        kwargs.setdefault("head_reads", getattr(head_cls, "reads", "all"))  # as create_model does
    module = fusion_cls(text.out_dim, vision.out_dim, **kwargs)
    if stats is not None and not carrier:
        module = (StandardizedAligningFusion if module.aligns else StandardizedFusion)(module, **stats)
    head = head_cls.from_parts(module, text, None)
    align = None
    if not module.aligns:
        align_stats = stats if (stats is not None and settings.standardize) else {}
        align = StandardizedAlignment(text.out_dim, vision.out_dim, embed_dim=settings.embed_dim,
                                      temperature=settings.temperature, text_summary=settings.text_summary,
                                      **align_stats)
    config = model_config(task.task, name, module, vision, text, max_text_len=settings.max_text_len,
                          freeze_encoders=True, align=align)
    model = FusionModel(vision, text, module, head, config, align=align)
    if carrier:  # never run: no gradient, not in the optimiser
        model.fusion.requires_grad_(False)
        model.head.requires_grad_(False)
    return model


def pretrain_wrapper(model: FusionModel, settings: Any) -> PretrainModel:
    """``model``'s modules in PretrainModel, ITC + ITM without MLM, as RetrievalRecipe builds it."""
    return PretrainModel(model.vision, model.text, model.fusion, ITMLoss(model.fusion.out_dim, head=model.head.linear),
                         None, model.config, align=model.align, itc_weight=settings.itc_weight,
                         itm_weight=settings.itm_weight, mlm_weight=0.0)


def row_parameters(model: FusionModel, fusion: str) -> tuple[int, int]:
    """(trainable, total) parameters of a row; the dual encoder's carrier fusion and head left out."""
    if fusion != ITC_ROW:
        return count_parameters(model)
    used = torch.nn.ModuleList([model.vision, model.text, model.align])
    return count_parameters(used)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def train_retrieval_model(model: FusionModel, split: SplitData, features: Features, settings: Any, *, precision: str,
                          device: torch.device, seed: int, desc: str = "train", progress: bool = False) -> Any:
    """ITC (+ ITM) training of ``model`` on the (image, caption) pairs of ``split``, from cached features.

    Returns:
        the loop's :class:`~fusionzoo.bench.loop.TrainStats`.
    """
    view = features.view(split, False)
    image_ids = torch.as_tensor(split.image_ids, dtype=torch.long)  # (S,)
    trainer = pretrain_wrapper(model, settings).to(device)

    def extra_inputs(step: int, index: Tensor) -> dict[str, Any]:
        # Captions of one image are ITC positives of each other and never each other's negatives;
        # each row's hard negatives come from its own generator (as RetrievalRecipe draws them).
        return {"image_ids": image_ids[index].to(device),
                "generator": row_generators(seed, "negatives", step, 0, 0, len(index))}

    return train_model(trainer, view, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                       weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio, precision=precision,
                       device=device, seed=seed, desc=desc, progress=progress, extra_inputs=extra_inputs,
                       drop_last=True, compile=settings.compile)


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------
@torch.no_grad()
def embed_split(model: FusionModel, split: SplitData, features: Features, device: torch.device, precision: str,
                batch_size: int = 1024) -> tuple[Gallery, Captions]:
    """The split's distinct images (in order of first appearance) and its captions, embedded from the cache."""
    model.eval()
    paths = list(dict.fromkeys(split.image_paths))
    index = {p: i for i, p in enumerate(paths)}
    first = {}
    for k, p in enumerate(split.image_paths):
        first.setdefault(p, k)
    image_rows = torch.as_tensor([features.image_row[p] for p in paths], dtype=torch.long)
    tokens = features.image_tokens[image_rows].float()  # (I, N, Di)
    arrays, text_row = features.texts[False]
    text_rows = torch.as_tensor([text_row[t] for t in split.texts], dtype=torch.long)
    mask = arrays["mask"][text_rows].bool()  # (C, T)
    width = max(1, int(mask.sum(dim=1).max()))
    mask = mask[:, :width].contiguous()
    states = arrays["states"][text_rows, :width].float()  # (C, t, Dt)

    def embed(fn, *tensors: Tensor) -> Tensor:
        out = []
        for begin in range(0, len(tensors[0]), batch_size):
            with autocast(precision, device):
                out.append(fn(*(x[begin: begin + batch_size].to(device) for x in tensors)).float().cpu())
        return torch.cat(out)

    image_embed = embed(model.embed_image_states, tokens)  # (I, E)
    text_embed = embed(model.embed_text_states, states, mask)  # (C, E)
    image_ids = torch.as_tensor([split.image_ids[first[p]] for p in paths], dtype=torch.long)
    caption_ids = torch.as_tensor(split.caption_ids if split.caption_ids is not None else range(len(split)),
                                  dtype=torch.long)
    owner = torch.as_tensor([index[p] for p in split.image_paths], dtype=torch.long)
    return Gallery(image_ids, image_embed, tokens), Captions(caption_ids, owner, text_embed, states, mask)


def score_split(model: FusionModel, gallery: Gallery, captions: Captions, rerank_k: int | str, *,
                batch_size: int, precision: str, device: torch.device,
                rerank_itc_weight: float = 0.0) -> dict[str, Any]:
    """:func:`~fusionzoo.tasks.retrieval.score_matrices` of the embedded split, in one process on ``device``."""
    model.eval()
    with autocast(precision, device):
        return score_matrices(model, gallery, captions, rerank_k=rerank_k, rerank_batch_size=batch_size,
                              rerank_itc_weight=rerank_itc_weight, accelerator=OneProcess(device))


def recalls(i2t: Tensor, t2i: Tensor, owner: Tensor, prefix: str = "") -> dict[str, float]:
    """``recall_at_k`` of the matrices, keys prefixed (``itc_``, ``all_``)."""
    return {f"{prefix}{k}": v for k, v in recall_at_k(i2t.float().numpy(), t2i.float().numpy(), owner.numpy()).items()}


def evaluate_row(model: FusionModel, fusion: str, split: SplitData, features: Features, settings: Any, *,
                 precision: str, device: torch.device, score_all: bool = True
                 ) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    """A row's metrics on ``split``, its score matrices (for the report's .npz), and its queries per second.

    ``score_all=False`` skips the ``rerank_k="all"`` scoring (and its ``all_*`` metrics).
    """
    start = time.perf_counter()
    gallery, captions = embed_split(model, split, features, device, precision, settings.eval_batch_size)
    embed_seconds = time.perf_counter() - start
    queries = len(gallery.image_ids) + len(captions.caption_ids)
    owner = captions.owner
    batch = settings.eval_batch_size
    arrays = {"image_ids": gallery.image_ids.numpy(), "caption_ids": captions.caption_ids.numpy()}
    if fusion == ITC_ROW:
        # rerank_k=1 keeps the ITC order (the one shortlisted candidate stays first): the row reads itc_*.
        scores = score_split(model, gallery, captions, 1, batch_size=batch, precision=precision, device=device)
        itc = recalls(scores["itc_i2t"], scores["itc_t2i"], owner)
        itc_seconds = (scores["itc_seconds"] + embed_seconds) / queries
        metrics = {**itc, **{f"itc_{k}": v for k, v in itc.items()}, "rerank_k": 0.0,
                   "itc_seconds_per_query": itc_seconds, "rerank_seconds_per_query": 0.0,
                   "seconds_per_query": itc_seconds}
        arrays.update(i2t=scores["itc_i2t"].numpy(), t2i=scores["itc_t2i"].numpy(),
                      itc_i2t=scores["itc_i2t"].numpy(), itc_t2i=scores["itc_t2i"].numpy())
    else:
        scores = score_split(model, gallery, captions, settings.rerank_k, batch_size=batch, precision=precision,
                             device=device, rerank_itc_weight=settings.rerank_itc_weight)
        itc_seconds = (scores["itc_seconds"] + embed_seconds) / queries
        rerank_seconds = scores["rerank_seconds"] / queries
        metrics = {**recalls(scores["i2t"], scores["t2i"], owner),
                   **recalls(scores["itc_i2t"], scores["itc_t2i"], owner, "itc_"),
                   "rerank_k": float(scores["k"]),
                   "itc_seconds_per_query": itc_seconds,
                   "rerank_seconds_per_query": rerank_seconds,
                   "seconds_per_query": itc_seconds + rerank_seconds}
        arrays.update(i2t=scores["i2t"].numpy(), t2i=scores["t2i"].numpy(), itc_i2t=scores["itc_i2t"].numpy(),
                      itc_t2i=scores["itc_t2i"].numpy())
        if score_all:
            every = score_split(model, gallery, captions, "all", batch_size=batch, precision=precision,
                                device=device, rerank_itc_weight=settings.rerank_itc_weight)
            all_seconds = every["rerank_seconds"] / queries
            metrics.update(recalls(every["i2t"], every["t2i"], owner, "all_"))
            metrics.update(all_rerank_seconds_per_query=all_seconds, all_seconds_per_query=itc_seconds + all_seconds,
                           rerank_cost_ratio=rerank_seconds / max(all_seconds, 1e-12))
            arrays.update(all_i2t=every["i2t"].numpy(), all_t2i=every["t2i"].numpy())
    metrics["num_images"] = float(len(gallery.image_ids))
    metrics["num_captions"] = float(len(captions.caption_ids))
    arrays["owner"] = owner.numpy()
    return metrics, arrays, 1.0 / max(metrics["seconds_per_query"], 1e-12)


# --------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------
def run_retrieval_row(task: BenchTask, fusion: str, settings: Any, features: Features, encoders: dict[str, Any],
                      seeds: Sequence[int], precision: str, device: torch.device, progress: bool,
                      fusion_kwargs: dict[str, Any] | None = None, score_all: bool = True) -> dict[str, Any]:
    """Train and score one retrieval row for every seed; the aggregated results row (as :mod:`~fusionzoo.bench.row`'s).

    ``fusion_kwargs``: the fusion's constructor arguments (default: the benchmark's,
    :func:`~fusionzoo.bench.settings.fusion_kwargs_for`); ``score_all``: also score every pair
    with ITM (the ``all_*`` metrics). The row also holds ``_scores``
    (:data:`SCORES_KEY`): seed -> the arrays of its score file.
    """
    if fusion == ITC_ROW:
        kwargs: dict[str, Any] = {}
    else:
        kwargs = dict(fusion_kwargs) if fusion_kwargs is not None else fusion_kwargs_for(fusion, task.name)
    feature_stats = features.stats(task.train, False)
    per_seed, seconds, throughput, memory, losses, compiling, scores = [], [], [], [], [], [], {}
    params = (0, 0)
    model = None
    for seed in seeds:
        with seeded(seed, device):
            model = build_retrieval_model(task, fusion, encoders["vision"], encoders["text"], kwargs, settings,
                                          feature_stats).to(device)
        params = row_parameters(model, fusion)
        with PeakMemory(device) as peak:
            stats = train_retrieval_model(model, task.train, features, settings, precision=precision, device=device,
                                          seed=seed, desc=f"{task.name} {fusion} seed {seed}", progress=progress)
            metrics, arrays, queries_per_second = evaluate_row(model, fusion, task.test, features, settings,
                                                               precision=precision, device=device,
                                                               score_all=score_all)
        per_seed.append(metrics)
        scores[str(seed)] = arrays
        seconds.append(stats.seconds)
        throughput.append(queries_per_second)
        memory.append(peak.peak_mb)
        losses.append(stats.final_loss)
        compiling.append(stats.compile_seconds)
    metrics = mean_metrics(per_seed)
    metrics["final_train_loss"] = float(np.mean(losses))
    if settings.compile:  # torch.compile's own seconds, left out of train_seconds
        metrics["compile_seconds"] = float(np.mean(compiling))
    if len(seeds) > 1:
        metrics["per_seed"] = [{"seed": s, **m} for s, m in zip(seeds, per_seed)]
    config_settings = asdict(settings)
    if fusion == ITC_ROW:
        config_settings["rerank_k"] = 0
    row = result_row(task, fusion, metrics, params, seconds, throughput, memory, seeds, {
        "reference": fusion == ITC_ROW,
        "fusion_kwargs": kwargs,
        **config_settings,
        "align": None if model is None or model.align is None else model.align.config,
        "precision": precision,
        "device": str(device),
        "train_samples": len(task.train),
        "test_samples": len(task.test),
        "test_images": len(set(task.test.image_paths)),
    })
    row[SCORES_KEY] = scores
    return row


# --------------------------------------------------------------------------------------
# Choosing the settings on the validation split
# --------------------------------------------------------------------------------------
def select_settings(data_dir: str | Path, candidates: Sequence[tuple[str, dict[str, Any], dict[str, Any]]], *,
                    seeds: Sequence[int] = (0,), device: str = "cpu", cache_dir: str | Path | None = None,
                    quick: bool = False, score_all: bool = False, echo: Any = print) -> list[dict[str, Any]]:
    """Train and score candidate settings on the Karpathy **validation** split (never the test split).

    Args:
        data_dir: the COCO folder (``coco-vqa-mini`` layout).
        candidates: ``(row, settings changes, fusion kwargs changes)``; ``row`` is a fusion
            or ``"itc"``; the changes go over the task's settings of that row.
        seeds: seeds per candidate (metrics averaged).
        device, cache_dir: as ``fusionzoo bench``'s.
        quick: the ``--quick`` image subset.
        score_all: also score every pair with ITM (slow; the choice reads ``r_mean`` at ``rerank_k``).
        echo: where each candidate's line goes.
    Returns:
        one row per candidate, as :func:`run_retrieval_row` returns it, scored on val.
    """
    from ..features.cache import FeatureCache
    from ..features.layout import default_cache_dir
    from .suites import SUITES, load_coco_retrieval_task, _keep_images, _quick_images
    from ..encoders import build_text_encoder, build_vision_encoder

    suite = SUITES["coco"]
    task = load_coco_retrieval_task(Path(data_dir), eval_split="val")
    if quick:
        train_images, val_images = _quick_images([task], suite.quick_images, 0)
        task = replace(task, train=_keep_images(task.train, train_images), test=_keep_images(task.test, val_images))
    torch_device = resolve_device(device)
    vision = build_vision_encoder(VISION_ENCODER)
    vision.freeze()
    text = build_text_encoder(TEXT_ENCODER)
    text.freeze()
    encoders = {"vision": vision.to(torch_device), "text": text.to(torch_device), "causal_text": None}
    cache = FeatureCache(Path(cache_dir) if cache_dir else default_cache_dir())
    features, _ = extract_features([task], vision, text, None, cache, suite.image_size, torch_device, False,
                                   suite.image_grid)
    rows = []
    for fusion, changes, kwargs_changes in candidates:
        settings = replace(settings_for(task.name, fusion), **changes)
        kwargs = {**fusion_kwargs_for(fusion, task.name), **kwargs_changes}
        row = run_retrieval_row(task, fusion, settings, features, encoders, seeds, "no", torch_device, False,
                                fusion_kwargs=kwargs, score_all=score_all)
        row.pop(SCORES_KEY)
        m = row["metrics"]
        echo(f"val {fusion} {changes} {kwargs_changes}: r_mean {m['r_mean']:.2f} (itc {m['itc_r_mean']:.2f}"
             + (f", all {m['all_r_mean']:.2f}" if "all_r_mean" in m else "") + f") train {row['train_seconds']:.0f}s")
        rows.append({**row, "changes": changes, "kwargs_changes": kwargs_changes})
    return rows
