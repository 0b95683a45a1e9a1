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
import traceback
from pathlib import Path
from types import ModuleType

from .errors import FusionZooError

ENV_VAR = "FUSIONZOO_PLUGINS"


class PluginError(FusionZooError, ImportError):
    """A plug-in that cannot be imported: the message names the file (and line) or module, and the error."""


class PluginNotFoundError(FusionZooError, FileNotFoundError):
    """A plug-in ``.py`` path that does not exist."""


def _describe(exc: BaseException, target: str, path: Path | None) -> str:
    """One line for an error raised while importing ``target``: where, then what.

    A syntax error in the plug-in itself reads ``plugin.py, line 1: invalid syntax: <the line>``;
    any other error ``plugin.py, line 3: ModuleNotFoundError: No module named 'x'``, the line
    being the plug-in's own line the error came through (when it came through one).
    """
    if isinstance(exc, SyntaxError) and (path is None or exc.filename in (None, str(path))):
        where = target if path is not None else (exc.filename or target)
        line = f", line {exc.lineno}" if exc.lineno else ""
        text = (exc.text or "").strip()
        return f"{where}{line}: {exc.msg}" + (f": {text}" if text else "")
    where = target
    if path is not None:
        lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == str(path)]
        if lines:
            where = f"{target}, line {lines[-1]}"
    else:
        where = f"plugin module {target!r}"
    message = str(exc).strip().splitlines()
    return f"{where}: {type(exc).__name__}" + (f": {message[0]}" if message else "")


def import_plugin(target: str) -> ModuleType:
    """Import a module by dotted name, or a ``.py`` file by path, and return it.

    Raises:
        PluginNotFoundError: a path ending in ``.py`` does not exist (a ``FileNotFoundError``).
        PluginError: the module cannot be imported, or raised an error while it ran (an
            ``ImportError``); the one-line message names ``target``, the line and the error.
    """
    if target.endswith(".py") or os.sep in target or (os.altsep and os.altsep in target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PluginNotFoundError(f"plugin file {target!r} not found (resolved to {path})")
        # A stable, unique module name per file, so importing twice is a no-op.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"fusionzoo_plugin_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"cannot import plugin file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise PluginError(_describe(exc, target, path)) from exc
        except BaseException:  # KeyboardInterrupt, SystemExit: not the plug-in's error to report
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise PluginError(f"cannot import plugin module {target!r}: {exc}") from exc
    except Exception as exc:
        raise PluginError(_describe(exc, target, None)) from exc


def import_plugins(targets: list[str] | None = None, use_env: bool = True) -> list[ModuleType]:
    """Import every target plus those in ``$FUSIONZOO_PLUGINS``; return the modules."""
    items = list(targets or [])
    if use_env:
        items += [t for t in os.environ.get(ENV_VAR, "").split(os.pathsep) if t.strip()]
    return [import_plugin(t.strip()) for t in items]
