"""``fusionzoo cache``: list and clear the feature cache that ``fusionzoo bench``, ``train`` and ``pretrain`` write."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..features.manage import StoredEntry

CACHE_EPILOG = """\
The folder is --cache-dir, else $FUSIONZOO_CACHE, else $XDG_CACHE_HOME/fusionzoo/features
(~/.cache/fusionzoo/features), as for `fusionzoo bench`, `train` and `pretrain` (cache_dir=).
An entry is one folder of
encoder outputs, <name>-<key>/, with its meta.json; a folder left by an interrupted
extraction (.<name>-<key>.building-*) is listed as unfinished. Nothing else in the folder
is listed or ever deleted. An entry's age is the time since a run last wrote or read it.

examples:
  fusionzoo cache list                         entries, sizes, ages, what they hold, total
  fusionzoo cache clear --older-than 7d        remove entries unused for a week
  fusionzoo cache clear                        remove every entry
  fusionzoo cache list --cache-dir /tmp/cache
"""


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="list or clear the feature cache of `fusionzoo bench` and of frozen-encoder training",
        description="Inspect and clear the on-disk cache of frozen-encoder features that "
        "`fusionzoo bench`, `fusionzoo train` and `fusionzoo pretrain` keep so that later runs skip extraction.",
        epilog=CACHE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="cache_command", metavar="<list|clear>")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--cache-dir", type=Path,
                       help="the cache folder (default: $FUSIONZOO_CACHE or ~/.cache/fusionzoo/features)")
    listing = actions.add_parser(
        "list", parents=[where], help="list the entries: size, last use, encoder and inputs, total",
        description="List the cache's entries, least recently used first: size, time since a run "
        "last used it, the encoder and the inputs it holds; then the total.")
    listing.set_defaults(func=_run_cache_list)
    clear = actions.add_parser(
        "clear", parents=[where], help="remove every entry, or those unused for a while (--older-than)",
        description="Remove cache entries (all of them, or with --older-than those that no run has "
        "used for that long) without asking, and print what was freed. Files and folders that are "
        "not cache entries are left alone.")
    clear.add_argument("--older-than", metavar="AGE",
                       help="only entries unused for longer than AGE: a number and a unit, s, m, h, d or w "
                       "(30m, 12h, 7d)")
    clear.set_defaults(func=_run_cache_clear)
    p.set_defaults(func=lambda args: _no_action(p))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _root(args: argparse.Namespace) -> tuple[Path, str]:
    from ..features.layout import default_cache_dir

    if args.cache_dir:
        return Path(args.cache_dir), "--cache-dir"
    return default_cache_dir(), "$FUSIONZOO_CACHE" if os.environ.get("FUSIONZOO_CACHE") else "default"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, scale, limit in (("s", 1, 90), ("m", 60, 90 * 60), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{seconds / scale:.0f}{unit}"
    return f"{seconds / 86400:.0f}d"


def _encoder(spec: Any) -> str:
    if isinstance(spec, dict):
        name = str(spec.get("preset") or spec.get("name") or spec)
        return name + (" (causal)" if spec.get("causal") else "")
    return str(spec)


def describe(entry: StoredEntry) -> str:
    """One line on what an entry holds: encoder, how many inputs, preprocessing, where the inputs were."""
    if not entry.complete:
        return "unfinished extraction (interrupted, or running now)"
    what = entry.meta.get("describe", {})
    if not isinstance(what, dict):
        return str(what)
    parts = [_encoder(what.get("encoder"))]
    if "images" in what:
        size = (what.get("data_config") or {}).get("input_size", [None])[-1]
        parts.append(f"{what['images']:,} images" + (f" at {size} px" if size else ""))
        first = [str(p) for p in what.get("first") or []]
        if first:
            parts.append(f"e.g. in {os.path.commonpath(first) if len(first) > 1 else os.path.dirname(first[0])}")
    elif "texts" in what:
        length = (what.get("preprocessing") or {}).get("max_length")
        parts.append(f"{what['texts']:,} texts" + (f" of up to {length} tokens" if length else ""))
        first = what.get("first") or []
        if first:
            parts.append(f"e.g. {str(first[0])[:40]!r}")
    if entry.meta.get("format") is not None:
        from ..features.layout import CACHE_FORMAT

        if entry.meta["format"] != CACHE_FORMAT:
            parts.append("older layout, never read")
    return ", ".join(parts)


def _run_cache_list(args: argparse.Namespace) -> int:
    from ..features.manage import stored_entries

    root, source = _root(args)
    entries = stored_entries(root)  # a CacheError is printed as one line by the command line
    print(f"feature cache {root} ({source})")
    if not entries:
        print("no entries")
        return 0
    now = time.time()
    rows = [(e.path.name, _size(e.size), f"{_age(now - e.last_used)} ago", describe(e)) for e in entries]
    widths = [max(len(r[i]) for r in [("entry", "size", "last used", ""), *rows]) for i in range(3)]
    print(f"{'entry':<{widths[0]}}  {'size':>{widths[1]}}  {'last used':>{widths[2]}}  what (encoder, inputs)")
    for name, size, age, what in rows:
        print(f"{name:<{widths[0]}}  {size:>{widths[1]}}  {age:>{widths[2]}}  {what}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {_size(total)} in all "
          "(last used: when a run last wrote or read the entry)")
    return 0


def _run_cache_clear(args: argparse.Namespace) -> int:
    from ..features.manage import entries_to_remove, parse_age, remove_entries, stored_entries

    root, _ = _root(args)
    older_than = parse_age(args.older_than) if args.older_than is not None else None
    entries = stored_entries(root)
    now = time.time()
    doomed = entries_to_remove(entries, older_than, now)
    freed = remove_entries(doomed)
    for entry in doomed:
        print(f"removed {entry.path.name} ({_size(entry.size)}, used {_age(now - entry.last_used)} ago)")
    kept = [e for e in entries if e not in doomed]
    scope = f" unused for more than {args.older_than}" if older_than is not None else ""
    print(f"freed {_size(freed)} in {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'}{scope} from {root}; "
          f"{len(kept)} kept ({_size(sum(e.size for e in kept))})")
    return 0
