"""Data readers: every dataset and format the zoo reads, one module per format or source.

Each reader is a loader function registered by name (``fusionzoo.registry.DATASETS``) that
returns a :class:`~fusionzoo.data.common.TaskData` (splits of rows plus what the task needs:
``answers``, ``label_names``, ``pairs``/``references``), or a stream for pretraining. Training,
evaluation, pretraining and the bench all read through these loaders.

* :mod:`~fusionzoo.data.common` -- errors that name the file and entry, problem logs, splits,
  :class:`TaskData`, collation helpers; :mod:`~fusionzoo.data.images` -- opening and loading images.
* :mod:`~fusionzoo.data.vqa` -- ``vqa-jsonl``, ``vqa-v2`` (official layout), ``easy-vqa``;
  :mod:`~fusionzoo.data.vqa_answers` -- the official answer processing and soft targets.
* :mod:`~fusionzoo.data.captions` -- ``coco-captions``, ``karpathy-captions``.
* :mod:`~fusionzoo.data.classification` -- ``classification-jsonl``, ``caption-match``.
* :mod:`~fusionzoo.data.sort_of_clevr` -- generated Sort-of-CLEVR scenes.
* :mod:`~fusionzoo.data.streaming` -- the image-text stream that pretraining-scale sources share;
  :mod:`~fusionzoo.data.image_text_jsonl`, :mod:`~fusionzoo.data.webdataset_shards`,
  :mod:`~fusionzoo.data.hf_datasets` -- its sources.

Nothing here imports from the tasks, training, the bench or the commands.
"""

from . import captions, classification, hf_datasets, image_text_jsonl, sort_of_clevr, vqa, webdataset_shards  # noqa: F401

__all__ = ["captions", "classification", "hf_datasets", "image_text_jsonl", "sort_of_clevr", "vqa",
           "webdataset_shards"]
