"""Fine-tuning and evaluation on HF Accelerate: one code path for 1 process, N GPUs, N machines.

The loop follows Accelerate's examples: ``set_seed`` before building the model,
``main_process_first`` around data preparation, one ``prepare`` call,
``accumulate`` + ``backward``, ``gather_for_metrics`` in evaluation (every sample
scored exactly once however many processes), ``save_state`` / ``load_state`` with
``skip_first_batches`` to resume mid-epoch. Run it with ``fusionzoo train`` (one
process) or under ``accelerate launch`` / ``torchrun`` (several).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .checkpoint import CheckpointManager, run_metadata, write_json_atomic
from .config import TrainConfig
from .optim import build_optimizer, warmup_cosine

logger = logging.getLogger(__name__)

#: Batch keys that FusionModel.forward takes; the rest is metadata.
MODEL_KEYS = ("pixel_values", "image_states", "image_mask", "input_ids", "attention_mask", "labels")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good state was saved first."""


# -- building blocks -------------------------------------------------------------------


def make_accelerator(config: TrainConfig, with_trackers: bool = True, find_unused_parameters: bool | None = None):
    """An Accelerator for this run (mixed precision, accumulation, seedable sampler, trackers).

    ``find_unused_parameters`` (DDP) defaults to True for captioning only (see below).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None
    if with_trackers and config.log_with not in (None, "none", "no"):
        if config.log_with == "auto":
            try:
                import tensorboard  # noqa: F401

                log_with = "tensorboard"
            except ImportError:
                log_with = None
        else:
            log_with = config.log_with
    # Under torchrun / accelerate launch on a machine without a GPU, Accelerate only forms a
    # process group (gloo, MULTI_CPU) when told to use the CPU; otherwise each process would
    # train alone.
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = config.cpu or (launched and not torch.cuda.is_available())
    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=cpu,
        gradient_accumulation_steps=config.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")),
        # The shuffling order depends only on (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Captioning reads only the text positions: parts of some fusions that build the pooled
        # vector or the last image-stream layer get no gradient there, which DDP must be told.
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=config.task == "captioning" if find_unused_parameters is None
            else find_unused_parameters)],
    )


@dataclass
class PreparedData:
    """A task's data made ready for a model: datasets with image transforms and a collate."""

    data: Any  # fusionzoo.tasks.common.TaskData
    train: Any | None
    eval: Any | None
    collate: Any
    eval_collate: Any
    eval_split: str | None = None


def load_task_data(config: TrainConfig):
    """Load the dataset named by ``config.data`` (a registered name, or a path for JSON sources)."""
    import fusionzoo.tasks  # noqa: F401  (registers the datasets)
    from fusionzoo.registry import DATASETS

    name = config.data
    kwargs: dict[str, Any] = {"skip_bad": config.skip_bad}
    if config.data_dir is not None:
        kwargs["root"] = config.data_dir
    if name not in DATASETS and Path(name).exists():
        # A path: guess the loader from the task.
        kwargs["root"] = name
        name = {"vqa": "vqa-jsonl", "captioning": "karpathy-captions", "classification": "classification-jsonl"}[config.task]
    loader = DATASETS.get(name)
    if config.task == "vqa":
        kwargs.update(answers_top_k=config.answers_top_k, answers_min_count=config.answers_min_count)
    if config.only_present:
        kwargs["only_present"] = True
    return _call_loader(loader, kwargs)


def _call_loader(loader, kwargs: dict[str, Any]):
    import inspect

    params = inspect.signature(loader).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    usable = {k: v for k, v in kwargs.items() if accepts_any or k in params}
    return loader(**usable)


def _limit(dataset, n: int | None, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def prepare_data(config: TrainConfig, model, train: bool = True) -> PreparedData:
    """Image transforms from the model's encoder, collate from its tokenizer, sample limits."""
    data = load_task_data(config)
    data = data.with_image_transform(model.vision.transform(train=False))
    train_ds = eval_ds = None
    if train:
        train_ds = _pairs(data, config.train_split, config.task)
        train_ds = _limit(train_ds, config.max_train_samples, config.seed)
    eval_split = config.eval_split if train else config.split
    if eval_split is None:
        eval_split = next((s for s in ("val", "validation", "test") if s in data), None)
    if eval_split is not None:
        eval_ds = _limit(data[eval_split], config.max_eval_samples, config.seed)
    collate = data.collator(model.text.tokenize, config.max_text_len)
    # Captioning evaluates image rows (all references of an image); the same collate serves both.
    return PreparedData(data=data, train=train_ds, eval=eval_ds, collate=collate, eval_collate=collate,
                        eval_split=eval_split)


def _pairs(data, split: str, task: str):
    if task == "captioning" and hasattr(data, "pairs"):
        return data.pairs(split)
    return data[split]


def model_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


# -- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader: DataLoader, accelerator, task: str, references: dict[int, list[str]] | None = None,
             max_new_tokens: int = 20, num_beams: int = 1) -> dict[str, float]:
    """Score ``model`` on ``loader``; every sample counted once across processes.

    VQA: the soft score of the predicted answer (VQA v2 accuracy for ten-answer data,
    exact match for one-answer data), in percent. Classification: accuracy, macro-F1,
    ROC-AUC (binary). Captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr of generated captions.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    model.eval()
    try:
        if task == "captioning":
            if references is None:
                raise ValueError("captioning evaluation needs the reference captions (image_id -> captions)")
            return _evaluate_captioning(unwrapped, loader, accelerator, references, max_new_tokens, num_beams)
        scores, preds, golds, all_logits, losses = [], [], [], [], []
        for batch in loader:
            with accelerator.autocast():
                out = model(**model_inputs(batch))
            logits = out.logits.float()
            if out.loss is not None:
                losses.append(accelerator.gather_for_metrics(out.loss.detach().float().repeat(len(logits))))
            if task == "vqa":
                pred = logits.argmax(-1)
                score = batch["labels"].gather(1, pred[:, None]).squeeze(1)  # soft score of the prediction
                scores.append(accelerator.gather_for_metrics(score))
            else:
                all_logits.append(accelerator.gather_for_metrics(logits))
                golds.append(accelerator.gather_for_metrics(batch["labels"]))
        metrics: dict[str, float] = {}
        if losses:
            metrics["loss"] = torch.cat(losses).mean().item()
        if task == "vqa":
            s = torch.cat(scores)
            metrics["accuracy"] = 100.0 * s.mean().item()
            metrics["num_samples"] = float(len(s))
        else:
            from fusionzoo.tasks.classification_data import classification_metrics

            logits_all = torch.cat(all_logits).cpu()
            labels_all = torch.cat(golds).cpu()
            for k, v in classification_metrics(logits_all.numpy(), labels_all.numpy()).items():
                metrics[k] = 100.0 * v if k in ("accuracy", "macro_f1") else v
            metrics["num_samples"] = float(len(labels_all))
        return metrics
    finally:
        if was_training:
            model.train()


def _evaluate_captioning(model, loader, accelerator, references: dict[int, list[str]], max_new_tokens: int,
                         num_beams: int) -> dict[str, float]:
    from fusionzoo.tasks.caption_eval import score_caption_dicts

    image_ids, token_rows = [], []
    for batch in loader:
        with accelerator.autocast():
            ids = model.generate_ids(batch["pixel_values"], max_new_tokens=max_new_tokens, num_beams=num_beams)
        width = max_new_tokens + 2
        padded = torch.full((ids.shape[0], width), model.text.pad_token_id, dtype=torch.long, device=ids.device)
        padded[:, : ids.shape[1]] = ids[:, :width]
        token_rows.append(accelerator.gather_for_metrics(padded))
        image_ids.append(accelerator.gather_for_metrics(batch["image_id"]))
    ids_all = torch.cat(token_rows).cpu()
    img_all = torch.cat(image_ids).cpu().tolist()
    captions = model.text.tokenizer.batch_decode(ids_all.tolist(), skip_special_tokens=True)
    res = {i: [c.strip() or "."] for i, c in zip(img_all, captions)}
    gts = {i: references[i] for i in res}
    metrics = score_caption_dicts(gts, res)
    metrics["num_samples"] = float(len(res))
    return {k: v for k, v in metrics.items() if v is not None}


# -- training --------------------------------------------------------------------------


def _build_model(config: TrainConfig, data):
    import fusionzoo

    vocab_kwargs: dict[str, Any] = {}
    if config.task == "vqa":
        vocab_kwargs["answers"] = list(data.answers)
    elif config.task == "classification":
        vocab_kwargs["labels"] = list(data.label_names)
    model = fusionzoo.create_model(
        config.task, config.fusion, vision=config.vision, text=config.text,
        freeze_encoders=config.freeze_encoders, fusion_kwargs=dict(config.fusion_kwargs),
        head_kwargs=dict(config.head_kwargs), max_text_len=config.max_text_len, **vocab_kwargs,
    )
    if config.init_from:
        load_matching_weights(model, config.init_from, verbose=True)
    return model


def load_matching_weights(model, source: str | Path, verbose: bool = False) -> dict[str, int]:
    """Copy every tensor of a saved model (``model.safetensors``) whose name and shape match.

    Used to start a task from another task's or ALBEF pretraining's weights: the
    encoders and fusion carry over, a head of another shape does not. With
    ``verbose`` the main process prints what was loaded, per top-level module.
    """
    from collections import Counter

    import safetensors.torch

    path = Path(source)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        final = path / "final" / "model.safetensors"
        if final.is_file():
            weights = final
        else:
            raise FileNotFoundError(f"init_from={source!r}: no model.safetensors there (nor under final/)")
    saved = safetensors.torch.load_file(str(weights))
    own = model.state_dict()
    matched = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    stats = {"loaded": len(matched), "skipped": len(saved) - len(matched), "missing": len(own) - len(matched)}

    def by_part(keys) -> str:  # "vision 294, text 101, fusion 40"
        counts = Counter(key.split(".", 1)[0] for key in keys)
        return ", ".join(f"{part} {n}" for part, n in counts.items()) or "none"

    message = (f"init_from {weights}: loaded {stats['loaded']} tensors ({by_part(matched)}); skipped "
               f"{stats['skipped']} saved tensors absent here or of another shape "
               f"({by_part(k for k in saved if k not in matched)}); {stats['missing']} tensors of this model "
               f"kept their initialisation ({by_part(k for k in own if k not in matched)})")
    logger.info(message)
    if verbose:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(message, flush=True)
    return stats


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.task`` with ``config.fusion``; return the final evaluation metrics."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = make_accelerator(config)
    set_seed(config.seed)
    out_dir = Path(config.output_dir)
    meta = run_metadata(config.to_dict())

    with accelerator.main_process_first():
        data_probe = load_task_data(config)
    set_seed(config.seed)  # the model's init does not depend on how much randomness data loading used
    model = _build_model(config, data_probe)
    with accelerator.main_process_first():
        prepared = prepare_data(config, model, train=True)

    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(prepared.train, batch_size=config.batch_size, shuffle=True,
                              collate_fn=prepared.collate, num_workers=config.num_workers, generator=generator,
                              drop_last=False)
    eval_loader = None
    if prepared.eval is not None:
        eval_loader = DataLoader(prepared.eval, batch_size=config.effective_eval_batch_size, shuffle=False,
                                 collate_fn=prepared.eval_collate, num_workers=config.num_workers)

    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.encoder_lr)
    # Batches per process per epoch: prepare() shards the loader over processes.
    batches_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = warmup_cosine(optimizer, total_steps, int(config.warmup_ratio * total_steps))

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    manager = CheckpointManager(out_dir, config.keep_last)
    step, epoch, batches_done = 0, 0, 0
    resume_from = manager.resolve_resume(config.resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        progress = CheckpointManager.read_progress(resume_from)
        step, epoch, batches_done = progress["step"], progress["epoch"], progress["batches_in_epoch"]
        accelerator.print(f"resumed from {resume_from} at step {step} (epoch {epoch}, batch {batches_done})")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "run.json", meta)
    if accelerator.trackers or config.log_with not in (None, "none", "no"):
        try:
            accelerator.init_trackers("fusionzoo", config={k: v for k, v in config.to_dict().items()
                                                           if isinstance(v, (int, float, str, bool))})
        except Exception as exc:  # a tracker that cannot start must not stop training
            logger.warning("could not start trackers: %s", exc)

    def save(step_: int, epoch_: int, batches_: int) -> Path:
        return manager.save(accelerator, step_, {"step": step_, "epoch": epoch_, "batches_in_epoch": batches_,
                                                 "total_steps": total_steps, **meta})

    history: list[dict[str, Any]] = []
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.task}/{config.fusion}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    samples_seen, t0 = 0, time.perf_counter()
    running: dict[str, float] = {}
    done = step >= total_steps
    while not done:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        loader = train_loader
        if batches_done:
            loader = accelerator.skip_first_batches(train_loader, batches_done)
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    out = model(**model_inputs(batch))
                loss = out.loss
                if not torch.isfinite(loss.detach()).all():
                    # The parameters are still those of the last good step: save them, then stop.
                    path = save(step, epoch, batches_done)
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step} (epoch {epoch}, batch {batches_done}); "
                        f"the last good state was saved to {path}. Try a lower lr, max_grad_norm, or "
                        f"mixed_precision=no."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            samples_seen += len(batch["input_ids"]) * accelerator.num_processes
            for name, value in {"loss": loss, **out.losses}.items():
                running[name] = running.get(name, 0.0) + value.detach().float().item()
            running["_n"] = running.get("_n", 0.0) + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                n = running.pop("_n")
                logs = {f"train/{k}": v / n for k, v in running.items()}
                logs["train/lr"] = scheduler.get_last_lr()[0]
                logs["train/samples_per_second"] = samples_seen / max(1e-9, time.perf_counter() - t0)
                running = {}
                accelerator.log(logs, step=step)
                if accelerator.is_main_process:
                    with open(out_dir / "train_log.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **logs}) + "\n")
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", sps=f"{logs['train/samples_per_second']:.1f}")
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                save(step, epoch, batches_done)
            if config.eval_every and eval_loader is not None and step % config.eval_every == 0 and step < total_steps:
                history.append(_eval_and_record(model, eval_loader, accelerator, config, step, epoch, out_dir, prepared))
            if step >= total_steps:
                done = True
                break
        else:
            epoch += 1
            batches_done = 0
            if not config.save_every and not done:
                save(step, epoch, 0)
            if not config.eval_every and eval_loader is not None and not done:
                history.append(_eval_and_record(model, eval_loader, accelerator, config, step, epoch, out_dir, prepared))
    bar.close()

    save(step, epoch, batches_done)
    final_metrics: dict[str, Any] = {}
    if eval_loader is not None:
        final_metrics = _eval_and_record(model, eval_loader, accelerator, config, step, epoch, out_dir, prepared)
    accelerator.wait_for_everyone()
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    checksums: list[float] = []
    if sharded:
        # Parameters are sharded across ranks: gather the full state dict (a collective call),
        # load it into a fresh unsharded copy on the main process and export that.
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            export = _build_model(_without_init(config), data_probe)
            export.load_state_dict(state)
            export.save_pretrained(out_dir / "final")
    else:
        # Every process must end with the same weights: compare a checksum across ranks.
        checksum = torch.tensor([_param_checksum(accelerator.unwrap_model(model))], dtype=torch.float64,
                                device=accelerator.device)
        checksums = accelerator.gather(checksum).tolist()
        if len(set(checksums)) != 1:
            raise RuntimeError(f"processes ended with different weights (checksums {checksums})")
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(out_dir / "final")
    if accelerator.is_main_process:
        write_json_atomic(out_dir / "final" / "run.json", {
            **meta, "metrics": final_metrics, "step": step, "num_processes": accelerator.num_processes,
            "param_checksums": checksums,
        })
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_metrics


def _without_init(config: TrainConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, init_from=None)


def _param_checksum(model) -> float:
    """A float64 fingerprint of all parameters (sum of each tensor weighted by its index)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        total += (i + 1) * p.detach().double().sum().item()
    return total


def _eval_and_record(model, loader, accelerator, config: TrainConfig, step: int, epoch: int, out_dir: Path,
                     prepared: PreparedData) -> dict[str, Any]:
    metrics = evaluate(model, loader, accelerator, config.task, _references(prepared))
    record = {"step": step, "epoch": epoch, **metrics}
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        path = out_dir / "metrics.json"
        history = json.loads(path.read_text())["history"] if path.is_file() else []
        history.append(record)
        write_json_atomic(path, {"latest": record, "history": history,
                                 "git_commit": run_metadata({})["git_commit"]})
        accelerator.print(f"eval step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return record


def evaluate_checkpoint(checkpoint: str | Path, config: TrainConfig) -> dict[str, Any]:
    """``fusionzoo eval``: load a saved model and score it on ``config.split``."""
    from fusionzoo.model import load_model

    accelerator = make_accelerator(config, with_trackers=False)
    path = Path(checkpoint)
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    model = load_model(path)
    config.task = model.task
    with accelerator.main_process_first():
        prepared = prepare_data(config, model, train=False)
    if prepared.eval is None:
        raise ValueError(f"dataset {config.data!r} has no split {config.split!r}")
    loader = DataLoader(prepared.eval, batch_size=config.effective_eval_batch_size, shuffle=False,
                        collate_fn=prepared.eval_collate, num_workers=config.num_workers)
    model, loader = accelerator.prepare(model, loader)
    return evaluate(model, loader, accelerator, config.task, _references(prepared))


def _references(prepared: PreparedData) -> dict[int, list[str]] | None:
    if prepared.eval_split is None or not hasattr(prepared.data, "references"):
        return None
    return prepared.data.references(prepared.eval_split)
