"""``fusionzoo score``: official VQA v2 accuracy, COCO caption scores and image-text retrieval recall@K.

Three subcommands, each printing one JSON object on stdout:

* ``fusionzoo score vqa --questions Q.json --annotations A.json --results R.json``
  -> ``{"overall", "perAnswerType", "perQuestionType"}``
  (:func:`fusionzoo.tasks.vqa_eval.evaluate_vqa`), as the official evaluation code
  computes it today; ``--legacy-pre-2021`` for the code before its March 2021 fix;
* ``fusionzoo score captions --annotations captions.json --results results.json``
  -> ``{"Bleu_1", ..., "CIDEr", "SPICE": null, "notes": {"SPICE": ...}}``
  (:func:`fusionzoo.tasks.caption_eval.score_captions`);
* ``fusionzoo score retrieval --annotations dataset_coco.json --scores scores.npz``
  -> ``{"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}`` on one line
  (:func:`fusionzoo.tasks.retrieval_eval.score_retrieval`).

Bad input exits with status 2 and one line on stderr naming the file and entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VQA_EPILOG = """\
files (the official VQA v2 schemas):
  --questions    v2_OpenEnded_mscoco_<split>_questions.json
                 {"questions": [{"image_id", "question", "question_id"}, ...]}
  --annotations  v2_mscoco_<split>_annotations.json
                 {"annotations": [{"question_id", "question_type", "answer_type",
                   "answers": [{"answer", "answer_confidence", "answer_id"}] x 10}, ...]}
  --results      [{"question_id": int, "answer": str}, ...], one per annotated question

scoring, as the official evaluation code (vqaEval.py) does since its March 2021 fix:
newlines, tabs and outer spaces are cleaned from the predicted and the human answers;
then, only when the 10 human answers are not all the same, all of them and the
prediction are normalised (punctuation, lower case, number words -> digits, articles
dropped, contractions restored). When the humans agree, the prediction must equal
their answer exactly. The accuracy is min(1, #matching human answers / 3) averaged
over the 10 leave-one-out subsets of the human answers; overall and per-type means
are percentages with two decimals.

--legacy-pre-2021 scores as the code did before that fix: the prediction is always
normalised, the human answers are compared as stored, or with only their punctuation
processed when they disagree (no lower case, number words or articles). The two agree
when the human answers and the prediction are both already normalised; on raw human
answers they can differ by tens of points.

example:
  fusionzoo score vqa --questions v2_OpenEnded_mscoco_val2014_questions.json \\
      --annotations v2_mscoco_val2014_annotations.json --results val_results.json
  fusionzoo score vqa --legacy-pre-2021 --questions ... --annotations ... --results ...
"""

CAPTIONS_EPILOG = """\
files:
  --annotations  COCO captions: {"images": [{"id", ...}], "annotations": [{"image_id", "caption"}, ...]}
  --results      [{"image_id", "caption": str}, ...], one per image with reference captions

scoring: pycocoevalcap's PTB tokenizer, then its BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
scorers (the COCO evaluation server's numbers). SPICE is not computed (it needs a model
download) and is printed as null. Needs Java (`java -version`), e.g.
`apt-get install default-jre-headless` or `conda install -c conda-forge openjdk`.

example:
  fusionzoo score captions --annotations captions_val2014.json --results captions_results.json
"""


RETRIEVAL_EPILOG = """\
files:
  --annotations  which image each caption describes; may hold more images than the
                 score file (a whole Karpathy file with every split). Either
                 a Karpathy split file (dataset_coco.json, dataset_flickr30k.json):
                   {"images": [{"cocoid" (COCO) or "imgid" (Flickr30K, which has no
                     cocoid), "split", "sentences": [{"sentid", "raw"}, ...]}, ...]}
                 or an official COCO captions file (captions_val2014.json):
                   {"images": [{"id"}, ...],
                    "annotations": [{"id", "image_id", "caption"}, ...]}
  --scores       an .npz archive (fusionzoo.tasks.retrieval_eval.save_scores) with
                   i2t          (images x captions) image-query -> caption scores
                   t2i          (captions x images) caption-query -> image scores
                   image_ids    (images,)   Karpathy cocoid (imgid for Flickr30K) or COCO images[].id
                   caption_ids  (captions,) Karpathy sentid or COCO annotations[].id
                 rows and columns in any order; higher scores are better; every
                 caption's image must be among image_ids, every image must have a caption.

scores (percent, ALBEF's and BLIP's definitions), over the score file's images and captions:
  txt_r1 txt_r5 txt_r10  image -> text retrieval: the share of images with one of their
                         captions among the top K of all captions (from i2t)
  img_r1 img_r5 img_r10  text -> image retrieval: the share of captions whose image is
                         among the top K of all images (from t2i)
  r_mean                 the mean of the six
Ties count against the query: a wrong candidate scored the same as the best right one
ranks above it (so the order of rows and columns never matters). The JSON object is
the last line of stdout; a summary of what was scored goes to stderr.

example:
  fusionzoo score retrieval --annotations dataset_coco.json --scores coco_test_scores.npz
"""


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score results files: official VQA v2 accuracy, COCO caption metrics or retrieval recall@K",
        description="Score a results file against the official annotations and print the scores as JSON.",
        epilog="run `fusionzoo score vqa --help`, `fusionzoo score captions --help` or "
               "`fusionzoo score retrieval --help` for the file formats",
    )
    p.set_defaults(func=lambda args: _missing_kind(p))
    kinds = p.add_subparsers(dest="kind", metavar="{vqa,captions,retrieval}")

    vqa = kinds.add_parser(
        "vqa",
        help="official VQA v2 accuracy (overall, per answer type, per question type)",
        description="Official VQA v2 accuracy of a results file, as the VQA evaluation code computes it "
                    "today (or, with --legacy-pre-2021, as it did before its March 2021 fix).",
        epilog=VQA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vqa.add_argument("--questions", required=True, type=Path, metavar="Q.json", help="the questions file of the split")
    vqa.add_argument("--annotations", required=True, type=Path, metavar="A.json", help="the annotations file of the split")
    vqa.add_argument("--results", required=True, type=Path, metavar="R.json", help="the predicted answers")
    vqa.add_argument("--legacy-pre-2021", action="store_true",
                     help="score as the official vqaEval.py did before its March 2021 fix (prediction always "
                          "normalised, human answers only punctuation-processed); default: the current code")
    _add_output_options(vqa)
    vqa.set_defaults(func=_run_score_vqa)

    captions = kinds.add_parser(
        "captions",
        help="COCO caption scores: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap; needs Java)",
        description="COCO caption scores of a results file against a COCO captions annotation file.",
        epilog=CAPTIONS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    captions.add_argument("--annotations", required=True, type=Path, metavar="captions.json",
                          help="COCO captions annotation file (reference captions)")
    captions.add_argument("--results", required=True, type=Path, metavar="results.json",
                          help="the generated captions")
    _add_output_options(captions)
    captions.set_defaults(func=_run_score_captions)

    retrieval = kinds.add_parser(
        "retrieval",
        help="image-text retrieval recall@1/5/10 both ways (ALBEF/BLIP, COCO or Flickr30K Karpathy test)",
        description="Recall@1/5/10 of image -> text (txt_*) and text -> image (img_*) retrieval from a "
                    "score file of image-caption scores, as ALBEF and BLIP report them.",
        epilog=RETRIEVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retrieval.add_argument("--annotations", required=True, type=Path, metavar="FILE",
                           help="Karpathy split file or COCO captions file: each caption id's image id")
    retrieval.add_argument("--scores", required=True, type=Path, metavar="PATH",
                           help="the .npz score file (i2t, t2i, image_ids, caption_ids)")
    retrieval.add_argument("--output", type=Path, metavar="PATH", help="also write the JSON scores to this file")
    retrieval.set_defaults(func=_run_score_retrieval, indent=None)  # one line: the last line of stdout


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, metavar="PATH", help="also write the JSON scores to this file")
    p.add_argument("--indent", type=int, default=2, help="JSON indentation (default: 2; 0 for one line)")


def _missing_kind(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _emit(scores: dict, args: argparse.Namespace) -> int:
    text = json.dumps(scores, indent=args.indent or None)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


def _fail(exc: BaseException) -> int:
    message = " ".join(str(exc).split())  # always one line
    print(f"fusionzoo score: error: {message}", file=sys.stderr)
    return 2


def _run_score_vqa(args: argparse.Namespace) -> int:
    from fusionzoo.tasks.vqa_eval import ScoreInputError, evaluate_vqa

    try:
        scores = evaluate_vqa(args.questions, args.annotations, args.results,
                              legacy_pre_2021=args.legacy_pre_2021)
    except ScoreInputError as exc:
        return _fail(exc)
    return _emit(scores, args)


def _run_score_captions(args: argparse.Namespace) -> int:
    from fusionzoo.tasks.caption_eval import SPICE_NOTE, CaptionScorerError, JavaNotFoundError, score_captions
    from fusionzoo.tasks.vqa_eval import ScoreInputError

    try:
        scores = score_captions(args.annotations, args.results)
    except (ScoreInputError, JavaNotFoundError, CaptionScorerError, ImportError) as exc:
        return _fail(exc)
    return _emit({**scores, "notes": {"SPICE": SPICE_NOTE}}, args)


def _run_score_retrieval(args: argparse.Namespace) -> int:
    from fusionzoo.tasks.retrieval_eval import load_retrieval_annotations, load_scores, score_retrieval
    from fusionzoo.tasks.vqa_eval import ScoreInputError

    try:
        annotations = load_retrieval_annotations(args.annotations)
        scores = load_scores(args.scores)
        recalls = score_retrieval(annotations, scores)
    except ScoreInputError as exc:
        return _fail(exc)
    print(f"retrieval: {len(scores.image_ids)} images x {len(scores.caption_ids)} captions of {scores.file}, "
          f"captions' images from {annotations.file} ({annotations.schema} schema)", file=sys.stderr)
    return _emit(recalls, args)
