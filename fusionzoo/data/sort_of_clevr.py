"""Sort-of-CLEVR: a generated relational-reasoning VQA set, cached on disk by its parameters.

Follows the Sort-of-CLEVR dataset of Santoro et al., 2017, "A simple neural
network module for relational reasoning" (NeurIPS): each scene is an image of
objects of distinct colours (red, green, blue, orange, gray, yellow), each a
square or a circle, and the questions ask either about one object alone
(*non-relational*) or about an object's relation to the others (*relational*).
The set is generated here, offline and deterministically from a seed, and read
back through the ``vqa-jsonl`` loader, so it is ordinary VQA data::

    fusionzoo train task=vqa data=sort-of-clevr

Scenes (:func:`sample_scene`, :func:`render_scene`): ``num_objects`` objects
(default 6, at most the six colours, one object per colour, colours drawn at
random when fewer than six) on a white (or black) ``image_size`` x
``image_size`` image (default 128 px). Every object has the same side,
``object_px = round(object_scale * image_size)`` (default 0.125, so 16 px at
128 px; a square of that side, or the circle inscribed in it) and lies wholly
inside the image; the bounding squares of two objects are at least
``gap_px = max(1, round(object_px / 4))`` pixels apart, so objects never touch.
Positions are whole pixels; an object's centre is ``(x, y)`` in pixels from the
top-left corner, ``y`` growing downwards. Scenes whose answers would be ambiguous
are drawn again: an object centred exactly on the image's vertical or
horizontal centre line, or two other objects exactly as close to (or as far
from) an object.

Questions, one colour each, as English text for the text encoder; the
``question_type`` field is the template name and ``answer_type`` its group:

* ``shape`` (non-relational): "what is the shape of the red object?" -- square / circle;
* ``horizontal`` (non-relational): "is the red object on the left or on the right?" -- left / right;
* ``vertical`` (non-relational): "is the red object at the top or at the bottom?" -- top / bottom;
* ``closest_shape`` (relational): "what is the shape of the object closest to the red
  object?" -- square / circle;
* ``furthest_shape`` (relational): "what is the shape of the object furthest from the red
  object?" -- square / circle;
* ``count_same_shape`` (relational): "how many objects have the same shape as the red
  object?" -- 1 .. ``num_objects``.

Left/right compares the object's centre ``x`` with half the image width (top /
bottom: ``y`` with half the height); closest and furthest use the Euclidean
distance between centres; the count *includes the object asked about* (as in
Santoro et al., whose counting answers run from 1 to 6). Answers come from the
generator's own geometry (:func:`answer_question`, which reads a saved object
list). The answer vocabulary is fixed by the parameters
(:func:`answer_vocabulary`: the six words, then ``1`` .. ``num_objects``), not
counted from the training answers, so it is the same for every seed.

Balance: within a split, question ``k`` (counted over the split, scene by scene)
uses template ``k mod 6``, so the six templates' counts differ by at most one;
with ``questions_per_scene`` a multiple of six (the default, 12) every scene
asks every template equally often. A scene asks a template about distinct
colours, so its questions are all different (``questions_per_scene`` is at most
``6 * num_objects``).

Splits ``train`` / ``val`` / ``test`` (default 3,000 / 300 / 300 scenes, 36,000 /
3,600 / 3,600 questions; Santoro et al. used 9,800 training images with 20
questions each) hold different scenes: scene ``i`` of split ``s`` is drawn from
its own random stream, seeded by ``(seed, s, i)``. Image ids are unique over the
three splits (train first); question ``q`` of image ``i`` has id
``i * questions_per_scene + q``.

Cache (:func:`generate_sort_of_clevr`): a set lives in
``<cache_dir>/<key>/``, where ``cache_dir`` defaults to
``$FUSIONZOO_CACHE/sort-of-clevr`` or else ``~/.cache/fusionzoo/sort-of-clevr``
(next to the feature cache of :func:`fusionzoo.features.layout.default_cache_dir`;
``fusionzoo cache`` never lists or clears it), and ``key`` is 20 hex digits of a
hash of every generation parameter and :data:`GENERATOR_VERSION`. A complete set
is reused as it is; any other parameter gives another key. A set is written
into a temporary folder beside its place, the marker file
``sort-of-clevr.json`` last, and then renamed into place, so a crash never
leaves a set that looks complete. Layout::

    <key>/images/<split>/<image_id>.png      the scenes
    <key>/<split>.jsonl                      vqa-jsonl lines: question_id, image_id, image, question,
                                             answers, question_type, answer_type, color
    <key>/scenes_<split>.json                the object lists: color, shape, x, y, size per object
    <key>/sort-of-clevr.json                 parameters, key, counts (written last: the set is complete)

Every file is a function of the parameters alone (no times, no paths), so the
same parameters give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fusionzoo.errors import FusionZooError
from fusionzoo.io import write_json_atomic, write_text_atomic
from fusionzoo.registry import register_dataset

from .checks import PathLike
from .common import select_splits
from .vqa import VQAData, load_vqa_jsonl

#: Bump when the generated files change for the same parameters: every cached set then misses.
GENERATOR_VERSION = 1

#: Sort-of-CLEVR's six colours (RGB), in their canonical order; objects are listed in this order.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
SHAPES: tuple[str, ...] = ("square", "circle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Template name -> (answer type, question with ``{color}``), in the order questions cycle through them.
TEMPLATES: dict[str, tuple[str, str]] = {
    "shape": ("non-relational", "what is the shape of the {color} object?"),
    "horizontal": ("non-relational", "is the {color} object on the left or on the right?"),
    "vertical": ("non-relational", "is the {color} object at the top or at the bottom?"),
    "closest_shape": ("relational", "what is the shape of the object closest to the {color} object?"),
    "furthest_shape": ("relational", "what is the shape of the object furthest from the {color} object?"),
    "count_same_shape": ("relational", "how many objects have the same shape as the {color} object?"),
}
NON_RELATIONAL: tuple[str, ...] = tuple(t for t, (group, _) in TEMPLATES.items() if group == "non-relational")
RELATIONAL: tuple[str, ...] = tuple(t for t, (group, _) in TEMPLATES.items() if group == "relational")

#: Smallest object side in pixels at which a circle still differs visibly from a square.
MIN_OBJECT_PX = 6
#: Largest share of the image the objects' bounding squares (with their gaps) may cover; denser
#: scenes are refused up front, as random placement would jam.
MAX_FILL = 0.35
#: Positions tried for one object before the scene is started again, and scenes started before giving up.
PLACEMENT_TRIES = 200
SCENE_TRIES = 200
MARKER_NAME = "sort-of-clevr.json"


class SortOfClevrError(FusionZooError, ValueError):
    """A Sort-of-CLEVR parameter that cannot be used; the message names it (also in :attr:`parameter`)."""

    def __init__(self, parameter: str, message: str) -> None:
        self.parameter = parameter
        super().__init__(f"sort-of-clevr: {parameter}: {message}")


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SortOfClevrConfig:
    """Every parameter of a generated set (all of them go into its cache key).

    Attributes:
        num_objects: objects per scene, one per colour (2 .. 6).
        image_size: side of the square images in pixels.
        object_scale: object side as a fraction of ``image_size``.
        train_scenes, val_scenes, test_scenes: scenes per split (0 leaves a split out).
        questions_per_scene: questions asked about each scene (1 .. ``6 * num_objects``).
        seed: seed of every random draw (a non-negative integer).
        background: ``white`` or ``black``.
    """

    num_objects: int = 6
    image_size: int = 128
    object_scale: float = 0.125
    train_scenes: int = 3000
    val_scenes: int = 300
    test_scenes: int = 300
    questions_per_scene: int = 12
    seed: int = 0
    background: str = "white"

    def __post_init__(self) -> None:
        for name in ("num_objects", "image_size", "train_scenes", "val_scenes", "test_scenes",
                     "questions_per_scene", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SortOfClevrError(name, f"{value!r} is not an integer")
        if isinstance(self.object_scale, bool) or not isinstance(self.object_scale, (int, float)) \
                or not 0 < self.object_scale < 1:
            raise SortOfClevrError("object_scale", f"{self.object_scale!r}; expected a number between 0 and 1")
        object.__setattr__(self, "object_scale", float(self.object_scale))
        if not 2 <= self.num_objects <= len(COLORS):
            raise SortOfClevrError("num_objects", f"{self.num_objects}; expected 2 .. {len(COLORS)} (one object "
                                                  f"per colour: {', '.join(COLORS)}; relational questions need "
                                                  "another object)")
        if self.background not in BACKGROUNDS:
            raise SortOfClevrError("background", f"{self.background!r}; expected one of {', '.join(BACKGROUNDS)}")
        if self.seed < 0:
            raise SortOfClevrError("seed", f"{self.seed}; expected a non-negative integer")
        for split in SPLITS:
            if self.scenes(split) < 0:
                raise SortOfClevrError(f"{split}_scenes", f"{self.scenes(split)}; expected 0 or more")
        if not any(self.scenes(split) for split in SPLITS):
            raise SortOfClevrError("train_scenes", "every split has 0 scenes; expected at least one scene")
        most = len(TEMPLATES) * self.num_objects
        if not 1 <= self.questions_per_scene <= most:
            raise SortOfClevrError("questions_per_scene", f"{self.questions_per_scene}; expected 1 .. {most} "
                                   f"({len(TEMPLATES)} templates x {self.num_objects} colours, so that a scene "
                                   "never asks the same question twice)")
        if self.object_px < MIN_OBJECT_PX:
            need = math.ceil((MIN_OBJECT_PX - 0.5) / self.object_scale)
            raise SortOfClevrError("image_size", f"{self.image_size} px is too small: objects would be "
                                   f"{self.object_px} px (object_scale={self.object_scale}); expected objects of at "
                                   f"least {MIN_OBJECT_PX} px, i.e. image_size >= {need}")
        cell = self.object_px + self.gap_px
        if self.num_objects * cell * cell > MAX_FILL * self.image_size ** 2:
            raise SortOfClevrError("image_size", f"{self.image_size} px is too small for {self.num_objects} "
                                   f"objects of {self.object_px} px with {self.gap_px} px gaps: they would cover "
                                   f"{self.num_objects * cell * cell / self.image_size ** 2:.0%} of the image; "
                                   f"expected at most {MAX_FILL:.0%} (a larger image_size, a smaller object_scale "
                                   "or fewer num_objects)")

    @property
    def object_px(self) -> int:
        """Side of every object (square side, circle diameter) in pixels."""
        return round(self.object_scale * self.image_size)

    @property
    def gap_px(self) -> int:
        """Smallest gap in pixels between two objects' bounding squares."""
        return max(1, round(self.object_px / 4))

    def scenes(self, split: str) -> int:
        """Number of scenes of ``split``."""
        return getattr(self, f"{split}_scenes")

    @property
    def splits(self) -> list[str]:
        """The splits with at least one scene, in order."""
        return [split for split in SPLITS if self.scenes(split) > 0]

    def params(self) -> dict[str, Any]:
        """The parameters as a plain dictionary (field order)."""
        return asdict(self)

    def key(self) -> str:
        """20 hex digits of a hash of every parameter and :data:`GENERATOR_VERSION`."""
        text = json.dumps({"generator_version": GENERATOR_VERSION, **self.params()}, sort_keys=True)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=10).hexdigest()


def answer_vocabulary(num_objects: int = 6) -> list[str]:
    """The answers of a set: ``square, circle, left, right, top, bottom``, then ``1`` .. ``num_objects``."""
    return [*SHAPES, "left", "right", "top", "bottom", *(str(n) for n in range(1, num_objects + 1))]


def default_cache_dir() -> Path:
    """``$FUSIONZOO_CACHE/sort-of-clevr``, else ``$XDG_CACHE_HOME/fusionzoo/sort-of-clevr`` (``~/.cache/...``)."""
    from fusionzoo.features.layout import default_cache_dir as feature_cache_dir

    features = feature_cache_dir()
    if os.environ.get("FUSIONZOO_CACHE"):
        return features / "sort-of-clevr"
    return features.parent / "sort-of-clevr"


# --------------------------------------------------------------------------------------
# Scenes, pictures and answers
# --------------------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator, config: SortOfClevrConfig) -> list[dict[str, Any]]:
    """One scene's objects, ``{"color", "shape", "x", "y", "size"}`` each, in colour order (see the module doc)."""
    side, gap, width = config.object_px, config.gap_px, config.image_size
    names = list(COLORS)
    for _ in range(SCENE_TRIES):
        picked = sorted(rng.choice(len(names), size=config.num_objects, replace=False).tolist())
        corners: list[tuple[int, int]] = []
        for _ in range(config.num_objects):
            for _ in range(PLACEMENT_TRIES):
                x0, y0 = (int(v) for v in rng.integers(0, width - side + 1, size=2))
                if 2 * x0 + side == width or 2 * y0 + side == width:  # on a centre line: left or right?
                    continue
                if all(abs(x0 - a) >= side + gap or abs(y0 - b) >= side + gap for a, b in corners):
                    corners.append((x0, y0))
                    break
            else:
                break  # this object found no room: start the scene again
        if len(corners) < config.num_objects:
            continue
        shapes = rng.integers(0, len(SHAPES), size=config.num_objects).tolist()
        if _distance_ties(corners, side):
            continue
        return [{"color": names[c], "shape": SHAPES[s], "x": x0 + side / 2, "y": y0 + side / 2, "size": side}
                for c, s, (x0, y0) in zip(picked, shapes, corners)]
    raise SortOfClevrError("image_size", f"{config.image_size} px: could not place {config.num_objects} objects of "
                           f"{config.object_px} px in {SCENE_TRIES} tries; expected a larger image_size, a smaller "
                           "object_scale or fewer num_objects")


def _distance_ties(corners: Sequence[tuple[int, int]], side: int) -> bool:
    """Whether two objects are exactly as close to (or as far from) some object, in exact integer arithmetic."""
    centres = [(2 * x0 + side, 2 * y0 + side) for x0, y0 in corners]  # doubled: whole numbers
    for i, (xi, yi) in enumerate(centres):
        dists = sorted((xi - xj) ** 2 + (yi - yj) ** 2 for j, (xj, yj) in enumerate(centres) if j != i)
        if len(dists) > 1 and (dists[0] == dists[1] or dists[-1] == dists[-2]):
            return True
    return False


def render_scene(objects: Sequence[Mapping[str, Any]], image_size: int, background: str = "white") -> Image.Image:
    """The RGB picture of a scene: each object filled in its colour in its bounding square (no anti-aliasing)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        side = int(obj["size"])
        x0, y0 = int(obj["x"] - side / 2), int(obj["y"] - side / 2)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)  # inclusive corners: side x side pixels
        if obj["shape"] == "square":
            draw.rectangle(box, fill=COLORS[obj["color"]])
        else:
            draw.ellipse(box, fill=COLORS[obj["color"]])
    return image


def question_text(template: str, color: str) -> str:
    """The English question of ``template`` about the ``color`` object."""
    return TEMPLATES[template][1].format(color=color)


def answer_question(objects: Sequence[Mapping[str, Any]], template: str, color: str, image_size: int) -> str:
    """The answer to ``template`` about the ``color`` object of a scene, from its saved object list.

    Args:
        objects: the scene's objects (``scenes_<split>.json``), with ``color``, ``shape``, ``x``, ``y``.
        template: a :data:`TEMPLATES` name.
        color: the colour asked about.
        image_size: the image side in pixels (for left/right and top/bottom).
    """
    if template not in TEMPLATES:
        raise KeyError(f"unknown Sort-of-CLEVR template {template!r}; expected one of {', '.join(TEMPLATES)}")
    matches = [obj for obj in objects if obj["color"] == color]
    if len(matches) != 1:
        raise ValueError(f"the scene has {len(matches)} {color!r} objects; expected exactly one")
    target = matches[0]
    others = [obj for obj in objects if obj is not target]
    if template == "shape":
        return str(target["shape"])
    if template == "horizontal":
        return "left" if target["x"] < image_size / 2 else "right"
    if template == "vertical":
        return "top" if target["y"] < image_size / 2 else "bottom"
    if template == "count_same_shape":
        return str(sum(obj["shape"] == target["shape"] for obj in objects))  # the object itself included

    def distance(obj: Mapping[str, Any]) -> float:
        return math.hypot(obj["x"] - target["x"], obj["y"] - target["y"])

    pick = min if template == "closest_shape" else max
    return str(pick(others, key=distance)["shape"])


def scene_questions(objects: Sequence[Mapping[str, Any]], rng: np.random.Generator, first: int,
                    config: SortOfClevrConfig) -> list[tuple[str, str]]:
    """``(template, colour)`` of a scene's questions; ``first`` is the split-wide index of its first question."""
    names = list(TEMPLATES)
    templates = [names[(first + q) % len(names)] for q in range(config.questions_per_scene)]
    colors = [obj["color"] for obj in objects]
    chosen: dict[str, list[str]] = {}
    for template, count in Counter(templates).items():
        chosen[template] = [colors[i] for i in rng.choice(len(colors), size=count, replace=False).tolist()]
    used: Counter[str] = Counter()
    out = []
    for template in templates:
        out.append((template, chosen[template][used[template]]))
        used[template] += 1
    return out


# --------------------------------------------------------------------------------------
# Generation and the cache
# --------------------------------------------------------------------------------------
def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(folder: PathLike, config: SortOfClevrConfig) -> bool:
    """Whether ``folder`` holds a complete set of exactly these parameters."""
    marker = _read_marker(Path(folder))
    return (marker is not None and marker.get("key") == config.key()
            and marker.get("generator_version") == GENERATOR_VERSION and marker.get("params") == config.params())


def _write_set(folder: Path, config: SortOfClevrConfig, progress: bool) -> dict[str, Any]:
    """Generate every split into ``folder`` (an empty folder); returns the marker's counts."""
    from tqdm.auto import tqdm

    counts: dict[str, Any] = {}
    image_id = 0
    total = sum(config.scenes(split) for split in config.splits)
    with tqdm(total=total, desc="sort-of-clevr", unit="scene", disable=not progress) as bar:
        for split_index, split in enumerate(SPLITS):
            if config.scenes(split) == 0:
                continue
            (folder / "images" / split).mkdir(parents=True)
            lines, scenes = [], []
            per_template: Counter[str] = Counter()
            for i in range(config.scenes(split)):
                rng = np.random.default_rng([config.seed, split_index, i])
                objects = sample_scene(rng, config)
                image = f"{split}/{image_id}.png"
                render_scene(objects, config.image_size, config.background).save(folder / "images" / image)
                scenes.append({"image_id": image_id, "image": image, "objects": objects})
                asked = scene_questions(objects, rng, i * config.questions_per_scene, config)
                for q, (template, color) in enumerate(asked):
                    per_template[template] += 1
                    lines.append(json.dumps({
                        "question_id": image_id * config.questions_per_scene + q,
                        "image_id": image_id,
                        "image": image,
                        "question": question_text(template, color),
                        "answers": [answer_question(objects, template, color, config.image_size)],
                        "question_type": template,
                        "answer_type": TEMPLATES[template][0],
                        "color": color,
                    }))
                image_id += 1
                bar.update(1)
            write_text_atomic(folder / f"{split}.jsonl", "\n".join(lines) + "\n")
            head = json.dumps({"image_size": config.image_size, "background": config.background})[:-1]
            write_text_atomic(folder / f"scenes_{split}.json",  # one scene a line
                        head + ', "scenes": [\n' + ",\n".join(json.dumps(scene) for scene in scenes) + "\n]}\n")
            counts[split] = {"scenes": config.scenes(split), "questions": len(lines),
                             "question_types": {t: per_template[t] for t in TEMPLATES}}
    return counts


def generate_sort_of_clevr(
    config: SortOfClevrConfig | None = None,
    *,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    **params: Any,
) -> Path:
    """The folder of the set with these parameters, generated first unless it is already complete.

    Args:
        config: the parameters; or pass them as keywords (``num_objects=4``), which
            override ``config``'s (see :class:`SortOfClevrConfig`).
        cache_dir: the folder sets are cached in (default :func:`default_cache_dir`);
            the set is ``<cache_dir>/<config.key()>/``.
        progress: show a progress bar while generating.

    A folder of this key without the complete marker (a crashed run) is replaced.
    """
    config = config if config is not None else SortOfClevrConfig()
    unknown = sorted(set(params) - {f.name for f in fields(SortOfClevrConfig)})
    if unknown:
        raise SortOfClevrError(unknown[0], f"unknown parameter; expected one of "
                                           f"{', '.join(f.name for f in fields(SortOfClevrConfig))}")
    config = replace(config, **params) if params else config
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / config.key()
    if is_complete(final, config):
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.key()}.tmp-", dir=root))
    try:
        counts = _write_set(staging, config, progress)
        write_json_atomic(staging / MARKER_NAME, {
            "dataset": "sort-of-clevr", "generator_version": GENERATOR_VERSION, "key": config.key(),
            "params": config.params(), "answers": answer_vocabulary(config.num_objects),
            "templates": {t: {"answer_type": group, "question": text} for t, (group, text) in TEMPLATES.items()},
            "counts": counts}, indent=1)
        if final.exists() and not is_complete(final, config):
            shutil.rmtree(final)  # a crashed or foreign folder in the set's place
        try:
            os.replace(staging, final)
        except OSError:
            if not is_complete(final, config):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_sort_of_clevr(
    root: PathLike | None = None,
    *,
    num_objects: int = 6,
    image_size: int = 128,
    object_scale: float = 0.125,
    train_scenes: int = 3000,
    val_scenes: int = 300,
    test_scenes: int = 300,
    questions_per_scene: int = 12,
    seed: int = 0,
    background: str = "white",
    splits: str | Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    only_present: bool = False,
    verify_images: bool = False,
) -> VQAData:
    """Sort-of-CLEVR as VQA data: generated (or found in the cache), then read by the ``vqa-jsonl`` loader.

    Args:
        root: the cache folder (``data_dir=`` on the command line); default
            :func:`default_cache_dir`. The set is ``<root>/<key>/``.
        num_objects, image_size, object_scale, train_scenes, val_scenes, test_scenes,
            questions_per_scene, seed, background: see :class:`SortOfClevrConfig`.
        splits: which of ``train``, ``val``, ``test`` to return (default: all with scenes).
        answers: the answer vocabulary (default :func:`answer_vocabulary`, fixed by ``num_objects``).
        progress: show a progress bar while generating.
        skip_bad, only_present, verify_images: see :mod:`fusionzoo.data.common`.

    Returns a :class:`~fusionzoo.data.vqa.VQAData` named ``sort-of-clevr`` with
    metric ``exact_match`` and the ``question_type`` / ``answer_type`` columns.
    """
    config = SortOfClevrConfig(num_objects=num_objects, image_size=image_size, object_scale=object_scale,
                               train_scenes=train_scenes, val_scenes=val_scenes, test_scenes=test_scenes,
                               questions_per_scene=questions_per_scene, seed=seed, background=background)
    folder = generate_sort_of_clevr(config, cache_dir=root, progress=progress)
    wanted = select_splits(config.splits, splits, source=folder)
    data = load_vqa_jsonl(folder, files={split: folder / f"{split}.jsonl" for split in config.splits},
                          image_root=folder / "images", splits=wanted,
                          answers=list(answers) if answers is not None else answer_vocabulary(num_objects),
                          metric="exact_match", skip_bad=skip_bad, only_present=only_present,
                          verify_images=verify_images)
    return replace(data, name="sort-of-clevr")


register_dataset("sort-of-clevr")(load_sort_of_clevr)
