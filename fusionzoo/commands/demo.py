"""``fusionzoo demo RUN``: a local web page where a user uploads a photo and sees the model's answer and map."""

from __future__ import annotations

import argparse
import sys

DEMO_EPILOG = """\
The page (Gradio, an optional extra: pip install "fusionzoo[demo]") takes a photo and, where the
model's task takes a text, a question (VQA), a text (classification) or a caption (retrieval); a
captioning model takes the photo alone. It shows what `fusionzoo predict` gives, with its score,
beside the heat map `fusionzoo explain` draws (attention rollout or input x gradient, named).

There is no --share (Gradio's share links go through its servers): the page is served on --host
alone, by default to this machine only; to reach it from elsewhere use an SSH tunnel
(ssh -L 7860:localhost:7860 HOST) or --host 0.0.0.0 on a trusted network. Gradio's analytics are
off. Ctrl-C stops the server.

examples:
  fusionzoo demo runs/vqa-vilt
  fusionzoo demo runs/captions --port 8080 --num-beams 3
  fusionzoo demo owner/model-on-the-hub --method gradient
"""


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="serve a local web page: upload a photo, ask a question, see the answer and where the model looks",
        description="Serve a saved model as a local web page (Gradio): upload a photo, type a question (VQA) "
        "or a text (classification, retrieval) or ask for a caption, and see the answer with its score and "
        "the attention map of `fusionzoo explain`.",
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a saved model folder, a run's output_dir, or a Hub repo id (owner/name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None,
                   help="the port (default: 7860, or the next free one up to 7959)")
    p.add_argument("--method", choices=("auto", "attention", "gradient"), default="auto",
                   help="how the map is made; auto (default): attention rollout where the fusion has it, "
                   "else input x gradient")
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest caption (captioning; default 20)")
    p.add_argument("--num-beams", type=int, default=1, help="beams of the caption (captioning; default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ..demo import build_demo, require_gradio, serve

    require_gradio()  # a missing extra stops here, before the model is loaded
    import torch

    from ..model import load_model
    from .explain import _model_folder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(_model_folder(args.checkpoint), device=device)
    page = build_demo(model, method=args.method, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    url = serve(page, args.host, args.port)
    print(f"fusionzoo demo: serving {args.checkpoint} at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        page.block_thread()
    finally:
        page.close()
    return 0
