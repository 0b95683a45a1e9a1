"""``fusionzoo train``, ``fusionzoo eval``, ``fusionzoo predict`` and ``fusionzoo pretrain``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

CONFIG_HELP = """\
configuration: an optional YAML file, then key=value overrides applied in order
(nested: fusion_kwargs.num_layers=4). Main keys:
  task            vqa | captioning | classification | retrieval | a task registered with --import
  fusion          a registered fusion (fusionzoo list)
  data            a dataset name (easy-vqa, vqa-jsonl, vqa-v2, coco-captions,
                  karpathy-captions, classification-jsonl, caption-match, image-text-jsonl,
                  webdataset, hf-datasets) or a path
  data_dir        the dataset's root folder, where it needs one
  data_files      its files instead: a path, glob, brace list (shards/{0000..0003}.tar), a list,
                  {split: files}; webdataset sources mix by weight: 'a/{0..3}.tar::0.7,b/x.tar::0.3'
  data_kwargs.*   loader options (data_kwargs.streaming=true, data_kwargs.caption_column=text)
                  `fusionzoo data check data=... ` reads a source and reports what is in it
  vision, text    encoder presets (efficientnet-lite0, minilm-l6, tiny) or timm / hub names
  output_dir      where checkpoints, metrics.json and the final model go
  max_steps | epochs, batch_size, lr, seed, mixed_precision (no | bf16 | fp16 | auto)
  compile         true | default | reduce-overhead | max-autotune: torch.compile the trained modules
                  (fusion, head; encoders only when trained); eager, with a warning, where it fails
  freeze_encoders, save_every (steps), keep_last, init_from
  feature_cache   with frozen encoders, image tokens (and text states) are extracted once into
                  the on-disk feature cache and read from it (unset: where the data allows it;
                  false: encode every step); cache_dir= its folder (default $FUSIONZOO_CACHE
                  or ~/.cache/fusionzoo/features, the bench's); `fusionzoo cache list` shows it
  resume          auto (latest checkpoint in output_dir, or a fresh start) | a checkpoint folder
  overwrite       true: replace another run found in output_dir (refused otherwise)
  skip_bad        true: leave out bad entries and undecodable images, with a warning
  verify_images   true: decode every image once when the data is loaded
task=retrieval (image-caption data) trains itc_weight x ITC + itm_weight x ITM (hard negatives
by ITC similarity); align_kwargs.embed_dim / text_summary shape the alignment of fusions that do
not align themselves; rerank_k (default 128 | all), rerank_itc_weight as for eval.
Ctrl-C or SIGTERM saves a checkpoint after the current step (exit 130); --debug shows tracebacks.
Every key: fusionzoo train --show-config.
"""


def _report(command: str, job: Callable[[Any], dict[str, Any]], config: Any) -> int:
    """Run ``job(config)``; the main process prints its result as one JSON line.

    Errors a user can cause (:class:`~fusionzoo.errors.FusionZooError`) reach ``fusionzoo.cli.main``,
    which prints them as one line and exits with their code: 1 when training stopped on a
    non-finite loss, 130 when it was interrupted (a checkpoint was saved either way), 2 for a
    configuration, name or data problem.
    """
    from accelerate import PartialState

    result = job(config)
    if PartialState().is_main_process:
        print(json.dumps(result), flush=True)
    return 0


EVAL_HELP = """\
configuration: the run's own config (its run.json), then key=value overrides (no YAML
file). Useful keys:
  split           the split to score (default test)
  data, data_dir  another dataset of the same task
  eval_batch_size, max_eval_samples, num_workers, skip_bad, cpu
  feature_cache, cache_dir   image tokens of a frozen-encoder model from the feature cache
retrieval models: rerank_k (ITC candidates per query the ITM head reranks, default 128; all =
every pair), rerank_batch_size, rerank_itc_weight (0: rank by ITM log-odds alone; 1: add the ITC
logit, as BLIP does), results=PATH.npz (the score matrices, for `fusionzoo score retrieval`).
The last line printed is one JSON object with the scores (on N processes, printed once).
"""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a fusion model on a task (Accelerate; resumable)",
        description="Train a model for a task with a chosen fusion. Runs on one process, or on "
        "several under `accelerate launch` / `torchrun -m fusionzoo train ...`. Writes checkpoints "
        "(atomic, last K kept), metrics.json at each evaluation and the final model (save_pretrained) "
        "to output_dir/final.",
        epilog=CONFIG_HELP + "\nexample:\n  fusionzoo train task=vqa data=easy-vqa fusion=merged_transformer "
        "max_steps=300 batch_size=64 output_dir=runs/vqa",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional) or the first key=value override")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--show-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(func=_run_train)


def _split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def _run_train(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError, load_config

    path, overrides = _split_config_args(args)
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        print(f"fusionzoo train: error: {exc}", file=sys.stderr)
        return 2
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from ..training.trainer import train

    return _report("train", train, config)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a saved model on a dataset split",
        description="Evaluate a model saved by `fusionzoo train` (its output_dir or output_dir/final) "
        "on a dataset split; prints the scores as one JSON line at the end.",
        epilog=EVAL_HELP + "\nexample:\n  fusionzoo eval runs/vqa data=easy-vqa split=test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder (with config.json) or a run's output_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides (data, data_dir, split, batch_size, ...)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..training.config import ConfigError, from_dict, load_config

    base = None
    run_json = Path(args.checkpoint) / "run.json"
    if not run_json.is_file():
        run_json = Path(args.checkpoint).parent / "run.json"
    try:
        if run_json.is_file():
            base = from_dict(json.loads(run_json.read_text())["config"], str(run_json))
            base.max_eval_samples = None
        config = load_config(None, args.overrides, base=base)
    except ConfigError as exc:
        print(f"fusionzoo eval: error: {exc}", file=sys.stderr)
        return 2
    from ..training.trainer import evaluate_checkpoint

    return _report("eval", lambda c: evaluate_checkpoint(args.checkpoint, c), config)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="answer a question, label an image-text pair, or caption an image",
        description="Run a saved model on one image: a VQA model answers --question, a classification "
        "model labels the image with --question as its text, a captioning model writes a caption.",
        epilog="examples:\n  fusionzoo predict runs/vqa/final --image photo.jpg --question 'what shape is it?'\n"
        "  fusionzoo predict runs/cap/final --image photo.jpg --num-beams 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder (with config.json) or a run's output_dir")
    p.add_argument("--image", required=True, help="path of the image")
    p.add_argument("--question", help="the question (VQA) or text (classification)")
    p.add_argument("--num-beams", type=int, default=3, help="beam size for captioning (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest caption in tokens (default 20)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from ..model import load_model

    path = Path(args.checkpoint)
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        print(f"fusionzoo predict: error: cannot read image {args.image}: {exc}", file=sys.stderr)
        return 2
    from ..tasks import get_task

    model = load_model(path)
    task = get_task(model.task)
    if task.needs_text and not args.question:
        print(f"fusionzoo predict: error: a {model.task} model needs --question", file=sys.stderr)
        return 2
    texts = [args.question] if task.needs_text else None
    print(task.predict(model, [image], texts, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)[0])
    return 0


PRETRAIN_HELP = """\
configuration: as for `fusionzoo train` (an optional YAML file, then key=value overrides);
pretraining starts from fusion=albef, data=karpathy-captions, output_dir=runs/pretrain.
Pretraining keys:
  data, data_dir      image-caption pairs: karpathy-captions, coco-captions, image-text-jsonl,
                      hf-datasets, or a caption folder; streamed: webdataset (data_files=
                      'shards/{0000..0331}.tar'), hf-datasets data_kwargs.streaming=true --
                      streamed sources train by max_steps and resume by re-reading the batches done
  fusion              any fusion: albef aligns its own streams; the others get an Alignment
                      (ITC projections + temperature, align_kwargs) next to the fusion (ViLT-style
                      ITM + MLM for merged_transformer)
  itc_weight, itm_weight, mlm_weight   loss weights (an ITM or MLM weight of 0 skips it)
  momentum_distill    momentum (EMA) encoders and ALBEF's distillation targets (true | false)
  momentum, queue_size, distill_alpha  EMA decay, ITC feature queue length, distillation weight
Every key: fusionzoo pretrain --show-config.
"""


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="ALBEF-style pretraining (ITC + ITM + MLM) on image-caption pairs",
        description="Pretrain the encoders, a fusion and ITM/MLM heads with ALBEF's objectives: image-text "
        "contrast (ITC, optionally with momentum distillation and a queue), image-text matching with hard "
        "negatives (ITM) and masked language modelling (MLM). Same checkpoints, resume and launchers as "
        "`fusionzoo train`. output_dir/final holds weights that `fusionzoo train ... init_from=OUTPUT_DIR` "
        "loads into a model of any task.",
        epilog=PRETRAIN_HELP + "\nexample:\n  fusionzoo pretrain configs/pretrain_albef_coco.yaml max_steps=500\n"
        "  fusionzoo train task=vqa fusion=albef data=vqa-jsonl data_dir=../shared/data/coco-vqa-mini "
        "init_from=runs/pretrain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional) or the first key=value override")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--show-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError, load_config
    from ..training.pretrain import pretrain_base_config

    path, overrides = _split_config_args(args)
    try:
        config = load_config(path, overrides, base=pretrain_base_config())
    except ConfigError as exc:
        print(f"fusionzoo pretrain: error: {exc}", file=sys.stderr)
        return 2
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from ..training.pretrain import pretrain

    return _report("pretrain", pretrain, config)
