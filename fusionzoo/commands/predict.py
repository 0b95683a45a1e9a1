"""``fusionzoo predict RUN --images DIR_OR_GLOB --out FILE``: a saved model over many images, to JSON Lines.

The inputs are every image of a folder (searched recursively for the suffixes of
:data:`IMAGE_SUFFIXES`) or of a glob, in sorted order, each with every text given: ``--question``
or the lines of ``--questions FILE`` (VQA), ``--texts FILE`` (classification), none (captioning).
They run in batches; each batch's lines are appended to ``--out`` and flushed, one line an input::

    {"path": "photos/a.jpg", "question": "is it red?", "answer": "yes", "score": 0.93}

(``label`` / ``caption`` for the other tasks, ``text`` for a classification text; ``score`` as
:class:`fusionzoo.tasks.Prediction` says). A second run with the same ``--out`` skips the inputs
already there, so an interrupted run resumes; a last line cut off mid-write is dropped and
predicted again. An image that cannot be read is reported on stderr by name and skipped; the
others are still written.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import FusionZooError

#: The files a folder given to ``--images`` is searched for (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class PredictInputError(FusionZooError, ValueError):
    """An input of ``fusionzoo predict`` is missing or malformed (names the option, file and line)."""


@dataclass(frozen=True)
class Input:
    """One line of the output: an image, and the text asked of it (None for captioning)."""

    path: str
    text: str | None


def list_images(spec: str) -> list[str]:
    """The image files of folder ``spec`` (recursively, by suffix) or of glob ``spec``, sorted."""
    folder = Path(spec)
    if folder.is_dir():
        found = [str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        what = f"folder {spec} holds no image files ({', '.join(IMAGE_SUFFIXES)}, searched recursively)"
    else:
        found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        what = f"{spec} is neither a folder nor a glob that matches files"
    if not found:
        raise PredictInputError(f"--images: {what}")
    return sorted(found)


def read_lines(path: str, option: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise PredictInputError(f"{option} {path}: file not found; expected a text file, one a line") from None
    except UnicodeDecodeError as exc:
        raise PredictInputError(f"{option} {path}: not UTF-8 text ({exc.reason}); expected one a line") from None
    lines = [line for line in lines if line]
    if not lines:
        raise PredictInputError(f"{option} {path}: no lines with text; expected one a line")
    return lines


def plan_inputs(images: Sequence[str], texts: Sequence[str] | None) -> list[Input]:
    """Every image with every text (or alone, when there are no texts)."""
    return [Input(path, text) for path in images for text in (texts if texts is not None else [None])]


def done_inputs(out: Path, text_name: str) -> set[Input]:
    """The inputs already written to ``out`` (an output of an earlier run); a last line cut off
    mid-write is removed from the file, so it is predicted again."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):  # a run stopped while writing its last line
        cut = data.rfind(b"\n") + 1
        with out.open("r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    done = set()
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PredictInputError(f"--out {out}, line {number}: not JSON ({exc.msg}); expected the lines of an "
                                    "earlier `fusionzoo predict` run to resume, or a new file") from None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise PredictInputError(f"--out {out}, line {number}: no 'path'; expected the lines of an earlier "
                                    "`fusionzoo predict` run to resume, or a new file")
        done.add(Input(record["path"], record.get(text_name)))
    return done


def open_images(paths: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``path -> RGB image`` of the readable ones, ``path -> why not`` of the others."""
    from PIL import Image, UnidentifiedImageError

    readable, bad = {}, {}
    for path in dict.fromkeys(paths):
        try:
            with Image.open(path) as image:
                readable[path] = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            bad[path] = " ".join(str(exc).split()) or type(exc).__name__
    return readable, bad


def predict_files(model: Any, task: Any, inputs: Sequence[Input], out: Path, *, batch_size: int,
                  progress: bool = True, **options: Any) -> dict[str, int]:
    """Predict ``inputs`` not yet in ``out`` and append a line for each; returns the counts
    ``written``, ``already_done`` and ``unreadable`` (inputs skipped for an unreadable image)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise PredictInputError(f"--batch-size must be >= 1, got {batch_size}")
    done = done_inputs(out, task.text_name)
    todo = [item for item in inputs if item not in done]
    counts = {"written": 0, "already_done": len(inputs) - len(todo), "unreadable": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    # The bar goes to stderr on a terminal and in a log file alike (as training's does), so a long run
    # under nohup or a batch scheduler still says how far it is.
    with out.open("a", encoding="utf-8") as handle, tqdm(total=len(todo), unit="input", desc="predict",
                                                         file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images, bad = open_images([item.path for item in batch])
            for path, reason in bad.items():
                print(f"fusionzoo predict: skipped unreadable image {path}: {reason}", file=sys.stderr, flush=True)
            ready = [item for item in batch if item.path in images]
            counts["unreadable"] += len(batch) - len(ready)
            if ready:
                texts = None if ready[0].text is None else [item.text for item in ready]
                predictions = task.predict_scored(model, [images[item.path] for item in ready], texts, **options)
                for item, prediction in zip(ready, predictions):
                    record: dict[str, Any] = {"path": item.path}
                    if item.text is not None:
                        record[task.text_name] = item.text
                    record[task.output_name] = prediction.text
                    record["score"] = prediction.score
                    handle.write(json.dumps(record) + "\n")
                handle.flush()
                counts["written"] += len(ready)
            bar.update(len(batch))
    return counts
