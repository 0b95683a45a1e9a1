"""Loading user code that registers fusions, heads, encoders or tasks.

Three ways to bring outside code into the zoo:

1. ``import my_fusions`` in your own script before ``fusionzoo.create_model``;
2. ``fusionzoo --import my_fusions ...`` or ``--import path/to/my_fusion.py`` on the
   command line (repeatable), or the ``FUSIONZOO_PLUGINS`` environment variable
   holding such entries separated by ``os.pathsep``;
3. an installed package with an entry point in the group ``fusionzoo.fusions``
   (loaded by the registry itself, see :mod:`fusionzoo.registry`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ENV_VAR = "FUSIONZOO_PLUGINS"


def import_plugin(target: str) -> ModuleType:
    """Import a module by dotted name, or a ``.py`` file by path, and return it.

    Raises:
        FileNotFoundError: a path ending in ``.py`` does not exist.
        ImportError: the module cannot be imported (the message names ``target``).
    """
    if target.endswith(".py") or os.sep in target or (os.altsep and os.altsep in target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {target!r} not found (resolved to {path})")
        # A stable, unique module name per file, so importing twice is a no-op.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"fusionzoo_plugin_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import plugin file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ImportError(f"cannot import plugin module {target!r}: {exc}") from exc


def import_plugins(targets: list[str] | None = None, use_env: bool = True) -> list[ModuleType]:
    """Import every target plus those in ``$FUSIONZOO_PLUGINS``; return the modules."""
    items = list(targets or [])
    if use_env:
        items += [t for t in os.environ.get(ENV_VAR, "").split(os.pathsep) if t.strip()]
    return [import_plugin(t.strip()) for t in items]
