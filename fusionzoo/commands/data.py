"""``fusionzoo data check``: read a dataset end to end (or its first N samples) and say what is in it.

The source is named as for ``fusionzoo train`` (``data=``, ``data_dir=``, ``data_files=``,
``data_kwargs.*``) and loaded by the same code (``Task.load_data``), so what the check reads
is what training would read. Every image of the samples read is decoded. Printed per split:
samples, images and captions; image widths and heights and caption lengths in words
(min / median / max); entries left out (bad entries, images not on disk, images that do not
decode), each kind with its first 10 names and its count; then what each task would train
on. A source that cannot be read at all (a missing file, a line that breaks the schema, a
shard that is not a tar, too many bad samples) is an error naming the file and the entry
or member (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

DATA_EPILOG = """\
configuration: an optional YAML file, then key=value overrides, as for `fusionzoo train`:
  data            a dataset name: image-text-jsonl, webdataset, hf-datasets, coco-captions,
                  karpathy-captions, vqa-jsonl, classification-jsonl, ...
  data_dir        the dataset's folder (hf-datasets: also a hub dataset name)
  data_files      files instead of the folder's: a path, glob, brace list (shards/{0000..0003}.tar),
                  a list, {split: files}; webdataset sources mix as 'a/{0..3}.tar::0.7,b/{0..1}.tar::0.3'
  data_kwargs.*   loader options (data_kwargs.streaming=true, data_kwargs.caption_column=text, ...)
  limit           read at most this many samples of each split (default: all)
  splits          the splits to read, comma-separated (default: all)
  task            load the data as this task does (default: as it is)
  skip_bad        true: leave out entries that break the schema instead of stopping at the first
Images that are not on disk are listed, not an error (the data is loaded with only_present=true).

examples:
  fusionzoo data check data=image-text-jsonl data_dir=data/cc-mini
  fusionzoo data check data=webdataset data_files='shards/{0000..0003}.tar' limit=2000
  fusionzoo data check data=hf-datasets data_dir=data/flickr-parquet data_kwargs.streaming=true
"""

SHOW = 10  # names listed of each kind of problem


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="check a dataset: read it end to end and report counts, sizes and problems",
        description="Work with datasets. `fusionzoo data check` reads a source end to end (or its "
        "first N samples) with a progress bar and prints what it holds and what is wrong with it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="data_command", metavar="<check>")
    check = actions.add_parser(
        "check", help="read a source and print counts, image sizes, caption lengths and problems",
        description="Read every sample of a dataset (or the first `limit` of each split), decode its "
        "images, and print per split: samples, images, captions, image sizes, caption lengths, the "
        "entries left out with their names, and what each task would train on.",
        epilog=DATA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("config", nargs="?", help="YAML config file (optional) or the first key=value")
    check.add_argument("overrides", nargs="*", help="key=value: data, data_dir, data_files, limit, ...")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    check.set_defaults(func=_run_check)
    p.set_defaults(func=lambda args: _no_action(p))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# -- what was read -----------------------------------------------------------------------


@dataclass
class SplitReport:
    """What the check read of one split."""

    split: str
    samples: int = 0
    images: int = 0
    captions: int = 0
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    limited: bool = False
    problems: dict[str, dict[str, Any]] = field(default_factory=dict)

    def problem(self, kind: str, count: int, names: list[str]) -> None:
        entry = self.problems.setdefault(kind, {"count": 0, "first": []})
        entry["count"] += count
        entry["first"] = (entry["first"] + list(names))[:SHOW]

    def add(self, image: Any, texts: list[str]) -> None:
        self.widths.append(image.size[0])
        self.heights.append(image.size[1])
        self.captions += len(texts)
        self.words.extend(len(text.split()) for text in texts)

    def to_dict(self) -> dict[str, Any]:
        def spread(values: list[int]) -> dict[str, float] | None:
            return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None

        return {"split": self.split, "samples": self.samples, "images": self.images, "captions": self.captions,
                "limited": self.limited, "image_width": spread(self.widths), "image_height": spread(self.heights),
                "caption_words": spread(self.words), "problems": self.problems}


def _texts(row: dict[str, Any]) -> list[str]:
    """The texts of a row of any task: captions, a caption, a classification text or a question."""
    if "captions" in row:
        return list(row["captions"])
    for key in ("caption", "text", "question"):
        if key in row:
            return [row[key]]
    return []


def _check_rows(data: Any, split: str, limit: int | None, bar: Any) -> SplitReport:
    """Read the rows of a map-style split and decode each distinct image once."""
    from fusionzoo.data.checks import DataError
    from fusionzoo.data.common import open_image

    report = SplitReport(split)
    loaded = data.reports.get(split)
    if loaded is not None:
        if loaded.bad_entries:
            report.problem("bad entries (skip_bad)", loaded.bad_entries, loaded.bad_examples)
        if loaded.missing_images:
            report.problem("images not on disk", loaded.missing_images, loaded.missing_files)
    rows = data[split].with_format(None)
    opener = data.images or open_image
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            report.limited = True
            break
        report.samples += 1
        bar.update(1)
        texts = _texts(row)
        path = row.get("image_path")
        if path is None or path in seen:
            report.captions += len(texts)
            report.words.extend(len(t.split()) for t in texts)
            continue
        seen.add(path)
        try:
            image = opener(path, entry=f"{data.id_key}={row.get(data.id_key)}")
        except DataError as error:
            report.problem("images that do not decode", 1, [str(error)])
            report.captions += len(texts)
            continue
        report.images += 1
        report.add(image, texts)
    return report


def _check_stream(data: Any, split: str, limit: int | None, bar: Any) -> SplitReport:
    """Read a streamed split in order (one pass, no shuffling), decoding every image."""
    import warnings

    report = SplitReport(split)
    stream = data[split].with_options(shuffle=False, repeat=False, pairs=False).with_transform(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report names the skipped samples
        for item in stream:
            if limit is not None and report.samples >= limit:
                report.limited = True
                break
            report.samples += 1
            report.images += 1
            bar.update(1)
            report.add(item["image"], item["captions"])
    stats = stream.stats
    if stats.bad_members:
        report.problem("samples without an image or a caption", stats.bad_members, stats.member_examples)
    if stats.bad_images:
        report.problem("images that do not decode", stats.bad_images, stats.image_examples)
    report.samples += stats.bad
    return report


def _would_train(data: Any, reports: dict[str, SplitReport], train_split: str) -> list[str]:
    """One line per task (and pretraining) that reads this kind of data: what it would train on."""
    from fusionzoo.registry import TASKS
    from fusionzoo.tasks import get_task

    if train_split not in data:
        return [f"no split {train_split!r}: training reads train_split={train_split} (pass train_split=...)"]
    streamed = getattr(data, "iterable", False)
    lines = []
    read = reports.get(train_split)
    if hasattr(data, "pairs"):
        pairs = read.captions if streamed and read is not None else len(data.pairs(train_split))
        more = "at least " if streamed and read is not None and read.limited else ""
        lines.append(f"fusionzoo pretrain: {more}{pairs:,} image-caption pairs of split {train_split!r}"
                     + (" (streamed: training needs max_steps)" if streamed else ""))
    for name in TASKS.list():
        task = get_task(name)
        if not task.data_needs or any(not hasattr(data, need) for need in task.data_needs):
            continue
        if streamed:
            rows = f"{'at least ' if read is not None and read.limited else ''}{read.captions if read else 0:,}"
            lines.append(f"task={name}: {rows} rows of split {train_split!r} (streamed: needs max_steps)")
        else:
            lines.append(f"task={name}: {len(task.train_rows(data, train_split)):,} rows of split {train_split!r}")
    if hasattr(data, "pairs") and not streamed:
        lines.append(f"task=classification data=caption-match data_kwargs.source={data.name}: "
                     f"{2 * len(data.pairs(train_split)):,} rows (each caption matched and mismatched)")
    return lines


# -- the command -------------------------------------------------------------------------


def _pop_own_keys(overrides: list[str]) -> tuple[list[str], int | None, list[str] | None, bool]:
    """``limit=`` and ``splits=`` (this command's own keys) out of the overrides; and whether ``task=`` was given."""
    from ..training.config import ConfigError

    rest, limit, splits, task_given = [], None, None, False
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "limit":
            try:
                limit = int(value)
            except ValueError:
                raise ConfigError(f"command line: key 'limit' expects an integer, got {value!r}") from None
            if limit < 1:
                raise ConfigError(f"command line: key 'limit' must be >= 1, got {limit}")
        elif key.strip() == "splits":
            splits = [s.strip() for s in value.strip("[]").split(",") if s.strip()]
        else:
            task_given = task_given or key.strip() == "task"
            rest.append(item)
    return rest, limit, splits, task_given


def _render(result: dict[str, Any]) -> str:
    lines = [f"data={result['data']}: {result['kind']}, splits {', '.join(result['splits'])}"]
    for split in result["reports"]:
        limited = " (limit reached)" if split["limited"] else ""
        lines.append(f"split {split['split']}{limited}:")
        lines.append(f"  samples        {split['samples']:,}")
        lines.append(f"  images         {split['images']:,}")
        lines.append(f"  captions       {split['captions']:,}")
        for key, label in (("image_width", "image width"), ("image_height", "image height"),
                           ("caption_words", "caption words")):
            s = split[key]
            if s is not None:
                lines.append(f"  {label:<14} min {s['min']:g}, median {s['median']:g}, max {s['max']:g}")
        if not split["problems"]:
            lines.append("  problems       none")
        for kind, problem in split["problems"].items():
            lines.append(f"  {kind}: {problem['count']:,}")
            for name in problem["first"]:
                lines.append(f"    {name}")
            if problem["count"] > len(problem["first"]):
                lines.append(f"    ... and {problem['count'] - len(problem['first']):,} more")
    lines.append("would train on:")
    lines.extend(f"  {line}" for line in result["would_train"])
    return "\n".join(lines)


def _run_check(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm.auto import tqdm

    from ..tasks import get_task
    from ..tasks.base import Task
    from ..data.common import select_splits
    from ..training.config import ConfigError, load_config

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)
        config_path = None
    try:
        overrides, limit, splits, task_given = _pop_own_keys(overrides)
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"fusionzoo data check: error: {exc}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, only_present=True)
    task = get_task(config.task) if task_given else Task()
    data = task.load_data(config)
    wanted = select_splits(data.split_names, splits, source=config.data)
    streamed = getattr(data, "iterable", False)
    reports: dict[str, SplitReport] = {}
    for split in wanted:
        total = None if streamed else min(len(data[split]), limit or len(data[split]))
        with tqdm(total=total, desc=f"check {split}", unit="sample", file=sys.stderr, dynamic_ncols=True,
                  leave=False) as bar:
            check = _check_stream if streamed else _check_rows
            reports[split] = check(data, split, limit, bar)
    result = {
        "data": config.data,
        "kind": "streamed (iterable)" if streamed else "map-style",
        "splits": wanted,
        "reports": [report.to_dict() for report in reports.values()],
        "would_train": _would_train(data, reports, config.train_split),
    }
    print(json.dumps(result) if args.json else _render(result))
    return 0
