"""Models on the Hugging Face Hub: a repo id resolved to a cached folder, a folder uploaded to a repo.

* :func:`resolve_model_folder` turns what a user passes to ``load_model`` / ``init_from`` into a
  local folder: an existing path as it is, else a Hub repo id (``owner/name``, optionally
  ``owner/name@revision``) through ``huggingface_hub.snapshot_download``, which keeps the files in
  the Hub cache (``HF_HUB_CACHE``) and, with ``HF_HUB_OFFLINE=1``, reads only that cache.
* :func:`upload_model_folder` creates the repo if needed and uploads a saved folder with
  ``huggingface_hub.upload_folder`` (one commit).

Both call ``huggingface_hub``'s functions through the module, so a test can patch them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from .errors import CheckpointError, MissingModelFileError
from .version import __version__

#: ``owner/name`` with the Hub's characters, and an optional ``@revision``.
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[^\s@]+))?$")
#: What a saved model folder holds that is worth fetching (the card and run.json included).
MODEL_FILES = ["config.json", "model.safetensors", "README.md", "run.json", "text_encoder/*", "tokenizer/*"]


def is_repo_id(reference: str | os.PathLike) -> bool:
    """Whether ``reference`` reads as ``owner/name[@revision]`` and is no existing path."""
    return not Path(reference).exists() and REPO_ID.match(os.fspath(reference)) is not None


def resolve_model_folder(reference: str | os.PathLike) -> Path:
    """A local folder for ``reference``: the path itself when it exists, else the Hub snapshot of a repo id.

    Raises:
        MissingModelFileError: neither a path nor a repo id, or a repo id that cannot be had:
            offline (``HF_HUB_OFFLINE=1``) and not in the cache, no such repo, no network. The
            message names the reference and what to do.
    """
    if Path(reference).exists() or not is_repo_id(reference):
        return Path(reference)
    match = REPO_ID.match(os.fspath(reference))
    repo, revision = match["repo"], match["revision"]
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES,
                                                   library_name="fusionzoo", library_version=__version__)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise MissingModelFileError(
            f"{reference}: no such local folder, and the Hub repo {repo} is not in the Hub cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) while the Hub cannot be reached or HF_HUB_OFFLINE=1 "
            f"({type(exc).__name__}); download it once where there is a network, or pass a local folder"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise MissingModelFileError(f"{reference}: no such local folder, and the Hub did not give repo {repo}"
                                    f"{'@' + revision if revision else ''}: {type(exc).__name__}: {exc}") from exc
    return Path(folder)


def upload_model_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                        token: str | None = None, commit_message: str | None = None) -> str:
    """Upload a saved model folder to the Hub repo ``repo_id`` (created if missing); returns the commit's URL.

    Raises:
        CheckpointError: ``repo_id`` is not ``owner/name`` or the folder has no config.json;
            the Hub's refusal (no token, no rights) passes through as it is.
    """
    folder = Path(folder)
    if REPO_ID.match(repo_id) is None or "@" in repo_id:
        raise CheckpointError(f"{repo_id!r} is not a Hub repo id: expected owner/name")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a saved model: no config.json (save_pretrained writes one)")
    huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True)
    info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                         commit_message=commit_message or f"Upload fusionzoo model ({__version__})",
                                         ignore_patterns=[".*", "**/.*"])
    return str(getattr(info, "commit_url", info))
