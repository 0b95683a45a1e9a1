"""COCO caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) with the official ``pycocoevalcap`` scorers.

The numbers are those of the COCO caption evaluation server (Chen et al., 2015,
"Microsoft COCO Captions: Data Collection and Evaluation Server"): captions are
tokenised with ``pycocoevalcap``'s Stanford PTB tokenizer (lower-cased,
punctuation dropped), then scored with its ``Bleu(4)`` (Papineni et al., 2002;
corpus-level, "closest" reference length), ``Meteor`` (METEOR 1.5, Denkowski &
Lavie, 2014), ``Rouge`` (ROUGE-L, Lin, 2004) and ``Cider`` (CIDEr-D, Vedantam et
al., 2015; document frequencies from the references being scored, so CIDEr
depends on the whole set of images).

``COCOEvalCap.evaluate()`` is deliberately not used: it always runs SPICE, which
downloads Stanford CoreNLP models on first use (impossible offline) and needs a
large Java heap. SPICE is reported as ``None`` with :data:`SPICE_NOTE`.

Java is required (the tokenizer and METEOR are Java programs);
:class:`JavaNotFoundError` says how to install it. The METEOR process takes a few
seconds to start (it loads its paraphrase table), so one is kept per Python
process and reused by later calls (:func:`close_scorers` stops it).

Bad input raises :class:`~fusionzoo.tasks.vqa_eval.ScoreInputError` naming the
file (or ``<gts>`` / ``<res>`` for dicts) and the entry.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from fusionzoo.errors import FusionZooError

from .vqa_eval import (
    ScoreInputError,
    entry_label,
    load_json_input,
    quote_ids,
    require_key,
    require_list,
)

logger = logging.getLogger(__name__)

#: The score keys, in the order of the COCO evaluation server.
CAPTION_METRICS: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

#: Why ``"SPICE"`` is ``None`` in every result.
SPICE_NOTE = (
    "SPICE not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP models on first use "
    "(not possible offline) and needs several GB of Java heap; run pycocoevalcap.spice.spice.Spice "
    "yourself where it is set up"
)

JAVA_INSTALL_HINT = (
    "install a Java runtime (8 or newer) and make sure `java -version` works: Debian/Ubuntu "
    "`apt-get install default-jre-headless`, Fedora `dnf install java-17-openjdk-headless`, "
    "macOS `brew install openjdk`, conda `conda install -c conda-forge openjdk`"
)


class JavaNotFoundError(FusionZooError, RuntimeError):
    """``java`` is not on PATH; pycocoevalcap's tokenizer and METEOR cannot run."""


class CaptionScorerError(FusionZooError, RuntimeError):
    """A pycocoevalcap Java program (tokenizer or METEOR) failed."""


# --------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------
def require_java() -> str:
    """Path of the ``java`` executable, or :class:`JavaNotFoundError` saying how to install it."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "caption scores need Java, but no `java` was found on PATH (pycocoevalcap's PTB tokenizer "
            f"and METEOR are Java programs); {JAVA_INSTALL_HINT}"
        )
    return java


def _import_pycocoevalcap() -> Any:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"caption scores need pycocoevalcap ({exc}); install it with `pip install pycocoevalcap`") from None
    return pycocoevalcap


# --------------------------------------------------------------------------------------
# Tokenisation and the scorers
# --------------------------------------------------------------------------------------
def tokenize_captions(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise captions with pycocoevalcap's ``PTBTokenizer`` (one Java call).

    Args:
        captions: id -> captions.

    Returns:
        id -> tokenised captions (lower-case, space-separated, punctuation removed),
        in the same order. Whitespace runs inside a caption are collapsed first,
        so a stray carriage return cannot shift the tokenizer's line alignment.
    """
    require_java()
    _import_pycocoevalcap()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wanted = {key: [{"caption": " ".join(caption.split())} for caption in texts] for key, texts in captions.items()}
    try:
        tokenized = PTBTokenizer().tokenize(wanted)
    except PermissionError as exc:
        raise CaptionScorerError(
            f"pycocoevalcap's PTBTokenizer writes a temporary file next to its jar and could not ({exc}); "
            "install pycocoevalcap somewhere writable (e.g. a virtual environment)"
        ) from None
    if any(len(tokenized.get(key, ())) != len(texts) for key, texts in wanted.items()):
        raise CaptionScorerError("the PTB tokenizer returned a different number of captions than it was given "
                                 "(did the Java process fail? see its messages above)")
    return {key: tokenized[key] for key in wanted}


_METEOR_LOCK = threading.Lock()
_METEOR: Any = None  # the shared pycocoevalcap Meteor, started on first use


def _shared_meteor() -> Any:
    """The process-wide METEOR scorer, (re)started when absent or dead."""
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def close_scorers() -> None:
    """Stop the shared METEOR Java process (a later call starts a new one)."""
    global _METEOR
    with _METEOR_LOCK:
        meteor, _METEOR = _METEOR, None
        if meteor is not None:
            if meteor.lock.locked():  # a failed compute_score left it held; its __del__ would block
                meteor.lock.release()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()


atexit.register(close_scorers)


def _meteor_score(gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]) -> float:
    """METEOR of tokenised captions on the shared scorer; a failure stops it and says why."""
    with _METEOR_LOCK:
        meteor = _shared_meteor()
        try:
            score, _ = meteor.compute_score(gts, res)
            return float(score)
        except (ValueError, OSError) as exc:
            failure = exc
    stderr = ""
    with contextlib.suppress(Exception):
        close_scorers()
        stderr = meteor.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()[-1]
    raise CaptionScorerError(f"the METEOR Java process failed ({failure}){': ' + stderr if stderr else ''}; "
                             "it needs about 2 GB of memory (java -Xmx2G)")


def score_tokenized(gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]) -> dict[str, float | None]:
    """Scores of already tokenised captions (no checks; see :func:`score_caption_dicts`).

    Args:
        gts: id -> tokenised reference captions (at least one each).
        res: id -> a list holding the one tokenised candidate caption; same ids as ``gts``.

    Returns:
        :data:`CAPTION_METRICS` -> corpus score, and ``"SPICE": None``.
    """
    _import_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = _meteor_score(gts, res)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["SPICE"] = None
    logger.info(SPICE_NOTE)
    return scores


# --------------------------------------------------------------------------------------
# Checked entry points
# --------------------------------------------------------------------------------------
def _check_caption(value: Any, *, file: str, entry: str) -> str:
    if not isinstance(value, str):
        raise ScoreInputError(f"caption is {type(value).__name__} {value!r:.60}", file=file, entry=entry,
                              expected="a caption string")
    if not value.strip():
        raise ScoreInputError("caption is empty", file=file, entry=entry, expected="a caption with words")
    return value


def _score_checked(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]], gts_file: str,
                   res_file: str, entries: Mapping[Hashable, str]) -> dict[str, float | None]:
    """Tokenise references and candidates in one Java call, check, score."""
    tokenized = tokenize_captions({**{("ref", k): v for k, v in gts.items()}, **{("hyp", k): v for k, v in res.items()}})
    tok_gts = {k: tokenized[("ref", k)] for k in gts}
    tok_res = {k: tokenized[("hyp", k)] for k in gts}
    for tok, file, label in ((tok_gts, gts_file, None), (tok_res, res_file, entries)):
        for key, texts in tok.items():
            if not all(text.strip() for text in texts):
                j = next(j for j, text in enumerate(texts) if not text.strip())
                entry = label[key] if label else f"image_id={key!r}, caption {j}"
                raise ScoreInputError("caption has no words after PTB tokenisation (punctuation only?)",
                                      file=file, entry=entry, expected="a caption with words")
    return score_tokenized(tok_gts, tok_res)


def score_caption_dicts(gts: Mapping[Hashable, Sequence[str]],
                        res: Mapping[Hashable, Sequence[str] | str]) -> dict[str, float | None]:
    """COCO caption scores from dicts.

    Args:
        gts: image id -> reference captions (raw text, at least one).
        res: image id -> the one candidate caption (raw text), alone or in a
            one-element list; exactly the ids of ``gts``.

    Returns:
        ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}``
        -> score in 0..1 (CIDEr in 0..10), plus ``"SPICE": None`` (see :data:`SPICE_NOTE`).

    Raises:
        ScoreInputError: ids that differ between ``gts`` and ``res``, an empty or
            non-string caption, several candidates for an image.
        JavaNotFoundError: no ``java`` on PATH.
    """
    if not isinstance(gts, Mapping) or not isinstance(res, Mapping):
        raise ScoreInputError(f"got {type(gts).__name__} and {type(res).__name__}", file="<gts>/<res>",
                              expected="two dicts: image id -> captions")
    if not gts:
        raise ScoreInputError("no images", file="<gts>", expected="at least one image with reference captions")
    references: dict[Hashable, list[str]] = {}
    for key, texts in gts.items():
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ScoreInputError(f"references are {type(texts).__name__} {texts!r:.60}", file="<gts>",
                                  entry=f"gts[{key!r}]", expected="a non-empty list of caption strings")
        references[key] = [_check_caption(text, file="<gts>", entry=f"gts[{key!r}][{j}]") for j, text in enumerate(texts)]
    candidates: dict[Hashable, list[str]] = {}
    for key, texts in res.items():
        if key not in references:
            raise ScoreInputError(f"image {key!r} has no references in gts", file="<res>", entry=f"res[{key!r}]",
                                  expected="the ids of gts")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, Sequence) or len(texts) != 1:
            raise ScoreInputError(f"{len(texts) if isinstance(texts, Sequence) else type(texts).__name__} candidates",
                                  file="<res>", entry=f"res[{key!r}]", expected="exactly one candidate caption per image")
        candidates[key] = [_check_caption(texts[0], file="<res>", entry=f"res[{key!r}]")]
    missing = [key for key in references if key not in candidates]
    if missing:
        raise ScoreInputError(f"no candidate for {len(missing)} of {len(references)} images ({quote_ids(missing)})",
                              file="<res>", expected="a candidate caption for every image of gts")
    return _score_checked(references, candidates, "<gts>", "<res>", {key: f"res[{key!r}]" for key in candidates})


_ANNOTATION_SCHEMA = "COCO captions {'images': [{'id', ...}], 'annotations': [{'image_id', 'caption', ...}]}"
_RESULT_SCHEMA = "{'image_id', 'caption': str}"


def score_captions(annotations_json: str | os.PathLike | Mapping[str, Any],
                   results: str | os.PathLike | Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """COCO caption scores of a results file against a COCO captions annotation file.

    Args:
        annotations_json: ``captions_<split>.json`` (path or loaded):
            ``{"images": [{"id", ...}], "annotations": [{"image_id", "caption", ...}]}``
            (``images`` optional; when present every annotation must name one of them).
        results: the results (path or loaded): ``[{"image_id", "caption"}, ...]``,
            one per image that has reference captions.

    Returns:
        As :func:`score_caption_dicts`.

    Raises:
        ScoreInputError: a missing key or wrong type, a result for an image
            without references or a repeated one, images without a result
            (how many) -- naming the file and entry.
        JavaNotFoundError: no ``java`` on PATH.
    """
    data, ann_file = load_json_input(annotations_json, "annotations")
    image_ids: set[Hashable] | None = None
    if isinstance(data, Mapping) and "images" in data:
        image_ids = set()
        for index, record in enumerate(require_list(data, "images", file=ann_file, what=_ANNOTATION_SCHEMA)):
            image_ids.add(require_key(record, "id", (int, str), file=ann_file,
                                      entry=entry_label("images", index, "id", record), what="{'id', 'file_name', ...}"))
    references: dict[Hashable, list[str]] = {}
    for index, record in enumerate(require_list(data, "annotations", file=ann_file, what=_ANNOTATION_SCHEMA)):
        entry = entry_label("annotations", index, "image_id", record)
        image_id = require_key(record, "image_id", (int, str), file=ann_file, entry=entry, what="{'image_id', 'caption'}")
        caption = _check_caption(require_key(record, "caption", str, file=ann_file, entry=entry,
                                             what="{'image_id', 'caption'}"), file=ann_file, entry=entry)
        if image_ids is not None and image_id not in image_ids:
            raise ScoreInputError(f"image_id {image_id!r} is not in 'images'", file=ann_file, entry=entry,
                                  expected="captions of the images listed in 'images'")
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise ScoreInputError("'annotations' is empty", file=ann_file, expected="reference captions")

    rows, res_file = load_json_input(results, "results")
    candidates: dict[Hashable, list[str]] = {}
    entries: dict[Hashable, str] = {}
    for index, record in enumerate(require_list(rows, None, file=res_file, what=f"[{_RESULT_SCHEMA}, ...]")):
        entry = entry_label("results", index, "image_id", record)
        image_id = require_key(record, "image_id", (int, str), file=res_file, entry=entry, what=_RESULT_SCHEMA)
        caption = _check_caption(require_key(record, "caption", str, file=res_file, entry=entry, what=_RESULT_SCHEMA),
                                 file=res_file, entry=entry)
        if image_id not in references:
            raise ScoreInputError(f"image_id {image_id!r} has no reference captions in {ann_file}", file=res_file,
                                  entry=entry, expected="results only for images of the annotation file")
        if image_id in candidates:
            raise ScoreInputError(f"a second caption for image_id {image_id!r} (first at {entries[image_id]})",
                                  file=res_file, entry=entry, expected="one caption per image")
        candidates[image_id] = [caption]
        entries[image_id] = entry
    missing = [image_id for image_id in references if image_id not in candidates]
    if missing:
        raise ScoreInputError(f"no caption for {len(missing)} of {len(references)} images with references "
                              f"(image_id {quote_ids(missing)})", file=res_file,
                              expected="one caption for every image of the annotation file")
    return _score_checked(references, candidates, ann_file, res_file, entries)


__all__ = [
    "CAPTION_METRICS",
    "SPICE_NOTE",
    "CaptionScorerError",
    "JavaNotFoundError",
    "close_scorers",
    "require_java",
    "score_caption_dicts",
    "score_captions",
    "score_tokenized",
    "tokenize_captions",
]
