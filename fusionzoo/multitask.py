"""One model for several tasks: shared encoders and fusion, one head per task.

The multi-task setting of UniT (Hu & Singh 2021) and 12-in-1 (Lu et al. 2020),
in the zoo's terms: every task's model is an ordinary
:class:`~fusionzoo.model.FusionModel` (so evaluation, ``predict``, ``generate`` and
``explain`` work on it unchanged), and the :class:`MultiTaskModel` holds them with
their image encoder, text encoder and fusion being the *same* modules::

    image, text --vision, text--> states --fusion--+--head "vqa"--------> answers
                                                   +--head "captioning"--> captions

* Parameters are counted once (``named_parameters`` lists ``vision.*``, ``text.*``,
  ``fusion.*`` and ``heads.<task>.*``), so one optimizer step on any task's loss moves the
  shared parts every task reads.
* A task that writes text (captioning) needs a causal text encoder, so when one is in the
  set the shared text encoder is built causal and the other tasks read their text left to
  right too (their fusion still attends both ways).
* Saved as one folder per task plus ``multitask.json`` (:func:`save_multitask`): each
  ``<dir>/<task>/`` is a complete model folder that ``load_model`` and every command read
  alone (the shared weights are therefore stored once per task), and
  :func:`load_multitask_model` puts them back together, checking that the shared parts are
  identical.
* Tasks that embed images and texts apart (retrieval) train with their own recipe and are
  not combined here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import ModelFolderError
from .factory import _fusion_kwargs_for_head, create_model
from .io import write_json_atomic
from .model import FusionModel, ModelOutput, load_model
from .model_config import check_vocabulary, model_config
from .model_folder import MULTITASK_NAME, read_json_object
from .registry import FUSIONS, HEADS, TASKS
from .version import __version__

#: The parts every task's model shares, by attribute name.
SHARED_PARTS = ("vision", "text", "fusion")
#: Version of the ``multitask.json`` layout.
MULTITASK_FORMAT = 1


def split_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"vqa+captioning"`` (or a list) -> ``["vqa", "captioning"]``; each a registered task, none twice.

    Raises:
        ValueError: an empty name, a task named twice, or fewer than two tasks.
        RegistryError: an unknown task (with the closest names).
    """
    names = [n.strip() for n in spec.split("+")] if isinstance(spec, str) else [str(n) for n in spec]
    if any(not n for n in names):
        raise ValueError(f"task={spec!r}: an empty task name; expected names joined by '+' (vqa+captioning)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task={spec!r} names {', '.join(repeated)} more than once")
    if len(names) < 2:
        raise ValueError(f"task={spec!r}: a multi-task model has two or more tasks joined by '+'")
    for name in names:
        TASKS.get(name)
    return names


class MultiTaskModel(nn.Module):
    """Several :class:`~fusionzoo.model.FusionModel` s that share their encoders and fusion.

    Args:
        models: task name -> that task's model; every one must hold the same ``vision``,
            ``text`` and ``fusion`` module objects (:func:`create_multitask_model` builds them so).
    """

    def __init__(self, models: Mapping[str, FusionModel]) -> None:
        super().__init__()
        if len(models) < 2:
            raise ValueError(f"a MultiTaskModel has two or more tasks, got {list(models)}")
        first = next(iter(models.values()))
        for name, model in models.items():
            if model.task != name:
                raise ValueError(f"the model given for task {name!r} is a {model.task!r} model")
            for part in SHARED_PARTS:
                if getattr(model, part) is not getattr(first, part):
                    raise ValueError(f"the {name!r} model has its own {part}; every task's model must share "
                                     f"the same {', '.join(SHARED_PARTS)} modules")
            if model.align is not None:
                raise ValueError(f"task {name!r} embeds images and texts apart (an Alignment); "
                                 "it trains with its own recipe and is not combined in a MultiTaskModel")
        self.vision, self.text, self.fusion = first.vision, first.text, first.fusion
        self.heads = nn.ModuleDict({name: model.head for name, model in models.items()})
        # the task models are views over these modules, not submodules (each parameter is registered once)
        object.__setattr__(self, "_models", dict(models))

    @property
    def tasks(self) -> list[str]:
        return list(self._models)

    def model(self, task: str) -> FusionModel:
        """The model of ``task``: a FusionModel whose encoders, fusion and head are this model's own modules."""
        if task not in self._models:
            raise KeyError(f"this multi-task model has no task {task!r}; it has {', '.join(self._models)}")
        return self._models[task]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, task: str, **inputs: Any) -> ModelOutput:
        """``task``'s forward pass (:meth:`FusionModel.forward` of its model) on one batch of that task."""
        return self.model(task)(**inputs)

    def train(self, mode: bool = True) -> "MultiTaskModel":
        super().train(mode)  # the shared modules and heads (a frozen encoder keeps its eval mode)
        for model in self._models.values():
            model.training = mode  # the views' own flag; their modules are the ones set above
        return self

    def set_output_ids(self, task: str, output_ids: Sequence[int]) -> None:
        """:meth:`FusionModel.set_output_ids` for ``task``'s head (a text-writing task), kept registered here."""
        model = self.model(task)
        model.set_output_ids(output_ids)
        self.heads[task] = model.head

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write every task's model folder and ``multitask.json``; see :func:`save_multitask`."""
        return save_multitask(self, directory)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def create_multitask_model(
    tasks: str | Sequence[str],
    fusion: str,
    vision: str | dict[str, Any] = "tiny",
    text: str | dict[str, Any] = "tiny",
    *,
    pretrained: bool = True,
    freeze_encoders: bool = False,
    vocabularies: Mapping[str, Sequence[str]] | None = None,
    fusion_kwargs: dict[str, Any] | None = None,
    head_kwargs: Mapping[str, dict[str, Any]] | None = None,
    max_text_len: int = 32,
) -> MultiTaskModel:
    """A new :class:`MultiTaskModel`: one encoder pair and fusion (as :func:`~fusionzoo.factory.create_model`
    builds them), one head per task.

    Args:
        tasks: registered tasks, ``"vqa+captioning"`` or a list.
        fusion, vision, text, pretrained, freeze_encoders, fusion_kwargs, max_text_len: as ``create_model``.
            A fusion with ``supports_head_reads`` is built with ``head_reads="all"`` when the heads
            read different parts of its output.
        vocabularies: task -> its output vocabulary (answers, labels) for the tasks that have one.
        head_kwargs: task -> that head's keywords.
    Raises:
        ValueError: see :func:`split_tasks`; a task that embeds apart (retrieval); a missing vocabulary;
            ``vocabularies`` / ``head_kwargs`` naming a task not in ``tasks``.
    """
    names = split_tasks(tasks)
    vocabularies, head_kwargs = dict(vocabularies or {}), dict(head_kwargs or {})
    for key, given in (("vocabularies", vocabularies), ("head_kwargs", head_kwargs)):
        extra = sorted(set(given) - set(names))
        if extra:
            raise ValueError(f"{key} names {', '.join(extra)}, which is not among the tasks {names}")
    specs = {name: TASKS.get(name) for name in names}
    aligning = [name for name, spec in specs.items() if spec.aligns]
    if aligning:
        raise ValueError(f"task {aligning[0]!r} embeds images and texts apart and trains with its own recipe; "
                         "a multi-task model combines tasks with a head on the fusion (vqa, captioning, "
                         "classification, ...)")
    heads = {name: HEADS.get(spec.head) for name, spec in specs.items()}
    fusion_kwargs = dict(fusion_kwargs or {})
    fusion_cls = FUSIONS.get(fusion)
    if getattr(fusion_cls, "supports_head_reads", False) and "head_reads" not in fusion_kwargs:
        reads = {getattr(head, "reads", "all") for head in heads.values()}
        if len(reads) > 1:
            fusion_kwargs["head_reads"] = "all"  # every head must find what it reads
    for name in names:
        _fusion_kwargs_for_head(fusion_cls, heads[name], fusion_kwargs)  # a head_reads leaving one out fails

    def vocabulary_of(name: str) -> dict[str, Any]:
        key = specs[name].vocabulary_key
        return {key: vocabularies.get(name)} if key else {}

    # The first task that writes text builds the shared parts: its text encoder is causal.
    lead = next((name for name in names if getattr(heads[name], "causal", False)), names[0])
    first = create_model(lead, fusion, vision, text, pretrained=pretrained, freeze_encoders=freeze_encoders,
                         fusion_kwargs=fusion_kwargs, head_kwargs=head_kwargs.get(lead), max_text_len=max_text_len,
                         **vocabulary_of(lead))
    models = {}
    for name in names:
        if name == lead:
            models[name] = first
            continue
        spec = specs[name]
        vocabulary = check_vocabulary(name, spec.vocabulary_key, vocabulary_of(name))
        kwargs = dict(head_kwargs.get(name) or {})
        head = heads[name].from_parts(first.fusion, first.text, vocabulary, **kwargs).to(first.device)
        config = model_config(name, fusion, first.fusion, first.vision, first.text, max_text_len=max_text_len,
                              freeze_encoders=freeze_encoders, head_kwargs=kwargs, vocabulary=vocabulary)
        models[name] = FusionModel(first.vision, first.text, first.fusion, head, config)
    return MultiTaskModel({name: models[name] for name in names})


# -- the saved folder ------------------------------------------------------------------------


def save_multitask(model: MultiTaskModel, directory: str | os.PathLike) -> Path:
    """Write ``<directory>/<task>/`` (a complete model folder each) and then ``multitask.json``.

    ``multitask.json`` is removed first and written last, so a folder interrupted mid-save does
    not load as a multi-task model (each task folder is itself written atomically).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MULTITASK_NAME).unlink(missing_ok=True)
    for name in model.tasks:
        model.model(name).save_pretrained(directory / name)
    write_json_atomic(directory / MULTITASK_NAME, {
        "format_version": MULTITASK_FORMAT, "fusionzoo_version": __version__, "tasks": model.tasks,
        "shared": list(SHARED_PARTS)})
    return directory


def is_multitask_folder(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MULTITASK_NAME).is_file()


def read_multitask(directory: str | os.PathLike) -> list[str]:
    """The tasks ``multitask.json`` lists, each with its folder; a ModelFolderError naming the key otherwise."""
    path = Path(directory) / MULTITASK_NAME
    if not path.is_file():
        raise ModelFolderError(f"{directory} is not a multi-task model: no {MULTITASK_NAME} there")
    spec = read_json_object(path)
    version = spec.get("format_version")
    if not isinstance(version, int) or version > MULTITASK_FORMAT:
        raise ModelFolderError(f"{path}: key 'format_version' is {version!r}; this fusionzoo reads "
                               f"{MULTITASK_FORMAT} (upgrade fusionzoo)")
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or len(tasks) < 2 or not all(isinstance(t, str) and t for t in tasks):
        raise ModelFolderError(f"{path}: key 'tasks' must list two or more task names, got {tasks!r}")
    for name in tasks:
        if not (Path(directory) / name / "config.json").is_file():
            raise ModelFolderError(f"{path}: key 'tasks' names {name!r}, but {Path(directory) / name} holds no "
                                   "saved model (config.json)")
    return tasks


def load_multitask_model(directory: str | os.PathLike, device: str | torch.device | None = None) -> MultiTaskModel:
    """The :class:`MultiTaskModel` saved by :func:`save_multitask`, its shared parts one set of modules again.

    Raises:
        ModelFolderError: ``multitask.json`` is missing or wrong (the key is named), a task folder is
            missing, or the task folders' shared parts (encoders, fusion) differ; and whatever
            :func:`~fusionzoo.model.load_model` raises for a task folder.
    """
    tasks = read_multitask(directory)
    loaded = {name: load_model(Path(directory) / name) for name in tasks}
    first = loaded[tasks[0]]
    models = {tasks[0]: first}
    for name in tasks[1:]:
        other = loaded[name]
        for part in SHARED_PARTS:
            mine, theirs = getattr(first, part).state_dict(), getattr(other, part).state_dict()
            if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
                raise ModelFolderError(f"{Path(directory) / name}: its {part} differs from that of "
                                       f"{Path(directory) / tasks[0]}; the tasks of a multi-task model share it")
        head = type(other.head).from_parts(first.fusion, first.text, other.vocabulary, **other.config["head"]["kwargs"])
        head.load_state_dict(other.head.state_dict())
        models[name] = FusionModel(first.vision, first.text, first.fusion, head, other.config)
    model = MultiTaskModel(models)
    if device is not None:
        model.to(device)
    return model.eval()
