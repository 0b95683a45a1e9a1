"""``fusionzoo explain`` (a heat map of where a model looks) and ``fusionzoo push`` (a model to the Hub)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

EXPLAIN_EPILOG = """\
how: attention rollout for fusions with attention over the image tokens (merged_transformer,
co_attention, albef), input x gradient on the image tokens for the others; the figure says which.
A captioning model gets a strip of small maps, one per generated word. Its caption is decoded with
the run's own settings (its run.json), then the decoding keys given right after RUN (num_beams,
max_new_tokens, min_new_tokens, length_penalty, no_repeat_ngram_size, repetition_penalty), as
`fusionzoo predict` decodes it, so the caption explained is the one predict writes.

examples:
  fusionzoo explain runs/vqa --image photo.jpg --question "what color is the shape?" --out map.png
  fusionzoo explain runs/cap --image photo.jpg --out words.png --method gradient
  fusionzoo explain runs/cap num_beams=3 no_repeat_ngram_size=3 --image photo.jpg --out words.png
  fusionzoo explain owner/model-on-the-hub --image photo.jpg --question "..." --out map.png
"""


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="write a PNG of where a saved model looks to answer (or to write each caption word)",
        description="Run a saved model on one image and write the image under a heat map of how much the answer "
        "(VQA, classification) or each generated caption word depends on each image region.",
        epilog=EXPLAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder, a run's output_dir, or a Hub repo id (owner/name)")
    p.add_argument("overrides", nargs="*", help="decoding key=value overrides (num_beams=3, ...), before the options")
    p.add_argument("--image", required=True, help="path of the image")
    p.add_argument("--question", help="the question (VQA) or text (classification); none for captioning")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--method", choices=("auto", "attention", "gradient"), default="auto",
                   help="auto (default): attention rollout where the fusion has it, else input x gradient")
    p.add_argument("--max-new-tokens", type=int, help="the same as max_new_tokens=N (default: the run's, else 20)")
    p.add_argument("--num-beams", type=int, help="the same as num_beams=N (default: the run's, else 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=_run_explain)


def _model_folder(reference: str) -> Path:
    """A saved model's folder for a folder, a run's output_dir (its final/) or a Hub repo id."""
    from ..hub import resolve_model_folder
    from ..training.trainer import resolve_model_dir

    return resolve_model_dir(resolve_model_folder(reference))


def _run_explain(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..explain_figure import draw_explanation
    from ..model import load_model
    from .train import _decoding

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(f"--image {args.image}: cannot read the image ({exc})") from exc
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = _model_folder(args.checkpoint)
    decoding = _decoding(str(folder), args, command="explain")
    model = load_model(folder, device=device)
    try:
        explanation = model.explain(image, args.question, method=args.method,
                                    **(decoding if model.head.causal else {}))
    except ValueError as exc:  # a question where none is taken, a method the fusion has not
        raise ConfigError(f"fusionzoo explain: {exc}") from exc
    draw_explanation(explanation, args.out)
    print(explanation.answer)
    print(f"fusionzoo explain: wrote {args.out} ({explanation.method})", file=sys.stderr)
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload a saved model (with its model card) to a Hugging Face Hub repo",
        description="Upload a saved model folder, or a run's final/, to the Hub repo REPO_ID (created if "
        "missing), after writing its model card (README.md) with the repo id in its loading example. "
        "The token comes from `hf auth login` or HF_TOKEN.",
        epilog="example:\n  fusionzoo push runs/vqa-vilt my-name/vqa-vilt-easy-vqa --private",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder or a run's output_dir")
    p.add_argument("repo_id", help="the Hub repo, owner/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default=None, help="the commit message")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from ..hub import upload_model_folder
    from ..model_card import write_model_card
    from ..model_folder import load_folder
    from ..model import FusionModel

    folder = _model_folder(args.checkpoint)
    load_folder(folder, FusionModel)  # refuse a folder that would not load before anything is uploaded
    write_model_card(folder, args.repo_id)
    url = upload_model_folder(folder, args.repo_id, private=args.private or None, commit_message=args.message)
    print(url)
    return 0
