"""VQA head: answer classification over a fixed answer vocabulary with soft scores.

Follows the bottom-up top-down VQA model (Anderson et al., 2018; Teney et al.,
2018, "Tips and tricks for visual question answering") as ViLT (Kim et al., 2021)
uses it: the joint vector goes through an MLP to ``A`` answer logits, and training
treats VQA v2 as multi-label classification against *soft* scores (an answer given
by ``n`` of the 10 annotators scores ``min(1, n / 3)``, or the official
leave-one-out average) with binary cross-entropy on each answer's sigmoid.

Loss convention (ViLT's ``compute_vqa``): ``mean`` BCE-with-logits over all
``B x A`` entries, multiplied by ``A``; that is the BCE summed over answers and
averaged over the batch, which keeps gradients from shrinking with a large
answer vocabulary. :func:`vqa_bce_loss` is the plain-function twin.

For a decision-level fusion each modality gets its own answer predictor and the
fusion's vote combines their *sigmoid* scores (each answer is a separate yes/no).

What each fusion means with this head:

=====================  =========================================================
fusion                 VQA means
=====================  =========================================================
early_concat           an answer MLP on concatenated question and image
                       summaries: the question cannot steer where to look
                       (Antol et al. 2015's baseline, with concatenation).
late_voting            a question-only and an image-only answerer voting per
                       answer (the language-prior and visual-prior baselines
                       combined at decision level).
attention_weighted     an answer MLP on a question/image-dependent convex mix
                       of the question and image summaries.
co_attention           ViLBERT / METER: question and image streams attend to
                       each other layer by layer; the MLP reads both pooled.
merged_transformer     ViLT: one Transformer over image patches and question
                       words, answer MLP on the pooled first text token.
albef                  ALBEF: the question's [CLS] after cross-attention layers
                       over the image (the answer-classifier variant, not
                       ALBEF's generative answer decoder), plus its ITC loss.
=====================  =========================================================
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from ..registry import register_head
from .classification import ClassificationHead


def vqa_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft-score VQA loss: ``mean`` BCE-with-logits times the number of answers ``A``.

    Args:
        logits: (B, A) answer logits.
        targets: (B, A) soft scores in [0, 1].
    Returns:
        scalar: the per-sample BCE summed over answers, averaged over the batch.
    """
    return F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[-1]


class VQAHead(ClassificationHead):
    """Pooled joint vector -> ``num_classes`` answer logits; soft-score BCE (see module docstring).

    Same arguments as :class:`~fusionzoo.heads.classification.ClassificationHead`,
    with ``num_classes`` = number of answers ``A``.
    """

    loss_name: ClassVar[str] = "vqa"
    vote_activation: ClassVar[str] = "sigmoid"

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """BCE of logits (B, A) against soft scores ``labels`` (B, A), see :func:`vqa_bce_loss`."""
        if not labels.is_floating_point() or labels.shape != logits.shape:
            raise ValueError(
                f"VQA labels must be float soft scores of shape {tuple(logits.shape)} (batch, answers), "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        return vqa_bce_loss(logits, labels.to(logits.dtype))


register_head("vqa")(VQAHead)
