"""The ``fusionzoo`` command line.

Each subcommand lives in one ``_add_<name>`` function that builds its parser and
points it at a ``_run_<name>`` function. Heavy imports (torch, transformers) happen
inside the run functions, so ``fusionzoo --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

DESCRIPTION = """\
fusionzoo: interchangeable vision-language fusion modules (early concatenation,
late voting, attention-weighted, co-attention, ViLT-style merged Transformer,
ALBEF align-then-fuse) on timm image encoders and transformers text encoders,
with VQA, captioning and classification heads.

Run `fusionzoo <command> --help` for the options of a command.
"""

EPILOG = """\
examples:
  fusionzoo list                         fusions, heads, tasks and encoder presets
  fusionzoo list 'co_*' --json           the same as JSON, filtered by a wildcard
  fusionzoo --import my_fusion.py list   register fusions from your own file first

user code: --import (repeatable) takes a module name or a .py file; the
FUSIONZOO_PLUGINS environment variable takes the same, separated by ':'; installed
packages register through the entry-point group 'fusionzoo.fusions'.
"""


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


# -- list ------------------------------------------------------------------------------


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="list registered fusions, heads, tasks and encoder presets",
        description="List what the zoo can build: registered fusion modules, task heads, "
        "tasks and encoder presets (including those registered by --import and by "
        "installed plug-in packages).",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard on names (default: '*')")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_run_list)


def _run_list(args: argparse.Namespace) -> int:
    import fusionzoo

    pattern = args.pattern
    fusions = {n: _first_line(fusionzoo.FUSIONS.get(n)) for n in fusionzoo.list_fusions(pattern)}
    heads = {n: _first_line(fusionzoo.HEADS.get(n)) for n in fusionzoo.list_heads(pattern)}
    tasks = {n: getattr(fusionzoo.TASKS.get(n), "description", "") for n in fusionzoo.list_tasks(pattern)}
    encoders = fusionzoo.list_encoders(pattern)
    vision = {n: _first_line(fusionzoo.VISION_ENCODERS.get(n)) for n in encoders["vision"]}
    text = {n: _first_line(fusionzoo.TEXT_ENCODERS.get(n)) for n in encoders["text"]}
    if args.json:
        print(json.dumps({"fusions": fusions, "heads": heads, "tasks": tasks,
                          "vision_encoders": vision, "text_encoders": text}, indent=2))
        return 0
    for title, entries in (
        ("fusions", fusions),
        ("tasks", tasks),
        ("heads", heads),
        ("vision encoder presets (or any timm model name)", vision),
        ("text encoder presets (or any transformers hub id or local folder)", text),
    ):
        print(f"{title}:")
        if not entries:
            print("  (none matching)")
        width = max((len(n) for n in entries), default=0)
        for name, doc in entries.items():
            print(f"  {name:<{width}}  {doc}".rstrip())
        print()
    return 0


# -- entry point -----------------------------------------------------------------------

from .commands.train import _add_eval, _add_predict, _add_pretrain, _add_train  # noqa: E402
from .commands.score import _add_score  # noqa: E402
from .commands.bench import _add_bench  # noqa: E402
from .commands.cache import _add_cache  # noqa: E402
from .commands.retrieve import _add_retrieve  # noqa: E402
from .commands.data import _add_data  # noqa: E402
from .commands.explain import _add_explain, _add_push  # noqa: E402
from .commands.quantize import _add_quantize  # noqa: E402
from .commands.demo import _add_demo  # noqa: E402

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_list, _add_train, _add_eval, _add_predict, _add_pretrain, _add_score, _add_bench, _add_cache,
    _add_retrieve, _add_data, _add_explain, _add_push, _add_quantize, _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionzoo",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"fusionzoo {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: FUSIONZOO_DEBUG=1)")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module or .py file that registers fusions/heads/tasks before running (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("FUSIONZOO_DEBUG", "").lower() in ("1", "true", "yes")
    from .errors import FusionZooError
    from .plugins import import_plugins

    try:
        import_plugins(args.imports)
    except FusionZooError as exc:  # PluginError, PluginNotFoundError: one line naming the plug-in
        if debug:
            raise
        print(f"fusionzoo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        return int(args.func(args) or 0)
    except FusionZooError as exc:
        if debug:
            raise
        print(f"fusionzoo {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"fusionzoo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
