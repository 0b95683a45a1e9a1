"""Image-text retrieval scores: recall@K in both directions, as ALBEF and BLIP report them.

Follows the retrieval evaluation of Li et al., 2021, "Align before Fuse" (ALBEF,
section 5, COCO and Flickr30K retrieval) and of BLIP (Li et al., 2022), on
Karpathy & Fei-Fei's (2015) test splits (COCO 5k images / 25k captions,
Flickr30K 1k images / 5k captions). This module holds the scoring half: a model
fills two score matrices, this module ranks them.

* **Score matrices.** ``i2t`` (images x captions): row ``i`` scores every
  caption for image query ``i``. ``t2i`` (captions x images): row ``c`` scores
  every image for caption query ``c``. Higher is better. The two need not be
  transposes of each other (ALBEF re-ranks each direction's shortlist with its
  matching head separately).
* **Ranks** (0-based, :func:`i2t_ranks`, :func:`t2i_ranks`). An image query's
  rank is the best rank among all captions of any of its own captions (an image
  has several; any one found counts). A caption query's rank is the rank among
  all images of its one image.
* **Ties count against the query.** A wrong candidate whose score equals the
  best right one's is ranked above it; right candidates tied with each other
  do not push each other down. So a rank is the number of wrong candidates
  scoring at least as high as the best right one. This rule does not depend on
  the order of rows or columns (permuting the score file changes nothing), and
  a model that gives every pair the same score (a collapsed embedding) gets
  recall@1 = 0 rather than 100. ALBEF's ``np.argsort`` leaves ties to the sort
  algorithm; with no ties the two agree exactly.
* **Recall@K** (:func:`recall_at_k`). The percentage of queries whose rank is
  below K. ``txt_r{K}`` is image -> text retrieval (image queries, from
  ``i2t``), ``img_r{K}`` is text -> image retrieval (caption queries, from
  ``t2i``), and ``r_mean`` is the mean of the six recalls -- ALBEF's names and
  definitions. Values are unrounded percentages.
* **Score files** (:func:`save_scores`, :func:`load_scores`). An ``.npz``
  archive with ``i2t``, ``t2i``, ``image_ids`` (the Karpathy ``cocoid`` for
  COCO, ``imgid`` for Flickr30K, or the COCO ``images[].id``) and
  ``caption_ids`` (the Karpathy ``sentid``, or the COCO ``annotations[].id``).
  Ids are integers or strings. Rows and columns may be in any order; other
  arrays in the archive are ignored.
* **Annotations** (:func:`load_retrieval_annotations`). A Karpathy split file
  (``dataset_coco.json``, ``dataset_flickr30k.json``) or an official COCO
  captions file: what each caption id's image is. An image is keyed by its
  ``cocoid`` when it has one and by its ``imgid`` otherwise (Flickr30K has no
  ``cocoid``; ``imgid`` is the image's index in Karpathy's file), the same key
  :mod:`fusionzoo.data.captions` gives Karpathy images. The file may hold
  more images than the score file (every split).
* **Shortlists** (:func:`top_k_chunked`). The top-k gallery items of each query
  by dot product without ever holding the whole similarity matrix, for
  ALBEF-style re-ranking of a shortlist (k = 128 or 256) with a matching head.

Bad input raises :class:`~fusionzoo.tasks.vqa_eval.ScoreInputError`, whose
message names the file (or ``<i2t>`` and the like for in-memory arrays), the
entry and what was expected. Torch is imported only by :func:`top_k_chunked`.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .vqa_eval import (
    ScoreInputError,
    entry_label,
    load_json_input,
    quote_ids,
    require_key,
    require_list,
)

#: The K of recall@K that ALBEF and BLIP report.
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

#: The arrays every score file holds.
SCORE_ARRAYS: tuple[str, ...] = ("i2t", "t2i", "image_ids", "caption_ids")

_SCORES_SCHEMA = ("an .npz archive with i2t (images x captions), t2i (captions x images), "
                  "image_ids (images,) and caption_ids (captions,)")
_ANNOTATIONS_SCHEMA = ("a Karpathy split file {'images': [{'cocoid' or 'imgid', 'sentences': [{'sentid'}, ...]}]} "
                       "or COCO captions {'images': [{'id'}], 'annotations': [{'id', 'image_id'}]}")

# How many matrix entries the rank computations compare at once (bounds their scratch memory).
_BLOCK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------
# Checks shared by arrays in memory and score files
# --------------------------------------------------------------------------------------
def _as_array(value: Any) -> np.ndarray:
    """A numpy array of an array-like or a torch tensor (copied to the CPU when it is elsewhere)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _check_ids(name: str, ids: Any, *, file: str) -> np.ndarray:
    """A 1-D array of unique integer or string ids."""
    ids = _as_array(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iuU":
        raise ScoreInputError(f"array {name!r} has shape {ids.shape} and dtype {ids.dtype}", file=file,
                              expected=f"{name!r} to be a 1-D array of integer or string ids")
    if len(ids) == 0:
        raise ScoreInputError(f"array {name!r} is empty", file=file, expected="at least one id")
    values = ids.tolist()
    first: dict[Any, int] = {}
    for position, ident in enumerate(values):
        if ident in first:
            raise ScoreInputError(f"id {ident!r} appears twice (first at {name}[{first[ident]}])", file=file,
                                  entry=f"{name}[{position}]", expected=f"unique {name}")
        first[ident] = position
    return ids


def _check_matrix(name: str, matrix: Any, shape: tuple[int, int], shape_text: str, *, file: str,
                  row_ids: np.ndarray | None = None, row_name: str = "") -> np.ndarray:
    """A 2-D real matrix of ``shape`` with no NaN (infinities are allowed, e.g. for masked pairs)."""
    matrix = _as_array(matrix)
    if matrix.ndim != 2 or matrix.dtype.kind not in "fiu":
        raise ScoreInputError(f"array {name!r} has shape {matrix.shape} and dtype {matrix.dtype}", file=file,
                              expected=f"{name!r} to be a 2-D array of real scores")
    if matrix.shape != shape:
        raise ScoreInputError(f"array {name!r} has shape {matrix.shape}", file=file,
                              expected=f"{name!r} of shape {shape_text} = {shape}")
    if matrix.dtype.kind == "f":
        bad = np.flatnonzero(np.isnan(matrix).any(axis=1))
        if len(bad):
            row = int(bad[0])
            ident = f" ({row_name}={row_ids[row].item()!r})" if row_ids is not None else ""
            raise ScoreInputError(f"row {row}{ident} holds NaN ({len(bad)} of {shape[0]} rows do)", file=file,
                                  entry=f"{name}[{row}]", expected="finite scores (or +-inf)")
    return matrix


def _check_text_image(text_image: Any, n_images: int, n_captions: int) -> np.ndarray:
    """Each caption's image index: (C,) integers in ``[0, n_images)``, every image named at least once."""
    owner = _as_array(text_image)
    if owner.ndim != 1 or owner.dtype.kind not in "iu" or len(owner) != n_captions:
        raise ScoreInputError(f"text_image has shape {owner.shape} and dtype {owner.dtype}", file="<text_image>",
                              expected=f"one integer image index per caption, shape ({n_captions},)")
    outside = np.flatnonzero((owner < 0) | (owner >= n_images))
    if len(outside):
        c = int(outside[0])
        raise ScoreInputError(f"caption {c} names image index {owner[c].item()}", file="<text_image>",
                              entry=f"text_image[{c}]", expected=f"an image index in 0..{n_images - 1}")
    owner = owner.astype(np.int64, copy=False)
    lonely = np.flatnonzero(np.bincount(owner, minlength=n_images) == 0)
    if len(lonely):
        raise ScoreInputError(f"image index {int(lonely[0])} has no caption ({len(lonely)} images have none)",
                              file="<text_image>", expected="every image to have at least one caption")
    return owner


# --------------------------------------------------------------------------------------
# Ranks and recall@K
# --------------------------------------------------------------------------------------
def i2t_ranks(i2t: Any, text_image: Any) -> np.ndarray:
    """0-based rank of each image query's best-placed own caption among all captions.

    Args:
        i2t: (I, C) scores, image queries x captions.
        text_image: (C,) the image index of each caption.

    Returns:
        (I,) int64: for image ``i``, the number of other images' captions that
        score at least as high as ``i``'s best-scored own caption (ties count
        against the query).
    """
    i2t = _as_array(i2t)
    i2t = _check_matrix("i2t", i2t, i2t.shape, "(images, captions)", file="<i2t>")
    return _i2t_ranks(i2t, _check_text_image(text_image, *i2t.shape))


def _i2t_ranks(i2t: np.ndarray, owner: np.ndarray) -> np.ndarray:
    n_images, n_captions = i2t.shape
    ranks = np.empty(n_images, dtype=np.int64)
    rows = max(1, _BLOCK_ENTRIES // n_captions)
    for start in range(0, n_images, rows):
        block = i2t[start:start + rows]                                              # (b, C)
        own = owner[None, :] == np.arange(start, start + len(block))[:, None]        # (b, C): caption of the query
        best = np.where(own, block, -np.inf).max(axis=1)                             # (b,): best own caption
        ranks[start:start + len(block)] = ((block >= best[:, None]) & ~own).sum(axis=1)
    return ranks


def t2i_ranks(t2i: Any, text_image: Any) -> np.ndarray:
    """0-based rank of each caption query's image among all images.

    Args:
        t2i: (C, I) scores, caption queries x images.
        text_image: (C,) the image index of each caption.

    Returns:
        (C,) int64: for caption ``c``, the number of other images that score at
        least as high as ``c``'s image (ties count against the query).
    """
    t2i = _as_array(t2i)
    t2i = _check_matrix("t2i", t2i, t2i.shape, "(captions, images)", file="<t2i>")
    return _t2i_ranks(t2i, _check_text_image(text_image, t2i.shape[1], t2i.shape[0]))


def _t2i_ranks(t2i: np.ndarray, owner: np.ndarray) -> np.ndarray:
    n_captions, n_images = t2i.shape
    ranks = np.empty(n_captions, dtype=np.int64)
    rows = max(1, _BLOCK_ENTRIES // n_images)
    for start in range(0, n_captions, rows):
        block = t2i[start:start + rows]                                              # (b, I)
        own = block[np.arange(len(block)), owner[start:start + len(block)]]          # (b,): the right image's score
        ranks[start:start + len(block)] = (block >= own[:, None]).sum(axis=1) - 1    # minus the right image itself
    return ranks


def recall_at_k(i2t: Any, t2i: Any, text_image: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K in both directions, in percent (ALBEF's ``itm_eval``, ties counting against the query).

    Args:
        i2t: (I, C) scores, image queries x captions (numpy, torch or nested lists).
        t2i: (C, I) scores, caption queries x images.
        text_image: (C,) the image index (row of ``i2t``) of each caption.
        ks: the K values, each at least 1.

    Returns:
        ``{"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}``
        for the default ``ks`` (``txt_r{K}``/``img_r{K}`` for each K, in that order):
        ``txt_`` is image -> text retrieval, ``img_`` text -> image retrieval,
        ``r_mean`` the mean of all of them.

    Raises:
        ScoreInputError: wrong shapes, NaN scores, a caption index outside the
            images, an image without captions, bad ``ks``.
    """
    i2t = _as_array(i2t)
    i2t = _check_matrix("i2t", i2t, i2t.shape, "(images, captions)", file="<i2t>")
    n_images, n_captions = i2t.shape
    t2i = _check_matrix("t2i", t2i, (n_captions, n_images), "(captions, images), i2t transposed", file="<t2i>")
    owner = _check_text_image(text_image, n_images, n_captions)
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks) \
            or len(set(ks)) != len(ks):
        raise ScoreInputError(f"ks is {ks!r}", file="<ks>", expected="distinct integers, each at least 1")

    image_ranks, caption_ranks = _i2t_ranks(i2t, owner), _t2i_ranks(t2i, owner)
    scores: dict[str, float] = {}
    for prefix, ranks in (("txt", image_ranks), ("img", caption_ranks)):
        for k in ks:
            scores[f"{prefix}_r{k}"] = 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks)
    scores["r_mean"] = sum(scores.values()) / len(scores)
    return scores


# --------------------------------------------------------------------------------------
# Chunked top-k shortlists
# --------------------------------------------------------------------------------------
def _block_scores(rows: Any, columns: Any) -> Any:
    """(q, E) x (g, E) -> (q, g) dot products: the only place similarity blocks are made."""
    return rows @ columns.T


def _best_first(block: Any, keep: int, *, offset: int = 0, where: Any = None) -> tuple[Any, Any]:
    """Each row's first ``keep`` entries by score descending, then gallery index ascending.

    Args:
        block: (b, n) scores, no NaN.
        keep: at most ``n``.
        offset: the gallery index of column 0 (when ``where`` is None).
        where: (b, n) the gallery index of each score, for blocks that are not one
            run of the gallery.

    Returns:
        ``(scores, indices)``, each (b, keep). ``torch.topk`` picks arbitrarily among
        ties at its cut, so when a tie straddles the cut of some row, every entry
        scoring at least that row's ``keep``-th best score is taken. Only when the
        picked scores hold ties are they re-ordered, by index then by a stable sort
        on score; otherwise ``topk``'s order (score descending) is already the answer.
    """
    import torch

    scores, position = torch.topk(block, min(keep + 1, block.shape[1]), dim=1)  # sorted, best first
    if scores.shape[1] > keep and bool((scores[:, keep] == scores[:, keep - 1]).any()):  # a tie at the cut
        wanted = int((block >= scores[:, keep - 1:keep]).sum(dim=1).max())               # > keep
        scores, position = torch.topk(block, wanted, dim=1)                 # holds every row's candidates
    index = position + offset if where is None else where.gather(1, position)
    if bool((scores[:, 1:] == scores[:, :-1]).any()):                       # equal scores: gallery order among them
        index, order = torch.sort(index, dim=1)
        scores, order = torch.sort(scores.gather(1, order), dim=1, descending=True, stable=True)
        index = index.gather(1, order)
    return scores[:, :keep], index[:, :keep]


def top_k_chunked(query: Any, gallery: Any, k: int, *, chunk: int = 1024,
                  gallery_chunk: int | None = None) -> tuple[Any, Any]:
    """The ``k`` best gallery items of each query by dot product, one block of scores at a time.

    Args:
        query: (Q, E) query embeddings (torch tensor or numpy array); normalise
            them first for cosine similarity.
        gallery: (G, E) gallery embeddings, on the same device.
        k: how many to keep; ``k >= G`` keeps the whole gallery, sorted.
        chunk: query rows per block.
        gallery_chunk: gallery rows per block; ``None`` takes the whole gallery.

    Returns:
        ``(indices, scores)``, each (Q, min(k, G)): gallery indices (int64) and
        their scores, best first; equal scores are in gallery order (lower index
        first), so the result is exactly the first ``k`` columns of a stable
        descending sort of the full (Q, G) matrix. Numpy in, numpy out;
        otherwise torch tensors on the inputs' device.

    Scores are made one block at a time, ``chunk x G`` of them, or
    ``chunk x gallery_chunk`` with ``gallery_chunk`` (whose best ``k`` are merged
    with the running best ``k``), never the whole (Q, G) matrix. Each block is its own
    matrix product, so on some backends a score can differ in its last bit from
    the same entry of one big ``query @ gallery.T``.

    Raises:
        ScoreInputError: inputs that are not 2-D or differ in width, an empty
            gallery, ``k``/``chunk``/``gallery_chunk`` below 1, NaN scores.
    """
    import torch

    numpy_in = isinstance(query, np.ndarray) and isinstance(gallery, np.ndarray)
    q, g = torch.as_tensor(query), torch.as_tensor(gallery)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ScoreInputError(f"query has shape {tuple(q.shape)} and gallery {tuple(g.shape)}",
                              file="<query>/<gallery>", expected="(Q, E) and (G, E) embeddings of one width E")
    if q.device != g.device:
        raise ScoreInputError(f"query is on {q.device} and gallery on {g.device}", file="<query>/<gallery>",
                              expected="both on one device")
    if g.shape[0] == 0:
        raise ScoreInputError("the gallery is empty", file="<gallery>", expected="at least one gallery item")
    for name, value in (("k", k), ("chunk", chunk), ("gallery_chunk", 1 if gallery_chunk is None else gallery_chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ScoreInputError(f"{name} is {value!r}", file=f"<{name}>", expected="an integer of at least 1")
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    n_query, n_gallery = q.shape[0], g.shape[0]
    keep = min(int(k), n_gallery)
    step = n_gallery if gallery_chunk is None else int(gallery_chunk)

    indices = torch.empty((n_query, keep), dtype=torch.long, device=q.device)
    scores = torch.empty((n_query, keep), dtype=dtype, device=q.device)
    for q0 in range(0, n_query, chunk):
        rows = q[q0:q0 + chunk]
        best_scores = best_indices = None
        for g0 in range(0, n_gallery, step):
            block = _block_scores(rows, g[g0:g0 + step])                             # (<=chunk, <=step)
            if torch.isnan(block).any():
                row = int(torch.isnan(block).any(dim=1).nonzero()[0])
                raise ScoreInputError(f"the score of query {q0 + row} is NaN", file="<query>/<gallery>",
                                      entry=f"query[{q0 + row}]", expected="finite embeddings")
            top_scores, top_indices = _best_first(block, min(keep, block.shape[1]), offset=g0)
            if best_scores is None:
                best_scores, best_indices = top_scores, top_indices
            else:  # the overall best are among the running best and this block's best
                merged = torch.cat([best_scores, top_scores], dim=1)                # (<=chunk, <=2 keep)
                best_scores, best_indices = _best_first(merged, min(keep, merged.shape[1]),
                                                        where=torch.cat([best_indices, top_indices], dim=1))
        scores[q0:q0 + len(rows)] = best_scores
        indices[q0:q0 + len(rows)] = best_indices
    if numpy_in:
        return indices.numpy(), scores.numpy()
    return indices, scores


# --------------------------------------------------------------------------------------
# Score files
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalScores:
    """The contents of a score file.

    Attributes:
        i2t: (I, C) scores, image queries x captions.
        t2i: (C, I) scores, caption queries x images.
        image_ids: (I,) the image of each row of ``i2t`` (column of ``t2i``).
        caption_ids: (C,) the caption of each column of ``i2t`` (row of ``t2i``).
        file: where they were read from (``"<scores>"`` when built in memory).
    """

    i2t: np.ndarray
    t2i: np.ndarray
    image_ids: np.ndarray
    caption_ids: np.ndarray
    file: str = "<scores>"

    @classmethod
    def checked(cls, i2t: Any, t2i: Any, image_ids: Any, caption_ids: Any, *,
                file: str = "<scores>") -> RetrievalScores:
        """Build one after checking ids (1-D, unique) and shapes, with no NaN score."""
        image_ids = _check_ids("image_ids", image_ids, file=file)
        caption_ids = _check_ids("caption_ids", caption_ids, file=file)
        n_images, n_captions = len(image_ids), len(caption_ids)
        i2t = _check_matrix("i2t", i2t, (n_images, n_captions), "(len(image_ids), len(caption_ids))", file=file,
                            row_ids=image_ids, row_name="image_id")
        t2i = _check_matrix("t2i", t2i, (n_captions, n_images), "(len(caption_ids), len(image_ids))", file=file,
                            row_ids=caption_ids, row_name="caption_id")
        return cls(i2t, t2i, image_ids, caption_ids, file)


def save_scores(path: str | os.PathLike, i2t: Any, t2i: Any, image_ids: Any, caption_ids: Any,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write a score file atomically (a temporary file beside it, then a rename).

    Args:
        path: the ``.npz`` file to write (exactly this name; folders are created).
        i2t: (I, C) scores, image queries x captions (numpy or torch).
        t2i: (C, I) scores, caption queries x images.
        image_ids: (I,) integer or string image ids (Karpathy ``cocoid``/``imgid``, COCO ``images[].id``).
        caption_ids: (C,) integer or string caption ids (Karpathy ``sentid``, COCO ``annotations[].id``).
        extra: more arrays to store under their names (e.g. ``itc_i2t``); :func:`load_scores` ignores them.

    Returns:
        The path written.

    Raises:
        ScoreInputError: what :func:`load_scores` would refuse; nothing is written then.
    """
    path = Path(path)
    scores = RetrievalScores.checked(i2t, t2i, image_ids, caption_ids, file=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            clash = sorted(set(extra or {}) & set(SCORE_ARRAYS))
            if clash:
                raise ScoreInputError(f"extra arrays {clash} clash with the score arrays", file=str(path),
                                      expected=f"names other than {list(SCORE_ARRAYS)}")
            np.savez(out, **{name: np.asarray(value) for name, value in (extra or {}).items()}, i2t=scores.i2t,
                     t2i=scores.t2i, image_ids=scores.image_ids, caption_ids=scores.caption_ids)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_scores(path: str | os.PathLike) -> RetrievalScores:
    """Read and check a score file written by :func:`save_scores` (or any ``np.savez`` of the four arrays).

    Raises:
        ScoreInputError: no such file, not an ``.npz`` archive, a missing array,
            object (pickled) arrays, wrong shapes, NaN scores, repeated ids.
    """
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ScoreInputError("scores file not found", file=file, expected=_SCORES_SCHEMA)
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ScoreInputError(f"not a numpy archive ({' '.join(str(exc).split())})", file=file,
                              expected=_SCORES_SCHEMA) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ScoreInputError("a single .npy array, not an .npz archive", file=file, expected=_SCORES_SCHEMA)
    with archive:
        missing = [name for name in SCORE_ARRAYS if name not in archive.files]
        if missing:
            raise ScoreInputError(f"missing array {missing[0]!r} (the archive holds {sorted(archive.files)})",
                                  file=file, expected=_SCORES_SCHEMA)
        arrays: dict[str, np.ndarray] = {}
        for name in SCORE_ARRAYS:
            try:
                arrays[name] = archive[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ScoreInputError(f"array {name!r} cannot be read ({' '.join(str(exc).split())})", file=file,
                                      expected="plain numeric or string arrays (no Python objects)") from None
    return RetrievalScores.checked(arrays["i2t"], arrays["t2i"], arrays["image_ids"], arrays["caption_ids"],
                                   file=file)


# --------------------------------------------------------------------------------------
# Annotations: each caption's image
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalAnnotations:
    """Which image each caption describes, from an annotation file.

    Attributes:
        file: the file read (``"<annotations>"`` for an object given in memory).
        schema: ``"karpathy"`` or ``"coco"``.
        images: image id -> its entry in the file (for messages).
        caption_image: caption id -> image id.
    """

    file: str
    schema: str
    images: dict[Hashable, str]
    caption_image: dict[Hashable, Hashable]


def _karpathy_captions(images: list[Any], file: str) -> tuple[dict[Hashable, str], dict[Hashable, Hashable]]:
    what = "{'cocoid' (COCO) or 'imgid' (Flickr30K): int, 'sentences': [{'sentid': int, ...}]}"
    seen: dict[Hashable, str] = {}
    caption_image: dict[Hashable, Hashable] = {}
    caption_entry: dict[Hashable, str] = {}
    for index, record in enumerate(images):
        key = "cocoid" if isinstance(record, Mapping) and "cocoid" in record else "imgid"
        entry = entry_label("images", index, key, record)
        image_id = require_key(record, key, int, file=file, entry=entry, what=what)
        if image_id in seen:
            raise ScoreInputError(f"{key} {image_id!r} appears twice (first at {seen[image_id]})", file=file,
                                  entry=entry, expected="one entry per image")
        seen[image_id] = entry
        for j, sentence in enumerate(require_key(record, "sentences", list, file=file, entry=entry, what=what)):
            where = f"{entry}, sentences[{j}]"
            sentid = require_key(sentence, "sentid", int, file=file, entry=where, what="{'sentid': int, 'raw', ...}")
            if sentid in caption_image:
                raise ScoreInputError(f"sentid {sentid!r} appears twice (first at {caption_entry[sentid]})",
                                      file=file, entry=where, expected="unique sentids")
            caption_image[sentid] = image_id
            caption_entry[sentid] = where
    return seen, caption_image


def _coco_captions(data: Mapping[str, Any], file: str) -> tuple[dict[Hashable, str], dict[Hashable, Hashable]]:
    images: dict[Hashable, str] = {}
    listed = "images" in data
    if listed:
        for index, record in enumerate(require_list(data, "images", file=file, what=_ANNOTATIONS_SCHEMA)):
            entry = entry_label("images", index, "id", record)
            image_id = require_key(record, "id", (int, str), file=file, entry=entry, what="{'id', 'file_name', ...}")
            images.setdefault(image_id, entry)
    what = "{'id', 'image_id', 'caption'}"
    caption_image: dict[Hashable, Hashable] = {}
    caption_entry: dict[Hashable, str] = {}
    for index, record in enumerate(require_list(data, "annotations", file=file, what=_ANNOTATIONS_SCHEMA)):
        entry = entry_label("annotations", index, "id", record)
        caption_id = require_key(record, "id", (int, str), file=file, entry=entry, what=what)
        image_id = require_key(record, "image_id", (int, str), file=file, entry=entry, what=what)
        if caption_id in caption_image:
            raise ScoreInputError(f"id {caption_id!r} appears twice (first at {caption_entry[caption_id]})",
                                  file=file, entry=entry, expected="unique annotation ids")
        if listed and image_id not in images:
            raise ScoreInputError(f"image_id {image_id!r} is not in 'images'", file=file, entry=entry,
                                  expected="captions of the images listed in 'images'")
        images.setdefault(image_id, entry)
        caption_image[caption_id] = image_id
        caption_entry[caption_id] = entry
    return images, caption_image


def load_retrieval_annotations(source: str | os.PathLike | Mapping[str, Any]) -> RetrievalAnnotations:
    """Each caption id's image id, from a Karpathy split file or an official COCO captions file.

    Args:
        source: a path, or the loaded JSON. A top-level ``annotations`` list
            means COCO (``images[].id``, ``annotations[].id`` and ``image_id``);
            otherwise an ``images`` list means Karpathy (``images[].cocoid``, or
            ``imgid`` when there is no ``cocoid``, and ``sentences[].sentid``).

    Raises:
        ScoreInputError: neither schema, a missing key, a repeated id, no captions.
    """
    data, file = load_json_input(source, "annotations")
    if isinstance(data, Mapping) and "annotations" in data:
        schema, (images, caption_image) = "coco", _coco_captions(data, file)
    elif isinstance(data, Mapping) and "images" in data:
        images_list = require_list(data, "images", file=file, what=_ANNOTATIONS_SCHEMA)
        schema, (images, caption_image) = "karpathy", _karpathy_captions(images_list, file)
    else:
        found = f"keys {sorted(data)[:8]}" if isinstance(data, Mapping) else f"a {type(data).__name__}"
        raise ScoreInputError(f"no 'annotations' or 'images' list at the top level (found {found})", file=file,
                              expected=_ANNOTATIONS_SCHEMA)
    if not caption_image:
        raise ScoreInputError("the file holds no captions", file=file, expected=_ANNOTATIONS_SCHEMA)
    return RetrievalAnnotations(file, schema, images, caption_image)


# --------------------------------------------------------------------------------------
# Scoring a score file against annotations
# --------------------------------------------------------------------------------------
def _first_missing(ids: list[Any], known: Mapping[Hashable, Any]) -> tuple[int, list[Any]]:
    """Position of the first id not in ``known``, and every such id (``(-1, [])`` when none)."""
    missing = [(position, ident) for position, ident in enumerate(ids) if ident not in known]
    return (missing[0][0], [ident for _, ident in missing]) if missing else (-1, [])


def caption_image_index(scores: RetrievalScores, annotations: RetrievalAnnotations) -> np.ndarray:
    """(C,) the row of ``scores.i2t`` holding each caption's image, checked against the annotations.

    Raises:
        ScoreInputError: an image or caption id the annotations do not have (the
            first one named, with how many), a caption whose image is not among
            the score file's images, an image with none of its captions there.
    """
    image_ids, caption_ids = scores.image_ids.tolist(), scores.caption_ids.tolist()
    for name, ids, known, kind, source in (
        ("image_ids", image_ids, annotations.images, "image id",
         "an image of the annotation file (Karpathy cocoid or imgid, COCO images[].id)"),
        ("caption_ids", caption_ids, annotations.caption_image, "caption id",
         "a caption of the annotation file (Karpathy sentid, COCO annotations[].id)"),
    ):
        position, missing = _first_missing(ids, known)
        if missing:
            raise ScoreInputError(f"{kind} {ids[position]!r} is not in {annotations.file} ({len(missing)} of "
                                  f"{len(ids)} {kind}s are not: {quote_ids(missing)})", file=scores.file,
                                  entry=f"{name}[{position}]", expected=f"every id to be {source}")
    row = {ident: position for position, ident in enumerate(image_ids)}
    owner = np.empty(len(caption_ids), dtype=np.int64)
    for position, caption_id in enumerate(caption_ids):
        image_id = annotations.caption_image[caption_id]
        if image_id not in row:
            raise ScoreInputError(f"caption id {caption_id!r} describes image {image_id!r} "
                                  f"({annotations.images[image_id]} of {annotations.file}), which is not among "
                                  "the score file's image_ids", file=scores.file, entry=f"caption_ids[{position}]",
                                  expected="the images of every scored caption to be scored too")
        owner[position] = row[image_id]
    lonely = np.flatnonzero(np.bincount(owner, minlength=len(image_ids)) == 0)
    if len(lonely):
        first = int(lonely[0])
        raise ScoreInputError(f"image id {image_ids[first]!r} has none of its captions among caption_ids "
                              f"({len(lonely)} of {len(image_ids)} images have none)", file=scores.file,
                              entry=f"image_ids[{first}]", expected="every scored image to have a scored caption")
    return owner


def score_retrieval(annotations: str | os.PathLike | Mapping[str, Any] | RetrievalAnnotations,
                    scores: str | os.PathLike | RetrievalScores,
                    ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K of a score file, with each caption's image taken from an annotation file.

    Args:
        annotations: a Karpathy split file (``dataset_coco.json``,
            ``dataset_flickr30k.json``) or an official COCO captions file (path,
            loaded JSON, or :func:`load_retrieval_annotations`' result); it may
            hold more images and captions than the score file.
        scores: a score file (path, or :func:`load_scores`' result); the
            recalls are over exactly its images and captions, in any order.
        ks: the K values.

    Returns:
        As :func:`recall_at_k`: ``{"txt_r1", "txt_r5", "txt_r10", "img_r1",
        "img_r5", "img_r10", "r_mean"}`` in percent.

    Raises:
        ScoreInputError: bad files, ids the annotations do not have (see
            :func:`caption_image_index`), naming the file and the entry.
    """
    if not isinstance(annotations, RetrievalAnnotations):
        annotations = load_retrieval_annotations(annotations)
    if not isinstance(scores, RetrievalScores):
        scores = load_scores(scores)
    owner = caption_image_index(scores, annotations)
    return recall_at_k(scores.i2t, scores.t2i, owner, ks)


__all__ = [
    "DEFAULT_KS",
    "SCORE_ARRAYS",
    "RetrievalAnnotations",
    "RetrievalScores",
    "caption_image_index",
    "i2t_ranks",
    "load_retrieval_annotations",
    "load_scores",
    "recall_at_k",
    "save_scores",
    "score_retrieval",
    "t2i_ranks",
    "top_k_chunked",
]
