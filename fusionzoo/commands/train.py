"""``fusionzoo train``, ``fusionzoo eval``, ``fusionzoo predict`` and ``fusionzoo pretrain``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

CONFIG_HELP = """\
configuration: an optional YAML file, then key=value overrides applied in order
(nested: fusion_kwargs.num_layers=4). Main keys:
  task            vqa | captioning | classification | retrieval | a task registered with --import;
                  several joined by '+' (vqa+captioning): one model, one head per task, one dataset
                  per task (data=vqa-jsonl+karpathy-captions; task_data.<task>={data_dir: ...} for
                  a task's own data keys); task_weights=proportional | vqa:1,captioning:3 says which
                  task each batch comes from; final/<task>/ is each task's model
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
  modality_dropout  P in [0, 1): per training sample, the chance of removing its image (zeroed
                  tokens) or its question (the empty question), half the time each (VQA, classification)
  freeze_encoders true | false | vision | text (keep only that encoder fixed, fine-tune the other)
  save_every (steps), keep_last, init_from (a folder, a run, a LoRA folder or a Hub repo id)
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
  results=PATH    the predictions in the official format: VQA [{"question_id", "answer"}] JSON
                  (EvalAI's test-dev / test-std file; `fusionzoo score vqa --results`), captions
                  [{"image_id", "caption"}] JSON (`fusionzoo score captions --results`),
                  classification {"id", "label", "probabilities"} JSON Lines, retrieval PATH.npz
                  (the score matrices, for `fusionzoo score retrieval`)
  references=PATH the scored split's gold answers / captions in the schema `fusionzoo score`
                  reads (VQA: give the one file as --questions and --annotations; captions:
                  --annotations), for data without official files (easy-VQA, JSONL, Karpathy)
  quantize=int8   score the INT8 model (`fusionzoo quantize`) beside the float one; the same
                  happens for an INT8 folder (its float model: config.json quantization.source).
                  Both run on the CPU with the same keys; the JSON has the INT8 scores, "float"
                  and "int8_minus_float" (results= files are the INT8 model's)
A multi-task run (task=vqa+captioning) scores every task on its own data (keys <task>/<metric>);
RUN/final/<task> scores that task alone.
A split without answers (VQA test-dev, an unlabeled classification file) is predicted and written,
not scored. VQA scores add per_answer_type and per_question_type (the official report's).
captioning: num_beams, max_new_tokens, min_new_tokens, length_penalty, no_repeat_ngram_size,
repetition_penalty (transformers' meanings; default: the run's own).
retrieval models: rerank_k (ITC candidates per query the ITM head reranks, default 128; all =
every pair), rerank_batch_size, rerank_itc_weight (0: rank by ITM log-odds alone; 1: add the ITC
logit, as BLIP does).
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
        epilog=EVAL_HELP + "\nexamples:\n  fusionzoo eval runs/vqa data=easy-vqa split=test\n"
        "  fusionzoo eval runs/vqa2 split=test-dev results=vqa_test-dev_results.json\n"
        "  fusionzoo eval runs/cap split=test num_beams=3 results=captions.json references=refs.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder (with config.json) or a run's output_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides (data, data_dir, split, batch_size, ...)")
    p.set_defaults(func=_run_eval)


def _run_config(checkpoint: str) -> Any:
    """The TrainConfig of the run that saved ``checkpoint`` (its run.json, or its parent's), or None."""
    from ..training.config import from_dict

    from .quantize import float_source

    run_json = Path(checkpoint) / "run.json"
    if not run_json.is_file():
        run_json = Path(checkpoint).parent / "run.json"
    if not run_json.is_file() and float_source(checkpoint) is not None:  # an INT8 folder: its float run's
        run_json = float_source(checkpoint) / "run.json"
    if not run_json.is_file():
        return None
    from ..training.multitask import sub_config

    # a multi-task run's task folder (final/<task>) is evaluated with that task's data
    return sub_config(from_dict(json.loads(run_json.read_text())["config"], str(run_json)), checkpoint)


def _run_eval(args: argparse.Namespace) -> int:
    from ..training.config import load_config
    from .quantize import quantized_eval_job, take_quantize

    try:
        quantize, overrides = take_quantize(args.overrides)
        base = _run_config(args.checkpoint)
        if base is not None:
            base.max_eval_samples = None
        config = load_config(None, overrides, base=base)
    except ConfigError as exc:
        print(f"fusionzoo eval: error: {exc}", file=sys.stderr)
        return 2
    from ..training.trainer import evaluate_checkpoint

    from ..training.multitask import evaluate_multitask, multitask_folder

    if multitask_folder(args.checkpoint) is not None:  # every task of a multi-task run, each on its data
        if quantize:
            print("fusionzoo eval: error: key 'quantize': evaluate one task's folder of a multi-task run "
                  "(RUN/final/<task>) quantised", file=sys.stderr)
            return 2
        job = lambda c: evaluate_multitask(args.checkpoint, c)  # noqa: E731
    else:
        job = quantized_eval_job(args.checkpoint, quantize) or (lambda c: evaluate_checkpoint(args.checkpoint, c))
    code = _report("eval", job, config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        for key in ("results", "references"):
            if getattr(config, key):
                print(f"fusionzoo eval: wrote {key} to {getattr(config, key)}", file=sys.stderr)
    return code


PREDICT_HELP = """\
inputs:
  --image FILE                one image; the answer, label or caption is printed
  --images DIR_OR_GLOB        many: a folder (searched recursively for image files) or a glob
                              ('photos/**/*.jpg'), predicted in batches to --out FILE (JSON Lines,
                              one line per input: path, question / text, answer / label / caption, score)
  --question TEXT             the question (VQA) or text (classification) asked of every image
  --questions FILE, --texts FILE   one a line, each asked of every image (VQA, classification)
A second run with the same --out skips the inputs already written (an interrupted run resumes).
Unreadable images are reported by name and skipped. score: the answer's soft score (VQA), the
label's probability (classification), the caption's beam score (captioning).
decoding (captioning): key=value overrides, right after RUN, of the run's num_beams, max_new_tokens,
min_new_tokens, length_penalty, no_repeat_ngram_size, repetition_penalty (transformers' meanings).
quantize=int8 (also right after RUN): run the INT8 model of a float folder (quantised at load) on the
CPU; an INT8 folder (`fusionzoo quantize`) always runs as INT8, on the CPU.
"""


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="answer questions, label image-text pairs, or caption images (one image or a folder)",
        description="Run a saved model on one image (--image, printed) or on many (--images, written to --out "
        "as JSON Lines): a VQA model answers the question, a classification model labels the image with the "
        "text, a captioning model writes a caption.",
        epilog=PREDICT_HELP + "\nexamples:\n  fusionzoo predict runs/vqa/final --image photo.jpg --question 'what shape is it?'\n"
        "  fusionzoo predict runs/vqa --images photos/ --questions questions.txt --out answers.jsonl\n"
        "  fusionzoo predict runs/cap num_beams=3 no_repeat_ngram_size=3 --images 'photos/*.jpg' --out captions.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder (with config.json) or a run's output_dir")
    p.add_argument("overrides", nargs="*",
                   help="decoding key=value overrides (num_beams=3, ...) and quantize=int8, before the options")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", help="path of one image")
    where.add_argument("--images", metavar="DIR_OR_GLOB", help="a folder of images or a glob")
    asked = p.add_mutually_exclusive_group()
    asked.add_argument("--question", help="the question (VQA) or text (classification) of every image")
    asked.add_argument("--questions", metavar="FILE", help="questions, one a line, each asked of every image")
    asked.add_argument("--texts", metavar="FILE", help="texts, one a line, each paired with every image")
    p.add_argument("--out", metavar="FILE", help="the JSON Lines output of --images (appended to; resumable)")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (default 16)")
    p.add_argument("--device", help="where the model runs (default: cuda when available, else cpu)")
    p.add_argument("--num-beams", type=int, help="the same as num_beams=N")
    p.add_argument("--max-new-tokens", type=int, help="the same as max_new_tokens=N")
    p.set_defaults(func=_run_predict)


def _decoding(checkpoint: str, args: argparse.Namespace, command: str = "predict") -> dict[str, Any]:
    """The run's decoding options (its run.json, where there is one), then the command line's
    (``args.overrides``, ``--num-beams``, ``--max-new-tokens``) for ``fusionzoo <command>``."""
    from ..decoding import DecodingOptions
    from ..training.config import TrainConfig, apply, parse_overrides

    config = _run_config(checkpoint) or TrainConfig()
    updates = parse_overrides(args.overrides)
    unknown = [key for key in updates if key not in DecodingOptions.names()]
    if unknown:
        raise ConfigError(f"command line: fusionzoo {command} takes the decoding keys {', '.join(DecodingOptions.names())}; "
                          f"got {', '.join(repr(k) for k in unknown)}")
    flags = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    updates.update({key: value for key, value in flags.items() if value is not None})
    apply(config, updates, "command line")
    return DecodingOptions.from_config(config).kwargs()


def _run_predict(args: argparse.Namespace) -> int:
    import torch

    from ..model import load_model
    from ..tasks import get_task
    from ..training.trainer import resolve_model_dir
    from .predict import list_images, open_images, plan_inputs, predict_files, read_lines
    from .quantize import saved_quantization, take_quantize

    quantize, args.overrides = take_quantize(args.overrides)
    decoding = _decoding(args.checkpoint, args)
    if args.images is not None and not args.out:
        raise ConfigError("--images writes JSON Lines: give --out FILE")
    folder = resolve_model_dir(args.checkpoint)
    int8 = quantize is not None or saved_quantization(folder) is not None  # INT8 kernels are CPU kernels
    device = args.device or ("cuda" if torch.cuda.is_available() and not int8 else "cpu")
    model = load_model(folder, device=device, quantize=quantize)
    task = get_task(model.task)
    texts = [args.question] if args.question else None
    if args.questions or args.texts:
        texts = read_lines(args.questions or args.texts, "--questions" if args.questions else "--texts")
    if task.needs_text and texts is None:
        raise ConfigError(f"a {model.task} model needs --question, --questions FILE or --texts FILE")
    if not task.needs_text and texts is not None:
        raise ConfigError(f"a {model.task} model takes no text: leave out --question / --questions / --texts")
    if args.image is not None:
        images, bad = open_images([args.image])
        if bad:
            print(f"fusionzoo predict: error: cannot read image {args.image}: {bad[args.image]}", file=sys.stderr)
            return 2
        print(task.predict(model, [images[args.image]], texts, **decoding)[0])
        return 0
    out = Path(args.out)
    counts = predict_files(model, task, plan_inputs(list_images(args.images), texts), out,
                           batch_size=args.batch_size, **decoding)
    print(f"fusionzoo predict: wrote {counts['written']} lines to {out} ({counts['already_done']} inputs already "
          f"there, {counts['unreadable']} skipped for unreadable images)", file=sys.stderr)
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
