"""Registries: name -> class or builder, for fusions, heads, encoders and tasks.

Follows timm's registry (``register_model`` / ``list_models("vit_*")``) with the
lessons users learned from MMF and LAVIS: an unknown name is an error that lists
what exists and the closest matches (never ``None``), and registering a name
twice is an error unless ``override=True`` is asked for.

Outside code adds entries two ways:

* decorate a class in its own module with ``@fusionzoo.register_fusion("name")``
  and import that module before building a model;
* ship an installed package that declares an entry point in the group
  ``fusionzoo.fusions`` (``fusionzoo.heads``, ``fusionzoo.vision_encoders``, ``fusionzoo.text_encoders``,
  ``fusionzoo.tasks`` for the others). Entry points are loaded lazily, the first
  time a registry is listed or an unknown name is looked up.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata
import logging
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import FusionZooError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(FusionZooError, KeyError):
    """Raised for an unknown or duplicate registry name.

    A ``KeyError`` subclass so ``except KeyError`` still works, with a readable
    message (``KeyError`` alone would print the message in quotes).
    """

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named collection of classes or builder functions.

    Args:
        kind: what the entries are, used in error messages ("fusion", "head", ...).
        entry_point_group: ``importlib.metadata`` entry-point group scanned for
            entries that installed packages contribute.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False
        self._builtins_loaded = builtins is None

    def _load_builtins(self) -> None:
        """Import the module that registers the built-in entries, once, on first use.

        ``import fusionzoo`` stays light (no torch, no transformers), so ``fusionzoo
        --help`` answers at once; the built-ins arrive the first time a registry is
        read or written.
        """
        if self._builtins_loaded:
            return
        self._builtins_loaded = True  # set first: the import below registers into this registry
        try:
            importlib.import_module(self.builtins)  # type: ignore[arg-type]
        except BaseException:
            self._builtins_loaded = False
            raise

    # -- registration -------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, override: bool = False):
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``.

        Raises:
            RegistryError: ``name`` already exists and ``override`` is False.
            ValueError: ``name`` is empty or has characters other than
                letters, digits, ``_``, ``-`` and ``.``.
        """
        if not isinstance(name, str) or not name or not all(
            c.isalnum() or c in "_-." for c in name
        ):
            raise ValueError(
                f"{self.kind} name must be a non-empty string of letters, digits, '_', '-' "
                f"or '.', got {name!r}"
            )

        self._load_builtins()  # so a user's name that clashes with a built-in is caught now

        def decorator(target: T) -> T:
            if name in self._entries and not override:
                existing = self._entries[name]
                raise RegistryError(
                    f"a {self.kind} named {name!r} is already registered "
                    f"({_describe(existing)}); pass override=True to replace it"
                )
            self._entries[name] = target
            # Remember the registry name on the class, so a built module can say
            # which entry it came from (used by save_pretrained).
            try:
                setattr(target, "registry_name", name)
            except (AttributeError, TypeError):
                pass
            return target

        if obj is not None:
            return decorator(obj)
        return decorator

    def unregister(self, name: str) -> T:
        """Remove and return an entry (mainly for tests and notebooks)."""
        self._load_builtins()
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries.pop(name)

    # -- lookup -------------------------------------------------------------
    def get(self, name: str) -> T:
        """Return the entry for ``name``.

        Raises:
            RegistryError: with the registered names and the closest matches.
        """
        self._load_builtins()
        if name not in self._entries:
            self._load_entry_points()
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries[name]

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard ``pattern``."""
        self._load_builtins()
        self._load_entry_points()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"

    # -- internals ----------------------------------------------------------
    def _unknown(self, name: str) -> RegistryError:
        names = sorted(self._entries)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: "
            f"{', '.join(names) if names else '(none)'}."
        )

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.entry_point_group is None:
            return
        self._load_builtins()
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue  # an explicit registration wins over the entry point
            try:
                target = ep.load()
            except Exception as exc:  # a broken plug-in must not break the zoo
                logger.warning(
                    "could not load %s %r from entry point %s: %s", self.kind, ep.name, ep.value, exc
                )
                continue
            # Loading the module may have registered it through the decorator.
            if ep.name not in self._entries:
                self.register(ep.name, target)


def _describe(obj: Any) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", repr(obj))
    return f"{module}.{qualname}"


# Each registry imports the module holding its built-in entries on first use.
FUSIONS: Registry[type] = Registry("fusion", "fusionzoo.fusions", builtins="fusionzoo.fusions")
HEADS: Registry[type] = Registry("head", "fusionzoo.heads", builtins="fusionzoo.heads")
VISION_ENCODERS: Registry[Callable[..., Any]] = Registry(
    "vision encoder preset", "fusionzoo.vision_encoders", builtins="fusionzoo.encoders")
TEXT_ENCODERS: Registry[Callable[..., Any]] = Registry(
    "text encoder preset", "fusionzoo.text_encoders", builtins="fusionzoo.encoders")
TASKS: Registry[Any] = Registry("task", "fusionzoo.tasks", builtins="fusionzoo.tasks")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "fusionzoo.datasets", builtins="fusionzoo.data")
#: Training recipes (``fusionzoo.training.loop.Recipe`` subclasses) by name; a task names its own (``Task.recipe``).
RECIPES: Registry[type] = Registry("recipe", "fusionzoo.recipes", builtins="fusionzoo.training.recipes")


def register_fusion(name: str, *, override: bool = False):
    """Class decorator: make a :class:`~fusionzoo.fusions.base.FusionModule` buildable by name."""
    return FUSIONS.register(name, override=override)


def register_head(name: str, *, override: bool = False):
    """Class decorator for task heads (``vqa``, ``captioning``, ``classification``, ...)."""
    return HEADS.register(name, override=override)


def register_vision_encoder(name: str, *, override: bool = False):
    """Decorator for a vision-encoder preset builder ``fn(**kw) -> VisionEncoder``."""
    return VISION_ENCODERS.register(name, override=override)


def register_text_encoder(name: str, *, override: bool = False):
    """Decorator for a text-encoder preset builder ``fn(**kw) -> TextEncoder``."""
    return TEXT_ENCODERS.register(name, override=override)


def register_task(name: str, *, override: bool = False):
    """Decorator for a task (data, collate and metrics) definition."""
    return TASKS.register(name, override=override)


def register_recipe(name: str, *, override: bool = False):
    """Class decorator for a training recipe that a task names in ``Task.recipe``."""
    return RECIPES.register(name, override=override)


def register_dataset(name: str, *, override: bool = False):
    """Decorator for a dataset loader (``easy-vqa``, ``vqa-v2``, ``coco-captions``, ...)."""
    return DATASETS.register(name, override=override)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.list(pattern)


def list_fusions(pattern: str = "*") -> list[str]:
    """Registered fusion names matching ``pattern`` (``fnmatch`` wildcards)."""
    return FUSIONS.list(pattern)


def list_heads(pattern: str = "*") -> list[str]:
    return HEADS.list(pattern)


def list_tasks(pattern: str = "*") -> list[str]:
    return TASKS.list(pattern)


def list_encoders(pattern: str = "*") -> dict[str, list[str]]:
    """Encoder presets by modality: ``{"vision": [...], "text": [...]}``."""
    return {"vision": VISION_ENCODERS.list(pattern), "text": TEXT_ENCODERS.list(pattern)}
