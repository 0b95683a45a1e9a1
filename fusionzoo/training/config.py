"""Run configuration: one typed dataclass, read from YAML and ``key=value`` overrides.

``fusionzoo train CONFIG.yaml lr=3e-4 fusion=albef fusion_kwargs.num_layers=4``:
the YAML file (optional) is read first, then each override in order. Every key is
checked against :class:`TrainConfig`; an unknown key is an error that names the
file (or the command line), the key, and the closest known keys; a value of the
wrong type names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..errors import ConfigError  # noqa: F401  (raised here for config keys; importable from here too)

#: The ``torch.compile`` modes that key ``compile`` may name besides true / false (true is ``default``).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class TrainConfig:
    """Everything a training, evaluation or pretraining run needs. Saved in every checkpoint."""

    # what to build
    task: str = "vqa"
    """``vqa``, ``captioning`` or ``classification`` (a registered task); several joined by ``+``
    (``vqa+captioning``) train one model with a head per task (``fusionzoo.training.multitask``)."""
    task_weights: str = "proportional"
    """Several tasks: which task each batch comes from. ``proportional``: every batch of every task
    once per epoch, in a seeded random order (each task in proportion to its batches);
    ``vqa:1,captioning:3``: each batch's task drawn with those weights (an epoch is as many batches
    as all tasks have; a task's loader starts again when it runs out)."""
    task_data: dict = field(default_factory=dict)
    """Several tasks: per-task values of the data keys (``data``, ``data_dir``, ``data_files``,
    ``data_kwargs``, ``split``, ``eval_split``, ``max_train_samples``, ``max_eval_samples``, ``head_kwargs``),
    e.g. ``task_data.vqa={data: vqa-jsonl, data_dir: d1}``. ``data=a+b`` names one dataset per task."""
    fusion: str = "merged_transformer"
    """A registered fusion name (``fusionzoo list``)."""
    fusion_kwargs: dict = field(default_factory=dict)
    """Hyperparameters of the fusion module (``dim``, ``num_layers``, ...)."""
    head_kwargs: dict = field(default_factory=dict)
    """Hyperparameters of the head."""
    vision: str = "efficientnet-lite0"
    """Vision encoder preset, timm model name, or ``tiny``."""
    text: str = "minilm-l6"
    """Text encoder preset, hub id or local folder, or ``tiny``."""
    init_from: str | None = None
    """A saved model or ALBEF pretraining output to initialise from (matching weights are loaded)."""
    freeze_encoders: bool | Literal["vision", "text"] = True
    """Keep the image and text encoders fixed (their features can then be cached); ``vision`` or
    ``text``: keep only that one fixed and fine-tune the other (``fusionzoo train``)."""
    peft: Literal["none", "lora"] = "none"
    """Parameter-efficient fine-tuning: ``lora`` adds LoRA adapters (the ``peft`` library) to
    ``lora_targets`` and freezes their base weights; ``freeze_encoders`` is then ignored (encoders
    not in ``lora_targets`` stay frozen) and the final model saves the adapters alone."""
    lora_r: int = 8
    """LoRA rank of each adapted layer's update."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is multiplied by ``lora_alpha / lora_r``."""
    lora_dropout: float = 0.0
    """Dropout on an adapted layer's input to its LoRA update."""
    lora_targets: str = "vision,text"
    """Comma-separated parts that get adapters: vision, text, fusion (their Linear and 1-group Conv2d layers)."""
    lora_merge: bool = False
    """Save the final model with the adapters folded into the weights (an ordinary folder) instead."""
    max_text_len: int = 32

    # data
    data: str = "easy-vqa"
    """A registered dataset name (``easy-vqa``, ``vqa-jsonl``, ...) or a path."""
    data_dir: str | None = None
    """Root folder of the dataset files, for datasets that need one."""
    data_files: str | list | dict | None = None
    """The dataset's files instead of those found in ``data_dir``: a path, glob or brace list
    (``shards/{0000..0003}.tar``), a list, or ``{split: files}``; webdataset sources mix with
    ``a/{0..3}.tar::0.7,b/{0..1}.tar::0.3`` (the README's data sources section)."""
    data_kwargs: dict = field(default_factory=dict)
    """Options of the dataset loader, e.g. ``data_kwargs.caption_column=text``,
    ``data_kwargs.streaming=true``, ``data_kwargs.shuffle_buffer=5000`` (an unknown one is an error)."""
    split: str = "test"
    """The split ``eval`` scores."""
    train_split: str = "train"
    eval_split: str | None = None
    """Split evaluated during training (``None``: the dataset's validation or test split)."""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    answers_top_k: int = 3129
    answers_min_count: int = 1
    skip_bad: bool = False
    """Skip bad entries (missing keys, unsafe paths, undecodable images, in training and evaluation) and
    report how many, instead of stopping."""
    verify_images: bool = False
    """Decode every image once when the data is loaded (bad ones are errors, or skipped with skip_bad)."""
    only_present: bool = False
    """Use only the images found on disk when annotations cover more."""
    num_workers: int = 0
    feature_cache: bool | None = None
    """With frozen encoders, read image tokens (and text states) from the on-disk feature cache,
    extracting them once (``fusionzoo.features``): ``null`` (default) where the data and task
    allow it, ``true`` insists (an error says why it cannot), ``false`` encodes every step."""
    cache_dir: str | None = None
    """Folder of the feature cache (default ``$FUSIONZOO_CACHE``, else ``~/.cache/fusionzoo/features``,
    the folder ``fusionzoo bench`` uses); it must be one folder for every process of a run."""

    # optimisation
    output_dir: str = "runs/default"
    epochs: float = 1.0
    max_steps: int | None = None
    """If set, overrides ``epochs``."""
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 1e-4
    encoder_lr: float | None = None
    """Learning rate of unfrozen encoders (default: ``lr / 10``)."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    modality_dropout: float = 0.0
    """Chance in [0, 1) that a training sample loses one modality, its image or its question (half the
    time each; :mod:`fusionzoo.training.modality_dropout`): training for a missing modality. VQA and
    classification; 0 = off."""
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    """Autocast precision; ``auto``: bf16 on GPUs that have it (else fp16) and on CPUs with AMX /
    AVX-512 BF16, float32 elsewhere (bf16 is emulated, and slower, on other CPUs)."""
    cpu: bool = False
    """Force CPU even when a GPU is present."""
    compile: bool | CompileMode = False
    """``torch.compile`` the modules the step trains, in place (checkpoints are unchanged): the fusion
    and head, the encoders only when they train (frozen ones run eager, or not at all with the feature
    cache); true is mode ``default``. Compiling happens in the first steps and is left out of
    ``samples_per_second``; evaluation runs eager; where compiling fails, one warning says why and
    training goes on eager."""

    # checkpoints, evaluation, logging
    save_every: int | None = None
    """Steps between checkpoints (``None``: at the end of each epoch)."""
    keep_last: int = 2
    resume: str | None = None
    """``auto`` (latest checkpoint in output_dir, or a fresh start when there is none) or a checkpoint folder."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds another run, removing its checkpoints and final/ first."""
    eval_every: int | None = None
    """Steps between evaluations (``None``: at the end of each epoch)."""
    log_every: int = 10
    log_with: str | None = "auto"
    """Accelerate tracker: ``auto`` (TensorBoard when installed), ``none``, ``tensorboard``, ..."""

    # ALBEF pretraining and retrieval (task=retrieval trains itc_weight * ITC + itm_weight * ITM)
    align_kwargs: dict = field(default_factory=dict)
    """Hyperparameters of the ITC alignment of a fusion that does not align its own streams
    (``embed_dim``, ``temperature``, ``text_summary``, ``image_summary``)."""
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    """MLM weight of ``fusionzoo pretrain`` (task=retrieval has no MLM)."""
    momentum_distill: bool = False
    momentum: float = 0.995
    queue_size: int = 0
    distill_alpha: float = 0.4
    rerank_k: int | Literal["all"] = 128
    """Retrieval evaluation: how many ITC candidates per query the ITM head reranks (``all``: every pair)."""
    rerank_batch_size: int = 256
    """Retrieval evaluation: image-text pairs per ITM forward pass while reranking."""
    rerank_itc_weight: float | Literal["auto"] = "auto"
    """Retrieval evaluation: a shortlisted pair scores ITM log-odds + this x its ITC logit (0: ITM alone);
    ``auto``: training chooses it on the validation split and saves it with the model, which eval uses."""
    results: str | None = None
    """``fusionzoo eval``: write the predictions to this file in the official format -- VQA
    ``[{"question_id", "answer"}]`` JSON, captions ``[{"image_id", "caption"}]`` JSON, classification
    ``{"id", "label", "probabilities"}`` JSON Lines, retrieval the score matrices (``.npz``)."""
    references: str | None = None
    """``fusionzoo eval`` (VQA, captioning): write the scored split's gold answers or captions to this
    file in the schema ``fusionzoo score`` reads (VQA: one file holding the official ``questions`` and
    ``annotations``; captions: a COCO captions file), for data without official files of its own."""

    # caption generation (eval, predict), with the meanings of transformers' generate
    num_beams: int = 1
    """Beams per image; 1 is greedy decoding."""
    max_new_tokens: int = 20
    """Most tokens written after the start token, the end token included."""
    min_new_tokens: int = 0
    """The end token is forbidden until this many tokens were written."""
    length_penalty: float = 1.0
    """Beams are ranked by ``sum log p / length ** length_penalty`` (> 0 favours longer captions)."""
    no_repeat_ngram_size: int = 0
    """``n > 0``: no ``n`` tokens in a row occur twice in a caption."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already written (1.0: none)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and ("yes" if value else "no") in allowed:
            return "yes" if value else "no"  # YAML reads a bare no / yes (off / on) as a bool
        if value in allowed:
            return value
        if isinstance(value, bool) is False and str(value) in [str(a) for a in allowed]:
            return allowed[[str(a) for a in allowed].index(str(value))]
        raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{source}: key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{source}: key '{key}' expects a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
    return value


def _types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (``3e-4``, ``true``, ``[1, 2]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply(config: TrainConfig, updates: dict[str, Any], source: str) -> TrainConfig:
    """Apply ``updates`` (already parsed values) to ``config``; checks keys and types."""
    hints = _types()
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is not a string; expected one of {', '.join(hints)}")
        top, _, sub = key.partition(".")
        if top not in hints:
            close = difflib.get_close_matches(top, list(hints), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{source}: unknown key '{top}'.{hint} Known keys: {', '.join(hints)}.")
        if sub:  # fusion_kwargs.num_layers=4
            current = getattr(config, top)
            if not isinstance(current, dict):
                raise ConfigError(f"{source}: key '{top}' is not a mapping, so '{key}' is not valid")
            current = dict(current)
            current[sub] = value
            setattr(config, top, current)
        else:
            setattr(config, top, _coerce(value, hints[top], key, source))
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "fusion=albef"]`` -> ``{"lr": 3e-4, "fusion": "albef"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        out[key.strip()] = _parse_scalar(value)
    return out


def _key_lines(text: str) -> dict[Any, int]:
    """Top-level key -> its 1-based line in a YAML document (empty when the text is not a mapping)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides, in that order."""
    config = base if base is not None else TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            text = path.read_text()
            data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, "
                              f"got {type(data).__name__}")
        lines = _key_lines(text)
        for key, value in data.items():  # one key at a time, so that an error names its line
            apply(config, {key: value}, f"{path}, line {lines[key]}" if key in lines else str(path))
    if overrides:
        apply(config, parse_overrides(overrides), "command line")
    if base is None:
        given = set(data) if path is not None else set()
        given |= {key.partition(".")[0] for key in parse_overrides(overrides or [])}
        apply_task_defaults(config, given)
    validate(config)
    return config


def apply_task_defaults(config: TrainConfig, given: set[str]) -> TrainConfig:
    """Set the task's :meth:`~fusionzoo.tasks.Task.config_defaults` for the keys not in ``given``."""
    from fusionzoo.registry import RegistryError
    from fusionzoo.tasks import get_task

    try:
        task = get_task(config.task)
    except (RegistryError, KeyError, ValueError):
        return config  # an unknown task is reported where the run starts, with the registered names
    defaults = {key: value for key, value in task.config_defaults(config).items() if key not in given}
    return apply(config, defaults, f"task {config.task!r} defaults")


def validate(config: TrainConfig) -> None:
    """Cross-field checks, with messages that say what is expected."""
    if config.batch_size < 1:
        raise ConfigError(f"key 'batch_size' must be >= 1, got {config.batch_size}")
    if config.grad_accum < 1:
        raise ConfigError(f"key 'grad_accum' must be >= 1, got {config.grad_accum}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"key 'max_steps' must be >= 1, got {config.max_steps}")
    if config.max_steps is None and config.epochs <= 0:
        raise ConfigError(f"key 'epochs' must be > 0 when max_steps is not set, got {config.epochs}")
    if config.keep_last < 1:
        raise ConfigError(f"key 'keep_last' must be >= 1, got {config.keep_last}")
    if config.lr <= 0:
        raise ConfigError(f"key 'lr' must be > 0, got {config.lr}")
    if config.save_every is not None and config.save_every < 1:
        raise ConfigError(f"key 'save_every' must be >= 1 step, got {config.save_every}")
    if config.rerank_k != "all" and config.rerank_k < 1:
        raise ConfigError(f"key 'rerank_k' must be >= 1 candidates per query or 'all', got {config.rerank_k}")
    if not 0.0 <= config.modality_dropout < 1.0:
        raise ConfigError(f"key 'modality_dropout' must be a probability in [0, 1) (the chance that a training "
                          f"sample loses its image or its question), got {config.modality_dropout}")
    if config.rerank_batch_size < 1:
        raise ConfigError(f"key 'rerank_batch_size' must be >= 1 pairs, got {config.rerank_batch_size}")
    if config.peft == "lora":
        from ..lora import LoraSpec

        try:
            LoraSpec(config.lora_r, config.lora_alpha, config.lora_dropout, LoraSpec.parse_targets(config.lora_targets))
        except ValueError as exc:
            raise ConfigError(f"key {str(exc).split()[0]!r}: {exc}") from exc
    from ..decoding import DecodingOptions

    DecodingOptions.from_config(config)  # a bad decoding option is an error before anything runs


def from_dict(data: dict[str, Any], source: str = "saved config") -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_dict` (unknown keys are errors)."""
    return apply(TrainConfig(), data, source)
