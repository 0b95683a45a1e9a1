"""The one contract every fusion module honours.

A fusion module takes

* text token states ``text`` (B, T, Dt) and their mask ``text_mask`` (B, T),
* image token states ``image`` (B, N, Di) and an optional mask ``image_mask`` (B, N),
* ``causal=True`` when the text is a caption being decoded left to right, in which
  case no text position may see a later one (directly or through the image stream),
* an optional :class:`~fusionzoo.layers.KVCache` for incremental decoding: then
  ``text`` holds only the new positions, ``text_mask`` covers all positions so
  far, and the module keeps what it needs of past positions in the cache,

and returns one :class:`FusionOutput`. It declares its output width as
``out_dim``. Heads depend on nothing else.

Feature-level fusions (everything except a late vote) fill ``text_tokens`` and
``pooled``. A decision-level fusion (``decision_level = True``) also fills
``modality_pooled`` / ``modality_text_tokens`` with one feature per modality;
the head then predicts once per modality with a separate predictor each and
asks the fusion to combine the predictions with :meth:`FusionModule.vote`.

A head reads either the per-sample vector (``pooled``, or ``modality_pooled``)
or the per-position states (``text_tokens``, or ``modality_text_tokens``). A
fusion some of whose parameters only make the outputs one kind of head never
reads may take ``head_reads`` (one of :data:`HEAD_READS`) as a constructor
keyword and set ``supports_head_reads = True``; :func:`~fusionzoo.factory.create_model`
then passes what its task head reads, and the fusion leaves those parameters out,
so every trainable parameter gets a gradient in every step (what DDP without
``find_unused_parameters`` needs). The outputs that head does not read keep the
shapes above but are computed without parameters (each fusion says how). This is
optional: a fusion without the keyword is built whole and works with every head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..layers import KVCache

#: What a fusion with ``supports_head_reads`` can be built for (its ``head_reads`` keyword):
#: ``"all"`` every output (the default), ``"pooled"`` a head that reads only the per-sample
#: vector (``pooled`` / ``modality_pooled``), ``"text_tokens"`` a head that reads only the
#: per-position states (``text_tokens`` / ``modality_text_tokens``).
HEAD_READS = ("all", "pooled", "text_tokens")


@dataclass
class FusionOutput:
    """What a fusion module returns.

    Attributes:
        text_tokens: (B, T, D) fused states at the text positions (what MLM and
            caption decoding read). With a cache, only the new positions.
        pooled: (B, D) joint vector for classification-style heads.
        image_tokens: (B, N', D) fused states at image positions, or ``None``
            for fusions that do not keep per-image-token states.
        aux: tensors that losses may need (for ALBEF: ``image_embed``,
            ``text_embed``, ``temperature``, ...). Never used by the heads.
        modality_pooled: (B, K, D) one vector per modality, decision-level
            fusions only.
        modality_text_tokens: (B, K, T, D) one state per modality at each text
            position, decision-level fusions only.
    """

    text_tokens: Tensor
    pooled: Tensor
    image_tokens: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    modality_pooled: Tensor | None = None
    modality_text_tokens: Tensor | None = None

    @property
    def tokens(self) -> Tensor:
        """(B, T + N', D): text-position states followed by image-position states."""
        if self.image_tokens is None:
            return self.text_tokens
        return torch.cat([self.text_tokens, self.image_tokens], dim=1)


class FusionModule(nn.Module):
    """Base class of all fusion modules.

    Subclasses take ``text_dim`` and ``image_dim`` (the encoders' widths) as
    their first two arguments, then their own hyperparameters with defaults,
    all JSON-serialisable (they are saved in ``config.json``). They set
    ``self.out_dim`` and implement :meth:`forward`.
    """

    #: True for fusions that combine per-modality decisions (late voting).
    decision_level: ClassVar[bool] = False
    #: Number of modality experts a decision-level fusion combines.
    num_modalities: ClassVar[int] = 1
    #: Set by the registry decorator.
    registry_name: ClassVar[str] = ""
    #: True for fusions whose ``forward`` takes ``pooled_only=True`` (the caller reads
    #: ``pooled`` alone, so the fusion may skip work whose only use is the token states).
    supports_pooled_only: ClassVar[bool] = False
    #: True for fusions whose constructor takes ``head_reads`` (one of :data:`HEAD_READS`) and
    #: then builds only the parameters that feed what that head reads (see the module docstring);
    #: ``create_model`` passes it only to these.
    supports_head_reads: ClassVar[bool] = False
    #: True for fusions that embed images and texts apart themselves (``embed_images(image, image_mask)``,
    #: ``embed_texts(text, text_mask)``, ``itc_temperature()``, as :class:`fusionzoo.alignment.Alignment`
    #: does); a retrieval model then uses the fusion's alignment instead of building its own.
    aligns: ClassVar[bool] = False

    out_dim: int

    def __init__(self, text_dim: int, image_dim: int, **config: object) -> None:
        """Subclasses pass their own hyperparameters as keywords, e.g.
        ``super().__init__(text_dim, image_dim, dim=dim, num_layers=num_layers)``; they
        are kept in :attr:`config` (JSON-serialisable) and written to ``config.json``,
        so ``type(m)(m.text_dim, m.image_dim, **m.config)`` rebuilds the architecture."""
        super().__init__()
        self.text_dim = text_dim
        self.image_dim = image_dim
        self.config: dict[str, object] = dict(config)

    def forward(
        self,
        text: Tensor,
        text_mask: Tensor,
        image: Tensor,
        image_mask: Tensor | None = None,
        *,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> FusionOutput:
        raise NotImplementedError

    def vote(self, logits: Tensor, activation: str = "softmax") -> Tensor:
        """Combine per-modality predictions (decision-level fusions only).

        Args:
            logits: (B, K, ..., C) one prediction per modality expert.
            activation: ``"softmax"`` (single-label, captioning) or
                ``"sigmoid"`` (multi-label, VQA soft targets).
        Returns:
            (B, ..., C) logits whose activation gives the combined prediction.
        """
        raise TypeError(f"{type(self).__name__} fuses features, not decisions; it has no vote")

    def aux_loss(self, output: FusionOutput) -> dict[str, Tensor]:
        """Auxiliary losses this fusion adds to the task loss, from its own ``output``.

        Each value is a scalar, already weighted; the model adds them to the task
        loss and logs them under their names. Fusions without one return ``{}``
        (the default); ALBEF returns its image-text contrastive loss ``{"itc": ...}``.
        """
        return {}

    @staticmethod
    def check_head_reads(head_reads: str) -> str:
        """``head_reads`` if it is one of :data:`HEAD_READS`, else a ValueError naming them."""
        if head_reads not in HEAD_READS:
            raise ValueError(f"head_reads must be one of {HEAD_READS}, got {head_reads!r}")
        return head_reads

    @staticmethod
    def check_inputs(text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None) -> None:
        """Shape checks shared by all fusions, with messages that say what was expected."""
        if text.dim() != 3 or image.dim() != 3:
            raise ValueError(
                f"expected text (B, T, Dt) and image (B, N, Di) token states, got shapes "
                f"{tuple(text.shape)} and {tuple(image.shape)}"
            )
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"batch sizes differ: text {text.shape[0]}, image {image.shape[0]}")
        if text_mask.dim() != 2 or text_mask.shape[0] != text.shape[0]:
            raise ValueError(f"text_mask must be (B, T), got {tuple(text_mask.shape)}")
        if image_mask is not None and tuple(image_mask.shape) != tuple(image.shape[:2]):
            raise ValueError(f"image_mask must be (B, N) = {tuple(image.shape[:2])}, got {tuple(image_mask.shape)}")

    @staticmethod
    def check_step(text: Tensor, text_mask: Tensor, causal: bool, cache: KVCache | None) -> int:
        """Check ``text_mask`` against the cache and return the first new position's index.

        Without a cache ``text_mask`` is (B, T) for the T text positions. With one,
        decoding is incremental: ``causal`` must be True and ``text_mask`` covers the
        ``cache.offset`` positions already processed plus the T new ones.
        """
        if cache is not None and not causal:
            raise ValueError("a KVCache is for left-to-right decoding only: call with causal=True")
        offset = 0 if cache is None else cache.offset
        if text_mask.shape[1] != offset + text.shape[1]:
            where = f"{offset} cached + {text.shape[1]} new" if cache is not None else f"{text.shape[1]}"
            raise ValueError(
                f"text_mask must cover {where} = {offset + text.shape[1]} text positions, "
                f"got shape {tuple(text_mask.shape)}"
            )
        return offset
