"""``fusionzoo retrieve``: search a folder of images with text queries, using a saved retrieval model.

Every image under the folder is embedded once into an **index** on disk: its relative
path, its unit-norm ITC embedding (I, E) and its image tokens (I, N, Di), which the
fusion and its image-text matching (ITM) head read when reranking. For each query the
``--rerank-k`` best images by ITC cosine are shortlisted
(:func:`~fusionzoo.tasks.retrieval_eval.top_k_chunked`) and reranked by the ITM log-odds
(:meth:`~fusionzoo.model.FusionModel.match_states`) of the query's text states with the
cached tokens, as retrieval evaluation does (:mod:`fusionzoo.tasks.retrieval`).

The index is keyed by the model (a content hash of ``model.safetensors`` and the model's
config) and by the folder's listing (relative paths, sizes, modification times): it is
reused while both are unchanged, and rebuilt (replaced atomically) otherwise. By default
it lives in the user's cache (:func:`default_index_root`), one folder per model and image
folder, so a read-only image folder can be searched too; ``--index PATH`` puts it elsewhere.
Image tokens are stored as float16 (float32 where a value would overflow float16) and
read back as float32.

This module imports only the standard library at import time (``fusionzoo --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FusionZooError
from ..io import atomic_write

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import FusionModel

#: File name endings (lower case) of the images that are indexed.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Bump when the stored layout changes: every old index then rebuilds.
INDEX_FORMAT = 1
INDEX_NAME = "index.pt"
#: Largest finite float16 value; image tokens beyond it are stored as float32.
FLOAT16_MAX = 65504.0

RETRIEVE_EPILOG = """\
index: every image under DIR (.jpg .jpeg .png .webp .bmp, subfolders included, in
sorted order) is embedded once and kept in an index file: its ITC embedding and its
image tokens (float16), which the ITM head reads when reranking. The index is keyed by
the model's weights (a hash of model.safetensors) and config and by the folder's listing
(relative paths, sizes, modification times): it is reused while both are unchanged and
rebuilt otherwise. Images that cannot be decoded are skipped with a warning. Default
location: $FUSIONZOO_CACHE/retrieve/, else $XDG_CACHE_HOME/fusionzoo/retrieve/
(~/.cache/fusionzoo/retrieve/), one folder per model and image folder; --index PATH
keeps it in PATH instead (rebuilt in place when stale).

scores: each query's --rerank-k best images by ITC cosine are reranked by the ITM head;
the output lists the --top best as `rank  itm  itc  path`, where itm is the match
probability (sigmoid of the ITM log-odds) and itc the cosine similarity. --rerank-k 0
ranks by ITC alone (itm shown as -). --json prints one object per query instead:
{"query": ..., "results": [{"path": ..., "itm": ..., "itc": ...}, ...]}.
Status lines and warnings go to stderr, results to stdout.

examples:
  fusionzoo retrieve runs/retrieval --images photos/ --query "a dog on a beach"
  fusionzoo retrieve runs/retrieval/final --images photos/ --text-file queries.txt --top 10 --json
  fusionzoo retrieve runs/retrieval --images /data/ro-photos --query "a red bus" --index photos.pt
"""


class RetrieveError(FusionZooError, ValueError):
    """A ``fusionzoo retrieve`` input that cannot be used (names the folder, file or option and what was expected)."""


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def _add_retrieve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve",
        help="search a folder of images with text queries (ITC shortlist, ITM rerank)",
        description="Rank the images of a folder for text queries with a model trained with "
        "task=retrieval: the images are embedded once into an index on disk (reused while the folder "
        "and the model are unchanged); each query shortlists images by ITC cosine and reranks the "
        "shortlist with the model's image-text matching head.",
        epilog=RETRIEVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a saved retrieval model folder (with config.json) or a run's output_dir")
    p.add_argument("--images", required=True, metavar="DIR", help="the folder of images to search (recursive)")
    queries = p.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", action="append", metavar="TEXT", help="a text query (repeatable)")
    queries.add_argument("--text-file", metavar="FILE", help="a UTF-8 file with one query per non-empty line")
    p.add_argument("--top", type=int, default=5, metavar="N", help="results shown per query (default 5)")
    p.add_argument("--rerank-k", type=int, default=16, metavar="K",
                   help="images per query reranked by ITM, raised to --top when smaller; 0 = ITC only (default 16)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="images (indexing) or pairs (reranking) per batch "
                   "(default 32)")
    p.add_argument("--index", metavar="PATH", help="the index file to use (default: in the user cache, see below)")
    p.add_argument("--json", action="store_true", help="print one JSON object per query instead of a table")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="torch device: cpu, cuda, cuda:N (default cpu)")
    p.set_defaults(func=_run_retrieve)


def _run_retrieve(args: argparse.Namespace) -> int:
    for name, value, low in (("--top", args.top, 1), ("--rerank-k", args.rerank_k, 0),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise RetrieveError(f"{name} is {value}; expected an integer of at least {low}")
    folder = Path(args.images)
    entries = list_images(folder)
    queries = _read_queries(args)
    from ..training.trainer import resolve_model_dir

    model_dir = resolve_model_dir(args.run)
    device = _device(args.device)

    import torch

    from ..model import load_model

    model = load_model(model_dir, device=device)
    _check_model(model, model_dir, rerank=args.rerank_k > 0)
    index_path = Path(args.index) if args.index else None
    if index_path is not None and index_path.is_dir():
        index_path = index_path / INDEX_NAME
    with torch.no_grad():
        index = open_index(model, model_dir, folder, entries, batch_size=args.batch_size, index_path=index_path)
        for number, query in enumerate(queries):
            results = search(model, index, query, top=args.top, rerank_k=args.rerank_k, batch_size=args.batch_size)
            for result in results:
                result["path"] = str(folder / result["path"])
            _print_results(query, results, as_json=args.json, first=number == 0)
    return 0


def _read_queries(args: argparse.Namespace) -> list[str]:
    """The queries of ``--query`` (each non-blank) or of ``--text-file`` (its non-empty lines)."""
    if args.query is not None:
        queries = [q.strip() for q in args.query]
        if not all(queries):
            raise RetrieveError("--query is empty; expected a text to search for")
        return queries
    path = Path(args.text_file)
    if not path.is_file():
        raise RetrieveError(f"--text-file {path} not found; expected a text file with one query per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RetrieveError(f"--text-file {path} is not UTF-8 text ({exc}); expected one query per line") from exc
    except OSError as exc:
        raise RetrieveError(f"--text-file {path} cannot be read: {exc}") from exc
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise RetrieveError(f"--text-file {path} holds no queries; expected one query per non-empty line")
    return queries


def _device(name: str) -> Any:
    """``torch.device(name)``, refused with a one-line error when it does not exist here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RetrieveError(f"--device {name!r} is not a torch device ({exc}); expected cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RetrieveError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _check_model(model: FusionModel, model_dir: Path, *, rerank: bool) -> None:
    """A RetrieveError unless the model embeds images and texts apart (and, to rerank, has an ITM head)."""
    try:
        _ = model.aligner  # raises TypeError without ITC projections
    except TypeError as exc:
        raise RetrieveError(f"{model_dir} holds a {model.task} model without image-text alignment (ITC); "
                            "retrieve needs a model trained with task=retrieval") from exc
    if rerank and getattr(model.head, "log_odds", None) is None:
        raise RetrieveError(f"{model_dir} holds a {model.task} model without an image-text matching (ITM) head; "
                            "retrieve needs a model trained with task=retrieval, or --rerank-k 0 for ITC only")


def _print_results(query: str, results: list[dict[str, Any]], *, as_json: bool, first: bool) -> None:
    if as_json:
        print(json.dumps({"query": query, "results": results}), flush=True)
        return
    if not first:
        print()
    print(f"query: {query}")
    print("rank  itm     itc      path")
    for rank, result in enumerate(results, 1):
        itm = "-     " if result["itm"] is None else f"{result['itm']:.4f}"
        print(f"{rank:>4}  {itm}  {result['itc']:+.4f}  {result['path']}")
    sys.stdout.flush()


def _status(message: str) -> None:
    """A status or warning line on stderr (above a running progress bar, not glued to it)."""
    from tqdm.auto import tqdm

    tqdm.write(f"fusionzoo retrieve: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# The image folder and the index key
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFile:
    """One image file of the searched folder.

    Attributes:
        rel: its path relative to the folder, with ``/`` separators.
        size: bytes.
        mtime_ns: modification time in nanoseconds.
    """

    rel: str
    size: int
    mtime_ns: int


def list_images(folder: Path) -> list[ImageFile]:
    """Every image file under ``folder`` (by suffix, case-insensitive, subfolders included), sorted by path.

    Raises:
        RetrieveError: ``folder`` is missing, is not a folder, or holds no image file.
    """
    if not folder.exists():
        raise RetrieveError(f"--images {folder} does not exist; expected a folder of images")
    if not folder.is_dir():
        raise RetrieveError(f"--images {folder} is not a folder; expected a folder of images")
    found: list[ImageFile] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in filenames:
            if not filename.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(dirpath) / filename
            try:
                stat = path.stat()
            except OSError:  # a dangling symlink or a file removed meanwhile
                continue
            if path.is_file():
                found.append(ImageFile(path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    if not found:
        raise RetrieveError(f"--images {folder} holds no image files; expected {', '.join(IMAGE_SUFFIXES)} files "
                            "(in it or its subfolders)")
    return sorted(found, key=lambda f: f.rel)


def _key_parts(model: FusionModel, model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """What identifies the model (its weights' content hash, its config) and how images are turned into tokens."""
    from ..features.keys import fingerprint_files
    from ..model_folder import weight_files

    encoder = {"weights": fingerprint_files([str(p) for p in weight_files(Path(model_dir))]), "config": model.config}
    preprocessing = {"index_format": INDEX_FORMAT, "data_config": model.vision.data_config,
                     "tokens_dtype": "float16"}
    return encoder, preprocessing


def index_key(encoder: dict[str, Any], preprocessing: dict[str, Any], entries: list[ImageFile]) -> str:
    """40 hex characters over the model and the folder listing (relative paths, sizes, modification times)."""
    from ..features.keys import cache_key, fingerprint_texts

    listing = fingerprint_texts(f"{f.rel}\t{f.size}\t{f.mtime_ns}" for f in entries)
    return cache_key(encoder, preprocessing, f"listing:{listing}")


def default_index_root() -> Path:
    """``$FUSIONZOO_CACHE/retrieve``, else ``$XDG_CACHE_HOME/fusionzoo/retrieve`` (``~/.cache/fusionzoo/retrieve``).

    Next to the feature cache of ``fusionzoo bench`` and training (:func:`~fusionzoo.features.layout.default_cache_dir`);
    ``fusionzoo cache`` lists and clears only its own entries, never this folder.
    """
    from ..features.layout import default_cache_dir

    features = default_cache_dir()
    if os.environ.get("FUSIONZOO_CACHE"):
        return features / "retrieve"
    return features.parent / "retrieve"


def default_index_path(encoder: dict[str, Any], preprocessing: dict[str, Any], folder: Path) -> Path:
    """The index file of this model and image folder in :func:`default_index_root`.

    One file per (model, folder), not per listing: a changed folder replaces its index
    instead of leaving the stale one behind.
    """
    from ..features.keys import cache_key

    slot = cache_key(encoder, preprocessing, f"folder:{folder.resolve()}")[:20]
    return default_index_root() / slot / INDEX_NAME


# --------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------
@dataclass
class ImageIndex:
    """The embedded images of one folder, for one model.

    Attributes:
        key: :func:`index_key` of the model and listing it was built from.
        paths: (I,) relative paths of the embedded images, sorted.
        embed: (I, E) float32 unit-norm ITC embeddings.
        tokens: (I, N, Di) image tokens (float16, or float32 where float16 would overflow).
        skipped: relative paths of the images that could not be decoded.
        path: the index file, or None when it could not be written.
        reused: True when read from disk, False when just built.
    """

    key: str
    paths: list[str]
    embed: Tensor
    tokens: Tensor
    skipped: list[str]
    path: Path | None
    reused: bool


def open_index(model: FusionModel, model_dir: Path, folder: Path, entries: list[ImageFile], *, batch_size: int,
               index_path: Path | None = None) -> ImageIndex:
    """The index of ``entries`` for ``model``: read from ``index_path`` (default location) when current, else built.

    A freshly built index is written atomically; if it cannot be written (a read-only cache)
    a warning says so and the search goes on with the index in memory. Says on stderr whether
    the index was built or reused, and how many images were skipped.
    """
    encoder, preprocessing = _key_parts(model, model_dir)
    key = index_key(encoder, preprocessing, entries)
    path = index_path if index_path is not None else default_index_path(encoder, preprocessing, folder)
    index, why = load_index(path, key)
    if index is not None:
        skipped = f" ({len(index.skipped)} could not be decoded when it was built)" if index.skipped else ""
        _status(f"index reused: {len(index.paths)} images of {folder}{skipped} from {path}")
        return index
    index = build_index(model, folder, entries, key, batch_size=batch_size)
    try:
        save_index(path, index, model_dir=model_dir, folder=folder)
        index.path = path
        where = f"saved to {path}"
    except OSError as exc:
        _status(f"warning: cannot write the index to {path} ({exc}); searching without saving it")
        where = "not saved"
    skipped = f", {len(index.skipped)} skipped (could not be decoded)" if index.skipped else ""
    _status(f"index built{why}: {len(index.paths)} images of {folder}{skipped}, {where}")
    return index


def build_index(model: FusionModel, folder: Path, entries: list[ImageFile], key: str, *,
                batch_size: int) -> ImageIndex:
    """Decode and embed every image of ``entries``, ``batch_size`` at a time; undecodable ones are skipped.

    Raises:
        RetrieveError: not one image could be decoded.
    """
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    paths: list[str] = []
    skipped: list[str] = []
    embeds: list[Tensor] = []
    tokens: list[Tensor] = []
    wide = False  # True once a token would overflow float16: everything is then kept as float32
    with tqdm(total=len(entries), desc="indexing", unit="img", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(entries), batch_size):
            images, names = [], []
            for entry in entries[start:start + batch_size]:
                try:
                    with Image.open(folder / entry.rel) as image:
                        images.append(image.convert("RGB"))  # decodes the whole file
                    names.append(entry.rel)
                except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                    skipped.append(entry.rel)
                    _status(f"warning: skipped {folder / entry.rel}: cannot decode it as an image ({exc})")
            bar.update(len(entries[start:start + batch_size]))
            if not images:
                continue
            pixels = model.vision.preprocess(images).to(model.device, model.dtype)  # (b, 3, H, W)
            image_tokens = model.vision(pixels).tokens  # (b, N, Di)
            embeds.append(model.embed_image_states(image_tokens).float().cpu())  # (b, E)
            chunk = image_tokens.float().cpu()  # (b, N, Di)
            if not wide and bool(chunk.abs().max() > FLOAT16_MAX):
                wide = True
                tokens = [t.float() for t in tokens]
            tokens.append(chunk if wide else chunk.half())
            paths.extend(names)
    if not paths:
        raise RetrieveError(f"--images {folder}: none of its {len(entries)} image files could be decoded; "
                            "expected at least one readable image")
    return ImageIndex(key=key, paths=paths, embed=torch.cat(embeds), tokens=torch.cat(tokens), skipped=skipped,
                      path=None, reused=False)


def save_index(path: Path, index: ImageIndex, *, model_dir: Path, folder: Path) -> None:
    """Write ``index`` to ``path`` atomically (:func:`fusionzoo.io.atomic_write`)."""
    import torch

    payload = {
        "format": INDEX_FORMAT, "key": index.key, "paths": index.paths, "skipped": index.skipped,
        "embed": index.embed.contiguous(), "tokens": index.tokens.contiguous(),
        "model": str(model_dir.resolve()), "images": str(folder.resolve()),
    }
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)


def load_index(path: Path, key: str) -> tuple[ImageIndex | None, str]:
    """The index in ``path`` when it was built for ``key``; else ``(None, why it is rebuilt)``.

    The file is read as data (``torch.load(weights_only=True)``); a missing, unreadable,
    foreign or stale file is not an error, only a reason to rebuild.
    """
    import torch

    if not path.is_file():
        return None, ""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt, never trusted
        return None, f" (the old index {path} could not be read: {type(exc).__name__})"
    if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT:
        return None, f" ({path} is not an index of this fusionzoo version)"
    if payload.get("key") != key:
        return None, " (the images or the model changed)"
    paths, embed, tokens = payload.get("paths"), payload.get("embed"), payload.get("tokens")
    if not (isinstance(paths, list) and paths and isinstance(embed, torch.Tensor) and isinstance(tokens, torch.Tensor)
            and embed.ndim == 2 and tokens.ndim == 3 and len(embed) == len(tokens) == len(paths)):
        return None, f" ({path} is incomplete)"
    return ImageIndex(key=key, paths=[str(p) for p in paths], embed=embed.float(), tokens=tokens,
                      skipped=[str(p) for p in payload.get("skipped", [])], path=path, reused=True), ""


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------
def _text_states(model: FusionModel, text: str) -> tuple[Tensor, Tensor]:
    """(1, T, Dt) text states and their (1, T) bool mask for one query (no padding)."""
    batch = model.text.tokenize([text], max_length=model.max_text_len)
    ids = batch["input_ids"].to(model.device)  # (1, T)
    mask = batch["attention_mask"].to(model.device)  # (1, T)
    return model.text(ids, mask).states, mask.bool()


def search(model: FusionModel, index: ImageIndex, query: str, *, top: int, rerank_k: int,
           batch_size: int) -> list[dict[str, Any]]:
    """The ``top`` best images of ``index`` for ``query``, best first.

    Shortlists ``max(rerank_k, top)`` images by ITC cosine and sorts them by ITM log-odds
    (ties keep the ITC order); ``rerank_k=0`` ranks by ITC alone.

    Returns:
        ``[{"path": relative path, "itm": match probability or None, "itc": cosine}, ...]``.
    """
    import torch

    from ..tasks.retrieval_eval import top_k_chunked

    states, mask = _text_states(model, query)  # (1, T, Dt), (1, T)
    query_embed = model.embed_text_states(states, mask).float().cpu()  # (1, E)
    n_images = len(index.paths)
    k = min(n_images, max(rerank_k, top) if rerank_k > 0 else top)
    shortlist, itc = top_k_chunked(query_embed, index.embed, k)  # (1, k) image indices, (1, k) cosines
    shortlist, itc = shortlist[0], itc[0]  # (k,), (k,)
    if rerank_k == 0:
        return [{"path": index.paths[i], "itm": None, "itc": float(c)} for i, c in zip(shortlist.tolist(), itc)]
    log_odds = torch.empty(k, dtype=torch.float32)  # (k,)
    for start in range(0, k, batch_size):
        rows = shortlist[start:start + batch_size]  # (b,)
        b = len(rows)
        image = index.tokens[rows].to(model.device, model.dtype)  # (b, N, Di)
        scores = model.match_states(states.expand(b, -1, -1), mask.expand(b, -1), image)  # (b,)
        log_odds[start:start + b] = scores.float().cpu()
    order = torch.sort(log_odds, descending=True, stable=True).indices[:top]  # (min(top, k),)
    itm = torch.sigmoid(log_odds)  # (k,)
    return [{"path": index.paths[int(shortlist[j])], "itm": float(itm[j]), "itc": float(itc[j])}
            for j in order.tolist()]
