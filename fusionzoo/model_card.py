"""The model card of a saved model folder: ``README.md`` with YAML metadata, as the Hugging Face Hub reads it.

:func:`model_card` builds the text from the folder's ``config.json`` (task, fusion, encoders)
and, where the folder has one, the ``run.json`` that ``fusionzoo train`` writes beside it
(the dataset and the metrics of the run's last evaluation). The metadata block follows the
Hub's model card fields: ``library_name``, ``pipeline_tag``, ``tags``, ``datasets`` and
``model-index`` with one result per score (the run's bookkeeping, :data:`NOT_SCORES`, stays in
``metrics`` only, so the Hub's evaluation results do not list the step or the sample count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .io import write_text_atomic

CARD_NAME = "README.md"
RUN_NAME = "run.json"

#: Entries of an evaluation's metrics that say when and on how much it ran, not how well.
NOT_SCORES = ("step", "epoch", "num_samples")

#: The Hub's pipeline tag of each built-in task.
PIPELINE_TAGS = {"vqa": "visual-question-answering", "captioning": "image-to-text",
                 "classification": "image-text-to-text", "retrieval": "zero-shot-image-classification"}


def _encoder_name(spec: Any) -> str:
    if isinstance(spec, dict):
        return str(spec.get("preset") or spec.get("name") or spec.get("path") or json.dumps(spec, sort_keys=True))
    return str(spec)


def card_metadata(config: dict[str, Any], run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML metadata of the card of a model with ``config`` (config.json) and ``run`` (run.json)."""
    run = run or {}
    run_config = run.get("config") or {}
    task, fusion = str(config.get("task", "")), str((config.get("fusion") or {}).get("name", ""))
    vision = _encoder_name((config.get("vision") or {}).get("spec"))
    text = _encoder_name((config.get("text") or {}).get("spec"))
    meta: dict[str, Any] = {"library_name": "fusionzoo", "tags": ["fusionzoo", f"fusion:{fusion}", f"task:{task}"],
                            "task": task, "fusion": fusion, "encoders": {"vision": vision, "text": text}}
    if task in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[task]
    lora = config.get("lora")
    if isinstance(lora, dict):
        meta["tags"].append("lora")
        meta["lora"] = {k: lora.get(k) for k in ("r", "alpha", "dropout", "targets")}
    dataset = run_config.get("data")
    if dataset:
        meta["datasets"] = [str(dataset)]
    metrics = {k: v for k, v in (run.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        meta["metrics"] = metrics
        meta["model-index"] = [{"name": f"{task}-{fusion}", "results": [{
            "task": {"type": meta.get("pipeline_tag", task)},
            "dataset": {"name": str(dataset or "unknown"), "type": str(dataset or "unknown"),
                        "split": str(run_config.get("eval_split") or run_config.get("split") or "")},
            "metrics": [{"type": name, "value": value} for name, value in metrics.items()
                        if name not in NOT_SCORES],
        }]}]
    return meta


def model_card(config: dict[str, Any], run: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The card's text: the YAML metadata between ``---`` lines, then what the model is and how to load it."""
    meta = card_metadata(config, run)
    where = repo_id or "path/to/this/folder"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# fusionzoo {meta['task']} model: {meta['fusion']}", "",
             f"A [fusionzoo](https://pypi.org/project/fusionzoo/) `{meta['task']}` model: the `{meta['fusion']}` "
             f"fusion over the image encoder `{meta['encoders']['vision']}` and the text encoder "
             f"`{meta['encoders']['text']}`."]
    if meta.get("datasets"):
        lines += ["", f"Trained on `{meta['datasets'][0]}`."]
    if meta.get("lora"):
        lora = meta["lora"]
        lines += ["", f"Fine-tuned with LoRA adapters (rank {lora['r']}, alpha {lora['alpha']:g}) on "
                  f"{', '.join(lora['targets'])}: `adapters.safetensors` holds them with the fusion and head; "
                  "an encoder's base weights come from its preset (or `base.safetensors`). Loading needs `peft`."]
    if meta.get("metrics"):
        lines += ["", "Its last evaluation:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in meta["metrics"].items()]
    lines += ["", "## Load it", "", "```python", "import fusionzoo", "",
              f"model = fusionzoo.load_model({where!r})", "```", "",
              "or from the command line:", "", "```bash",
              f"fusionzoo predict {where} --image photo.jpg" + ("" if meta["task"] == "captioning"
                                                                else " --question \"...\""),
              "```", ""]
    return "\n".join(lines)


def read_card_sources(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``config.json`` and ``run.json`` of ``folder`` as dicts (None where missing or not a JSON object)."""
    found = []
    for name in ("config.json", RUN_NAME):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            value = None
        found.append(value if isinstance(value, dict) else None)
    return found[0], found[1]


def parse_card(text: str) -> dict[str, Any]:
    """The YAML metadata of a card's text; a ValueError when it has no ``---`` block."""
    if not text.startswith("---\n"):
        raise ValueError("a model card starts with its YAML metadata between '---' lines")
    block = text[4:].split("\n---\n", 1)
    if len(block) != 2:
        raise ValueError("the model card's YAML metadata has no closing '---' line")
    meta = yaml.safe_load(block[0])
    if not isinstance(meta, dict):
        raise ValueError(f"the model card's metadata is not a mapping: {meta!r}")
    return meta


def write_model_card(folder: Path, repo_id: str | None = None) -> Path:
    """(Re)write ``folder/README.md`` from its config.json and run.json; returns the card's path.

    Raises:
        FileNotFoundError: the folder has no readable config.json.
    """
    config, run = read_card_sources(folder)
    if config is None:
        raise FileNotFoundError(f"{folder / 'config.json'} not found or not a JSON object: no model to describe")
    path = folder / CARD_NAME
    write_text_atomic(path, model_card(config, run, repo_id))
    return path
