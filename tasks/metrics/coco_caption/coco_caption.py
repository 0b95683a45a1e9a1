"""COCO caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) as a Hugging Face ``evaluate`` module.

The numbers of the COCO caption evaluation server: pycocoevalcap's PTB tokenizer,
then its Bleu(4), Meteor, Rouge and Cider scorers (SPICE is not computed and is
reported as ``None``). This module calls
:func:`fusionzoo.tasks.caption_eval.score_caption_dicts`; see
:mod:`fusionzoo.tasks.caption_eval` for the details. Java must be installed
(the tokenizer and METEOR are Java programs).

Load it offline (no Hub access; the script ships inside the fusionzoo package)::

    from fusionzoo.tasks.metrics import load
    coco = load("coco_caption")           # = evaluate.load("<package>/tasks/metrics/coco_caption")
    coco.compute(predictions=["a dog runs on the grass"],
                 references=[["A dog running on grass.", "a brown dog in a field"]])
    # {'Bleu_1': ..., 'Bleu_4': ..., 'METEOR': ..., 'ROUGE_L': ..., 'CIDEr': ..., 'SPICE': None}

Inputs:
    predictions (list of str): one generated caption per image.
    references (list of list of str): the reference captions of each image.

Output: ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`` -> corpus
score, and ``"SPICE": None``. CIDEr's document frequencies come from the references
passed in one call, so score a whole split at once.
"""

from __future__ import annotations

import datasets
import evaluate

from fusionzoo.tasks.caption_eval import score_caption_dicts

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = "COCO caption evaluation server scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) with pycocoevalcap's scorers."

_INPUTS = """\
Args:
    predictions: list of str, one generated caption per image.
    references: list of list of str, the reference captions of each image.
Returns:
    Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr: corpus scores; SPICE: None (not computed).
"""


class CocoCaption(evaluate.Metric):
    """COCO caption scores (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict:
        gts = {index: list(refs) for index, refs in enumerate(references)}
        res = {index: [prediction] for index, prediction in enumerate(predictions)}
        return score_caption_dicts(gts, res)
