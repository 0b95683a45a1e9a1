"""Task objects: what a model is trained for, and everything that differs between tasks.

A task says which head serves it, how its output vocabulary comes from the data,
which dataset loader reads a path given as ``data=``, which rows of a split it
trains on, how a batch is collated, how a trained model is scored and how it
answers at inference. The training loop, the benchmark and the command line ask
the task; none of them compares task names. A task registered from user code
(``@fusionzoo.register_task("snli-ve")`` on a subclass) therefore trains,
evaluates and predicts through the same path as a built-in one.

Evaluation under several processes: each task gathers *per-sample* values with
``accelerator.gather_for_metrics`` (which drops the duplicates that pad the last
batch), so accuracy, the loss and every other metric equal a one-process run.
The evaluation ``loss`` is the head's task loss, averaged over samples; auxiliary
losses that depend on which samples share a batch (ALBEF's in-batch ITC) are
training signals and are not part of it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from fusionzoo.data.checks import DataError, MissingRootError
from fusionzoo.decoding import DecodingOptions
from fusionzoo.errors import ConfigError
from fusionzoo.registry import DATASETS, TASKS, RegistryError

from .classification_eval import classification_metrics
from .scoring import (
    score_caption_predictions,
    score_classification_predictions,
    score_vqa_predictions,
    scorable_captions,
    vqa_scores,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from fusionzoo.data.common import TaskData

#: The evaluation options only ``fusionzoo eval`` uses, as evaluations during training set them:
#: no results or references files, no per-type breakdowns (the training log holds scalars).
TRAINING_EVAL_OPTIONS: dict[str, Any] = {"results": None, "references": None, "breakdown": False}


@dataclass
class Prediction:
    """One output of :meth:`Task.predict_scored`.

    Attributes:
        text: the answer, label or caption.
        score: how sure the model is: the answer's soft score (VQA, a sigmoid), the label's
            probability (classification, a softmax), the caption's beam score (``sum log p /
            length ** length_penalty``); None where a task does not say.
    """

    text: str
    score: float | None


def call_loader(loader: Any, kwargs: dict[str, Any]) -> Any:
    """Call a dataset loader with the keyword arguments it accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(loader).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return loader(**{k: v for k, v in kwargs.items() if accepts_any or k in params})


def _file_and_option_kwargs(loader: Any, name: str, data_files: Any, data_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loader's keyword arguments for ``data_files=`` and ``data_kwargs.*``; a ConfigError for ones it lacks.

    ``data_files`` goes to the loader's ``files`` (``file`` for a loader of one file, such as
    ``karpathy-captions``). Unlike the run-wide flags, which a loader may not need, a data option
    the loader does not take is an error that lists the ones it does.
    """
    params = inspect.signature(loader).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: dict[str, Any] = {}
    if data_files is not None:
        if "files" in params or accepts_any:
            out["files"] = data_files
        elif "file" in params and isinstance(data_files, str):
            out["file"] = data_files
        else:
            raise ConfigError(f"key 'data_files': data={name!r} does not take data files; "
                              f"pass data_dir=<its folder> instead")
    options = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    for key, value in data_kwargs.items():
        if key in ("root", "files", "file"):
            raise ConfigError(f"key 'data_kwargs.{key}': give it as data_dir= or data_files=")
        if key not in params and not accepts_any:
            raise ConfigError(f"key 'data_kwargs.{key}': data={name!r} has no option {key!r}; "
                              f"it takes {', '.join(options) or 'none'}")
        out[key] = value
    return out


def sample_losses(head: Any, logits: "Tensor", labels: "Tensor") -> "Tensor":
    """(B,) the head's own loss of each sample alone (so a mean over samples needs no batch size);
    NaN for an unlabeled sample (label -1 of a label-id batch), which has no loss."""
    import torch

    unlabeled = labels < 0 if labels.dim() == 1 else torch.zeros(len(labels), dtype=torch.bool)
    nan = logits.new_full((), float("nan")).float()
    return torch.stack([nan if unlabeled[i] else head.loss(logits[i:i + 1], labels[i:i + 1]).float()
                        for i in range(len(logits))])


class Task:
    """Base class of the zoo's tasks; subclass it (or a built-in task) to add one.

    Class attributes:
        head: registry name of the head that serves the task.
        vocabulary_key: keyword of ``create_model`` naming the output vocabulary
            (``answers``, ``labels``), or None when the tokenizer is the vocabulary.
        description: one line for ``fusionzoo list``.
        default_dataset: the loader used when ``data=`` is a path rather than a name.
        generates_text: the model writes text (``generate``) instead of choosing an output.
        needs_text: inference takes a text (a question, a hypothesis) with each image.
        data_kind, data_needs: what the loaded data must be, and the attributes it must have.
        recipe: registry name of the training recipe that ``fusionzoo train`` runs for this task
            (:data:`fusionzoo.registry.RECIPES`: ``finetune``, ``retrieval`` or one you register).
        aligns: the model embeds images and texts apart for this task (``create_model`` builds an
            Alignment unless the fusion aligns its own streams).
        reads_cached_features: with frozen encoders, training and evaluation may feed this task
            cached features (:mod:`fusionzoo.training.features`): its collate takes rows without
            ``pixel_values`` and its evaluation reads ``image_states`` where a batch has them.
            False for a new task until it says so; the built-in tasks do.
        output_name, text_name: what a line of ``fusionzoo predict --out`` calls the model's output
            (``answer``, ``label``, ``caption``) and the text given with each image (``question``).
    """

    head: ClassVar[str]
    vocabulary_key: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    default_dataset: ClassVar[str | None] = None
    generates_text: ClassVar[bool] = False
    needs_text: ClassVar[bool] = True
    data_kind: ClassVar[str] = "data"
    data_needs: ClassVar[tuple[str, ...]] = ()
    reads_cached_features: ClassVar[bool] = False
    recipe: ClassVar[str] = "finetune"
    aligns: ClassVar[bool] = False
    output_name: ClassVar[str] = "output"
    text_name: ClassVar[str] = "text"

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    # -- data ---------------------------------------------------------------------------
    def loader_kwargs(self, config: Any) -> dict[str, Any]:
        """Extra keyword arguments this task passes to its dataset loader (from the run config)."""
        return {}

    def load_data(self, config: Any) -> "TaskData":
        """The dataset named by ``config.data`` (a registered name, or a path read by ``default_dataset``)."""
        name = config.data
        kwargs: dict[str, Any] = {"skip_bad": config.skip_bad, "verify_images": config.verify_images}
        if config.data_dir is not None:
            kwargs["root"] = config.data_dir
        if name not in DATASETS and Path(name).exists():
            if self.default_dataset is None:
                raise RegistryError(f"task {self.name!r} has no default dataset loader for a path; "
                                    f"pass data=<a dataset name> ({', '.join(DATASETS.list())})")
            kwargs["root"] = name
            name = self.default_dataset
        if config.only_present:
            kwargs["only_present"] = True
        kwargs.update(self.loader_kwargs(config))
        loader = DATASETS.get(name)
        kwargs.update(_file_and_option_kwargs(loader, name, config.data_files, dict(config.data_kwargs)))
        try:
            data = call_loader(loader, kwargs)
        except MissingRootError as exc:  # say it with the command line's name
                    raise ConfigError(f"data={name!r} needs data_dir=<its folder> (the dataset's root folder); "
                              f"the loader says: {exc}") from exc
        self.check_data(data, name)
        return data

    def check_data(self, data: Any, source: str) -> None:
        """Fail clearly when a loader gives data of another kind than this task reads (see ``data_needs``)."""
        missing = [name for name in self.data_needs if not hasattr(data, name)]
        if missing:
            example = f"; e.g. data={self.default_dataset} data_dir=<folder>" if self.default_dataset else ""
            raise RegistryError(f"task {self.name!r} needs {self.data_kind} (with {', '.join(self.data_needs)}); "
                                f"data={source!r} gave {type(data).__name__}, which has no {', '.join(missing)}"
                                f"{example}")

    def vocabulary(self, data: Any) -> list[str] | None:
        """The output vocabulary a model for ``data`` predicts (``create_model``'s ``vocabulary_key``)."""
        return None

    def train_rows(self, data: Any, split: str) -> Any:
        """The rows of ``split`` that training iterates over."""
        return data[split]

    def eval_rows(self, data: Any, split: str) -> Any:
        """The rows of ``split`` that evaluation iterates over."""
        return data[split]

    def collate(self, data: Any, tokenize: Any, max_length: int) -> Any:
        """The batch function for a DataLoader over this task's rows."""
        return data.collator(tokenize, max_length)

    # -- training ------------------------------------------------------------------------
    def eval_options(self, config: Any) -> dict[str, Any]:
        """Keyword options :meth:`evaluate` takes from the run config (e.g. retrieval's ``rerank_k``)."""
        return {}

    def config_defaults(self, config: Any) -> dict[str, Any]:
        """Config values this task trains best with, used for the keys a run's config file and command
        line leave unset (``fusionzoo train --show-config`` shows them); ``config`` is the run's config
        with the user's keys applied. None by default."""
        return {}

    # -- scoring and inference ----------------------------------------------------------
    def evaluate(self, model: Any, loader: Any, accelerator: Any, data: Any, split: str,
                 **options: Any) -> dict[str, float]:
        """Score ``model`` (prepared) on ``loader``; every sample counted once across processes."""
        raise NotImplementedError(f"task {self.name!r} does not say how to evaluate a model")

    def predict(self, model: Any, images: Sequence[Any], texts: Sequence[str] | None = None,
                **options: Any) -> list[str]:
        """What the model says for each image (and text): an answer, a label or a caption."""
        if texts is None:
            raise ValueError(f"a {self.name} model needs a text with each image")
        return model.predict(images, texts)

    def predict_scored(self, model: Any, images: Sequence[Any], texts: Sequence[str] | None = None,
                       **options: Any) -> list[Prediction]:
        """:meth:`predict` with how sure the model is of each output (``fusionzoo predict --images``);
        a task that does not say gives ``score=None``."""
        return [Prediction(text, None) for text in self.predict(model, images, texts, **options)]

    def bench_metrics(self, bench_task: Any, split: Any, outputs: Any) -> dict[str, Any]:
        """The benchmark's metrics of ``outputs`` (logits, or captions) on ``split`` (``fusionzoo bench``)."""
        raise NotImplementedError(f"task {self.name!r} has no benchmark scoring")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, head={self.head!r})"


class _ChoiceTask(Task):
    """A task whose head picks one entry of an output vocabulary (VQA answers, class labels)."""

    reads_cached_features = True  # model(**model_inputs(batch)) reads image_states and text_states

    def sample_values(self, logits: "Tensor", batch: dict[str, Any]) -> dict[str, Any]:
        """Per-sample values (tensors with first dimension B, or lists of B ids) of one batch, gathered
        over processes for :meth:`metrics`."""
        raise NotImplementedError

    def metrics(self, gathered: dict[str, Any]) -> dict[str, float]:
        """The metrics of the whole split from the gathered per-sample values (one row per sample)."""
        raise NotImplementedError

    def split_metrics(self, gathered: dict[str, Any], data: Any, split: str, breakdown: bool = False
                      ) -> dict[str, Any]:
        """:meth:`metrics`, for a task whose scores need only the gathered values; one that reads the
        split's rows too (VQA: the human answers) overrides this. ``breakdown``: add per-type scores
        where the task has them (``fusionzoo eval``)."""
        return self.metrics(gathered)

    def labeled(self, gathered: dict[str, Any], data: Any, split: str) -> "Tensor":
        """(S,) bool: the samples with a gold output (the loss is their mean). All, unless overridden."""
        import torch

        return torch.ones(len(next(iter(gathered.values()))), dtype=torch.bool)

    def probabilities(self, logits: "Tensor") -> "Tensor":
        """(B, C) how likely each output is, from the head's logits (a softmax; VQA's sigmoid)."""
        return logits.float().softmax(dim=-1)

    def predict_scored(self, model: Any, images: Sequence[Any], texts: Sequence[str] | None = None,
                       **options: Any) -> list[Prediction]:
        if texts is None:
            raise ValueError(f"a {self.name} model needs a text with each image")
        probabilities = self.probabilities(model.choice_logits(images, texts))  # (B, C)
        names = model.output_names
        return [Prediction(names[i], float(probabilities[j, i]))
                for j, i in enumerate(probabilities.argmax(dim=-1).tolist())]

    def write_results(self, gathered: dict[str, Any], data: Any, split: str, results: str | None,
                      references: str | None) -> None:
        """Write the results file (and references) of a scored split; see :mod:`fusionzoo.tasks.results`."""
        raise ConfigError(f"key 'results': task {self.name!r} does not write results files")

    def evaluate(self, model: Any, loader: Any, accelerator: Any, data: Any, split: str,
                 results: str | None = None, references: str | None = None, breakdown: bool = False,
                 **options: Any) -> dict[str, Any]:
        """Scores of ``split``; with ``results`` (and ``references``) the main process writes them."""
        import torch

        from .passes import inputs_without_labels, logits_pass

        unwrapped = accelerator.unwrap_model(model)
        parts: dict[str, list[Any]] = {}
        for batch, logits in logits_pass(model, loader, accelerator.autocast, inputs=inputs_without_labels):
            with torch.no_grad():
                values = self.sample_values(logits, batch)
                if "labels" in batch:
                    values["loss"] = sample_losses(unwrapped.head, logits, batch["labels"])
            values["valid"] = batch.get("valid", torch.ones(len(logits), dtype=torch.bool)).to(logits.device)
            for key, value in values.items():
                parts.setdefault(key, []).append(accelerator.gather_for_metrics(value))  # a list: as objects
        gathered: dict[str, Any] = {key: torch.cat(value).cpu() if isinstance(value[0], torch.Tensor)
                                    else [item for part in value for item in part] for key, value in parts.items()}
        valid = gathered.pop("valid")  # rows whose image could not be decoded (skip_bad=true) are left out
        gathered = {key: value[valid] if isinstance(value, torch.Tensor)
                    else [item for item, keep in zip(value, valid.tolist()) if keep] for key, value in gathered.items()}
        metrics = self.split_metrics(gathered, data, split, breakdown=breakdown)
        labeled = self.labeled(gathered, data, split)
        if "loss" in gathered and bool(labeled.any()):
            metrics["loss"] = gathered["loss"][labeled].double().mean().item()
        if (results or references) and accelerator.is_main_process:
            self.write_results(gathered, data, split, results, references)
        return metrics


class VQATask(_ChoiceTask):
    """Visual question answering over an answer vocabulary (soft-score BCE)."""

    head = "vqa"
    vocabulary_key = "answers"
    description = "visual question answering over an answer vocabulary (soft-score BCE)"
    default_dataset = "vqa-jsonl"
    output_name = "answer"
    text_name = "question"

    def loader_kwargs(self, config: Any) -> dict[str, Any]:
        return {"answers_top_k": config.answers_top_k, "answers_min_count": config.answers_min_count}

    data_kind = "VQA data"
    data_needs = ("answers",)

    def vocabulary(self, data: Any) -> list[str]:
        return list(data.answers)

    def eval_options(self, config: Any) -> dict[str, Any]:
        return {"results": config.results, "references": config.references, "breakdown": True}

    def sample_values(self, logits: "Tensor", batch: dict[str, Any]) -> dict[str, "Tensor"]:
        return {"answer": logits.argmax(-1), "question_id": batch["question_id"].to(logits.device)}  # (B,) each

    def probabilities(self, logits: "Tensor") -> "Tensor":
        return logits.float().sigmoid()  # each answer's soft score, as the head's BCE trains it

    def _positions(self, gathered: dict[str, "Tensor"], data: Any, split: str) -> tuple[Any, list[int], list[int]]:
        """The split's rows, each gathered question's row and the order that sorts them by row."""
        rows = self.eval_rows(data, split)
        position = {qid: i for i, qid in enumerate(rows["question_id"])}
        if len(position) != len(rows):
            raise DataError(f"split {split!r} of {data.name!r} repeats a question_id",
                            expected="one question_id per question")
        picked = [position[qid] for qid in gathered["question_id"].tolist()]
        return rows, picked, sorted(range(len(picked)), key=picked.__getitem__)

    def labeled(self, gathered: dict[str, "Tensor"], data: Any, split: str) -> "Tensor":
        import torch

        rows, picked, _ = self._positions(gathered, data, split)
        answers = rows["answers"]
        return torch.tensor([bool(answers[i]) for i in picked], dtype=torch.bool)

    def split_metrics(self, gathered: dict[str, "Tensor"], data: Any, split: str, breakdown: bool = False
                      ) -> dict[str, Any]:
        """``accuracy``: the argmax answers scored against the split's human answers by the rule the bench
        uses (:func:`~fusionzoo.tasks.scoring.vqa_scores`: the official VQA accuracy, or exact match
        for one-answer data), in the split's order; questions without answers (an unlabeled split) are
        not scored. ``breakdown``: also ``per_answer_type`` and ``per_question_type`` where the data
        has those types (the official report's ``perAnswerType``, ``perQuestionType``)."""
        rows, picked, order = self._positions(gathered, data, split)
        answers, chosen_ids = rows["answers"], gathered["answer"].tolist()
        labeled = [j for j in order if answers[picked[j]]]
        metrics: dict[str, Any] = {"num_samples": float(len(picked))}
        if labeled:
            groups = {name: [rows[name][picked[j]] for j in labeled] for name in ("answer_type", "question_type")
                      if name in rows.column_names}
            scores = vqa_scores([data.answers[chosen_ids[j]] for j in labeled], [answers[picked[j]] for j in labeled],
                                data.metric, groups)
            metrics["accuracy"] = float(scores["accuracy"])
            if breakdown:
                metrics.update({k: v for k, v in scores.items() if k.startswith("per_")})
        return metrics

    def write_results(self, gathered: dict[str, "Tensor"], data: Any, split: str, results: str | None,
                      references: str | None) -> None:
        from .results import vqa_references, write_references, write_vqa_results

        rows, picked, order = self._positions(gathered, data, split)
        if results:
            chosen = gathered["answer"].tolist()
            write_vqa_results(results, [rows["question_id"][picked[j]] for j in order],
                              [data.answers[chosen[j]] for j in order])
        if references:
            columns = [c for c in ("question_id", "image_id", "question", "answers", "answer_type", "question_type",
                                   "multiple_choice_answer") if c in rows.column_names]
            table = {c: rows[c] for c in columns}
            chosen_rows = [{c: table[c][picked[j]] for c in columns} for j in order if table["answers"][picked[j]]]
            if not chosen_rows:
                raise ConfigError(f"key 'references': split {split!r} of {data.name!r} has no answers to write")
            write_references(references, vqa_references(chosen_rows, split, data.name, data.metric == "exact_match"))

    def bench_metrics(self, bench_task: Any, split: Any, outputs: Any) -> dict[str, Any]:
        return score_vqa_predictions(bench_task, split, outputs)


class ClassificationTask(_ChoiceTask):
    """Image + text classification over named labels (cross-entropy)."""

    head = "classification"
    vocabulary_key = "labels"
    description = "image+text classification (e.g. Hateful Memes, image-caption match)"
    default_dataset = "classification-jsonl"
    output_name = "label"

    data_kind = "classification data"
    data_needs = ("label_names",)

    def vocabulary(self, data: Any) -> list[str]:
        return list(data.label_names)

    def eval_options(self, config: Any) -> dict[str, Any]:
        if config.references:
            raise ConfigError("key 'references': classification results are scored by `fusionzoo eval` itself; "
                              "`fusionzoo score` has no classification scorer to write references for")
        return {"results": config.results}

    def sample_values(self, logits: "Tensor", batch: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {"logits": logits, "labels": batch["labels"]}
        if "id" in batch:
            values["id"] = list(batch["id"])
        return values

    def labeled(self, gathered: dict[str, Any], data: Any, split: str) -> "Tensor":
        return gathered["labels"] >= 0  # -1: an unlabeled split (Hateful Memes' test files)

    def split_metrics(self, gathered: dict[str, Any], data: Any, split: str, breakdown: bool = False
                      ) -> dict[str, Any]:
        """:meth:`metrics` of the labeled samples; ``num_samples`` counts every sample predicted."""
        labeled = self.labeled(gathered, data, split)
        metrics: dict[str, Any] = {}
        if bool(labeled.any()):
            metrics = self.metrics({key: value[labeled] for key, value in gathered.items() if key != "id"})
        metrics["num_samples"] = float(len(labeled))
        return metrics

    def metrics(self, gathered: dict[str, "Tensor"]) -> dict[str, float]:
        labels = gathered["labels"]
        metrics = {k: 100.0 * v if k in ("accuracy", "macro_f1") else v
                   for k, v in classification_metrics(gathered["logits"].numpy(), labels.numpy()).items()}
        metrics["num_samples"] = float(len(labels))
        return metrics

    def write_results(self, gathered: dict[str, Any], data: Any, split: str, results: str | None,
                      references: str | None) -> None:
        from .results import write_classification_results

        if "id" not in gathered:
            raise ConfigError(f"key 'results': the batches of {data.name!r} carry no 'id' to write results by")
        write_classification_results(results, gathered["id"], list(data.label_names),
                                     self.probabilities(gathered["logits"]).tolist())

    def bench_metrics(self, bench_task: Any, split: Any, outputs: Any) -> dict[str, Any]:
        return score_classification_predictions(split, outputs)


class CaptioningTask(Task):
    """Image captioning with a fusion-conditioned text decoder; scored with BLEU, METEOR, ROUGE-L, CIDEr."""

    head = "captioning"
    description = "image captioning with a fusion-conditioned text decoder"
    default_dataset = "karpathy-captions"
    output_name = "caption"
    generates_text = True
    needs_text = False

    data_kind = "image-caption data"
    data_needs = ("pairs", "references")
    reads_cached_features = True  # generation starts from image_states where a batch has them

    def train_rows(self, data: Any, split: str) -> Any:
        return data.pairs(split)  # one row per caption; evaluation reads one row per image

    def eval_options(self, config: Any) -> dict[str, Any]:
        """The run's :class:`~fusionzoo.decoding.DecodingOptions`, ``results`` and ``references``."""
        return {**DecodingOptions.from_config(config).kwargs(), "results": config.results,
                "references": config.references}

    def evaluate(self, model: Any, loader: Any, accelerator: Any, data: Any, split: str,
                 results: str | None = None, references: str | None = None, **decoding: Any) -> dict[str, float]:
        """COCO caption scores of the captions written with ``decoding`` (the fields of
        :class:`~fusionzoo.decoding.DecodingOptions`). A caption without a word is scored as
        :data:`~fusionzoo.tasks.scoring.NO_CAPTION` and counted (``wordless_captions``); images without
        reference captions are captioned but not scored."""
        import torch

        from .caption_eval import score_caption_dicts
        from .passes import caption_pass
        from .results import caption_references, write_caption_results, write_references

        options = DecodingOptions(**decoding)
        unwrapped = accelerator.unwrap_model(model)
        width = options.max_new_tokens + 2
        image_ids, token_rows, flags = [], [], []
        for batch, ids in caption_pass(unwrapped, loader, accelerator.autocast, **options.kwargs()):
            padded = torch.full((ids.shape[0], width), unwrapped.text.pad_token_id, dtype=torch.long,
                                device=ids.device)  # (B, width): one shape on every process
            padded[:, : ids.shape[1]] = ids[:, :width]
            token_rows.append(accelerator.gather_for_metrics(padded))
            image_ids.append(accelerator.gather_for_metrics(batch["image_id"]))
            flags.append(accelerator.gather_for_metrics(
                batch.get("valid", torch.ones(len(ids), dtype=torch.bool)).to(ids.device)))
        valid = torch.cat(flags).cpu()  # images that could not be decoded (skip_bad=true) are left out
        ids_all = torch.cat(token_rows).cpu()[valid]
        texts = unwrapped.text.tokenizer.batch_decode(ids_all.tolist(), skip_special_tokens=True)
        captions, wordless = scorable_captions([text.strip() for text in texts])
        written = dict(zip(torch.cat(image_ids).cpu()[valid].tolist(), captions))
        all_references = data.references(split)
        gts = {i: all_references[i] for i in written if all_references.get(i)}
        metrics: dict[str, float] = {"num_samples": float(len(written)), "wordless_captions": float(wordless)}
        if gts:
            scores = score_caption_dicts(gts, {i: [written[i]] for i in gts})
            metrics.update({k: v for k, v in scores.items() if v is not None})
        if accelerator.is_main_process:
            if results:
                write_caption_results(results, written)
            if references:
                if not gts:
                    raise ConfigError(f"key 'references': split {split!r} of {data.name!r} has no reference captions")
                write_references(references, caption_references(gts, split, data.name))
        return metrics

    def predict(self, model: Any, images: Sequence[Any], texts: Sequence[str] | None = None,
                **decoding: Any) -> list[str]:
        return model.generate(list(images), **decoding)

    def predict_scored(self, model: Any, images: Sequence[Any], texts: Sequence[str] | None = None,
                       **decoding: Any) -> list[Prediction]:
        """Captions with their beam scores (``sum log p / length ** length_penalty``)."""
        if not len(images):
            return []
        decoded = model.decode(model.vision.preprocess(list(images)), **decoding)
        captions = model.text.tokenizer.batch_decode(decoded.ids.tolist(), skip_special_tokens=True)
        return [Prediction(c.strip(), float(s)) for c, s in zip(captions, decoded.scores.tolist())]

    def bench_metrics(self, bench_task: Any, split: Any, outputs: Any) -> dict[str, Any]:
        return score_caption_predictions(split, outputs)


def get_task(name: str) -> Task:
    """The task object registered under ``name`` (a registered class is instantiated).

    Raises:
        RegistryError: unknown name (with the closest matches), or an entry that is not a :class:`Task`.
    """
    entry = TASKS.get(name)
    task = entry() if isinstance(entry, type) else entry
    if not isinstance(task, Task):
        raise RegistryError(f"task {name!r} is registered as {type(task).__name__}, not a fusionzoo.tasks.Task "
                            "subclass: subclass Task (or VQATask, ClassificationTask, CaptioningTask)")
    return task
