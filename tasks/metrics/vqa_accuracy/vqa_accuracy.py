"""VQA accuracy (Antol et al., 2015) as a Hugging Face ``evaluate`` module.

The official VQA v2 accuracy, as the official evaluation code computes it since
its March 2021 fix: the prediction and the human answers are whitespace-cleaned
and, only when the human answers are not all the same, normalised (punctuation,
lower case, number words to digits, articles dropped, contractions restored);
the prediction is scored against the human answers as the mean over the
leave-one-out subsets of ``min(1, #matches / 3)``; the report averages those in
percent, rounded to two decimals. ``legacy_pre_2021=True`` scores as the code
did before that fix. See :mod:`fusionzoo.tasks.vqa_eval` for every detail; this
module calls :func:`fusionzoo.tasks.vqa_eval.score_vqa`, so its numbers are
those of :func:`~fusionzoo.tasks.vqa_eval.evaluate_vqa`.

Load it offline (no Hub access; the script ships inside the fusionzoo package)::

    from fusionzoo.tasks.metrics import load
    vqa = load("vqa_accuracy")            # = evaluate.load("<package>/tasks/metrics/vqa_accuracy")
    vqa.compute(predictions=["two", "yes"],
                references=[["2"] * 10, ["yes"] * 9 + ["no"]],
                answer_types=["number", "yes/no"],               # optional
                question_types=["how many", "is the"])          # optional
    # {'overall': 50.0, 'perAnswerType': {'number': 0.0, 'yes/no': 100.0},
    #  'perQuestionType': {'how many': 0.0, 'is the': 100.0}}
    # ten identical human answers: "two" is compared unprocessed and misses "2";
    # with legacy_pre_2021=True it is normalised to "2" and the overall is 100.0

Inputs:
    predictions (list of str): one raw predicted answer per question.
    references (list of list of str): the human answers of each question (10 in VQA v2).
    answer_types, question_types (list of str, optional): per question, for the per-type report.
    legacy_pre_2021 (bool, optional): score as the official code did before its March 2021 fix.

Output: ``{"overall": %, "perAnswerType": {type: %}, "perQuestionType": {type: %}}``
(per-type dicts empty when the types are not given).
"""

from __future__ import annotations

import datasets
import evaluate

from fusionzoo.tasks.vqa_eval import score_vqa

_CITATION = """\
@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""

_DESCRIPTION = "Official VQA accuracy: min(1, #matching human answers / 3), averaged over the leave-one-out subsets of the human answers, in percent."

_INPUTS = """\
Args:
    predictions: list of str, one raw predicted answer per question.
    references: list of list of str, the human answers of each question.
    answer_types: optional list of str (e.g. 'yes/no', 'number', 'other').
    question_types: optional list of str (e.g. 'what color is the').
    legacy_pre_2021: optional bool, score as the official code did before its March 2021 fix
        (default False: as it does now).
Returns:
    overall: accuracy in percent (two decimals); perAnswerType, perQuestionType: dicts type -> percent.
"""


class VqaAccuracy(evaluate.Metric):
    """The official VQA v2 accuracy (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]],
                 answer_types: list[str] | None = None, question_types: list[str] | None = None,
                 legacy_pre_2021: bool = False) -> dict:
        return score_vqa(predictions, references, answer_types=answer_types, question_types=question_types,
                         legacy_pre_2021=legacy_pre_2021)
