"""Task heads over the fusion contract; importing this package registers them.

* ``classification`` (:class:`ClassificationHead`): pooled vector -> label logits, cross-entropy.
* ``vqa`` (:class:`VQAHead`): pooled vector -> answer logits, soft-score BCE.
* ``captioning`` (:class:`CaptioningHead`): fused caption states -> tied LM head.
* ``itm`` (:class:`ITMHead`): pooled vector -> match / no-match logits (retrieval's reranker).

Every head takes the :class:`~fusionzoo.fusions.base.FusionOutput` and, for a
decision-level fusion, the fusion's ``vote``: ``head(features, vote=None) -> logits``,
``head.loss(logits, labels) -> scalar``; ``Head.from_parts(fusion, text, vocabulary,
**kwargs)`` builds one for ``create_model``. A head's ``reads`` says which outputs it
reads (``"pooled"`` or ``"text_tokens"``, see :data:`~fusionzoo.fusions.base.HEAD_READS`;
a head without it counts as reading ``"all"``), and ``create_model`` builds a fusion that
supports it for just that. Each module's docstring says what its task means with each
built-in fusion.
"""

from .captioning import CaptioningHead, caption_lm_loss
from .classification import ClassificationHead
from .itm import ITMHead
from .vqa import VQAHead, vqa_bce_loss

__all__ = ["CaptioningHead", "ClassificationHead", "ITMHead", "VQAHead", "caption_lm_loss", "vqa_bce_loss"]
