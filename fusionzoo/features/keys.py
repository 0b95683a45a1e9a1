"""Keys of the feature cache: what an entry's features depend on, hashed.

:func:`cache_key` hashes (blake2b) three things: the encoder's *weights*
(:func:`fingerprint_module`: every tensor of its state dict, bytes included) and
architecture description, the *preprocessing* (the image data config -- size,
interpolation, mean, std, crop -- or the tokenizer's vocabulary, lowercasing and maximum
length, the causal flag), and the *inputs* (the bytes of each image file, in order
(:func:`fingerprint_files`), or the text strings themselves (:func:`fingerprint_texts`)).
Changing any of them gives a new key, so stale features are never read. Where things are
installed is not part of the key: the same encoder and images in another checkout or
virtual environment find the same entries.

torch is imported only inside :func:`fingerprint_module`, where a module is hashed.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .layout import CACHE_FORMAT, canonical

if TYPE_CHECKING:  # torch is imported where a module is hashed: listing the cache needs none
    from torch import nn

#: Fields of an encoder description that say where its files were read from, not what they
#: hold: a transformers config's ``_name_or_path`` is the folder of the weights (inside the
#: virtual environment for an installed preset). The weights digest identifies the files'
#: contents, so these fields are left out of the key.
LOCATION_FIELDS = frozenset({"_name_or_path", "name_or_path"})


def fingerprint_module(module: nn.Module) -> str:
    """Hex digest of every tensor (name, dtype, shape, bytes) in ``module.state_dict()``.

    Buffers count too (BatchNorm running statistics change the outputs).
    """
    import torch

    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str], read_bytes: Callable[[str], bytes] | None = None) -> str:
    """Hex digest of the files' contents, in order; not of their paths or modification times.

    ``read_bytes`` reads what a path stands for when it is not a file (an image stored inside
    a ``datasets`` table or a tar shard, named by a reference its opener understands).

    Where a file lies does not matter, so the same images in another checkout, virtual
    environment or data folder give the same key (easy-VQA's images live inside its
    installed package, and pip stamps every installed file with the install time). A file
    rewritten with other bytes gets a new digest. Reading the bytes costs a small fraction
    of decoding the images, which a miss does anyway.
    """
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        file_digest = hashlib.blake2b(digest_size=20)
        if read_bytes is not None:
            file_digest.update(read_bytes(path))
        else:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    file_digest.update(block)
        digest.update(file_digest.digest())  # fixed width: one file's bytes never run into the next
    return digest.hexdigest()


def fingerprint_texts(texts: Iterable[str]) -> str:
    """Hex digest of an ordered list of strings."""
    digest = hashlib.blake2b(digest_size=20)
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        digest.update(encoded)
    return digest.hexdigest()


def _without_locations(value: Any) -> Any:
    """``value`` without :data:`LOCATION_FIELDS`, also inside a JSON object held as text (a config's JSON)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return _without_locations(parsed) if isinstance(parsed, dict) else value
    if isinstance(value, Mapping):
        return {k: _without_locations(v) for k, v in value.items() if k not in LOCATION_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_without_locations(v) for v in value]
    return value


def cache_key(encoder: Mapping[str, Any], preprocessing: Mapping[str, Any], inputs: str) -> str:
    """The cache key: a hex digest over the encoder, the preprocessing and the inputs.

    Args:
        encoder: what identifies the encoder: at least ``weights`` (a
            :func:`fingerprint_module` digest) and its ``spec``; fields that
            name the folder it was loaded from (:data:`LOCATION_FIELDS`) are ignored.
        preprocessing: everything that turns an input into the encoder's input
            (image data config; tokenizer settings; causal flag; stored dtype).
        inputs: a digest of the inputs (:func:`fingerprint_files` / :func:`fingerprint_texts`).
    Returns:
        40 hex characters; equal only when all three parts are equal.
    """
    payload = json.dumps(
        {"format": CACHE_FORMAT, "encoder": canonical(_without_locations(encoder)),
         "preprocessing": canonical(_without_locations(preprocessing)), "inputs": inputs},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()
