"""Fusion modules, one family per file; a module's registry name is its file name.

Importing this package registers the six built-in fusions.
"""

from . import albef, attention_weighted, co_attention, early_concat, late_voting, merged_transformer
from .base import FusionModule, FusionOutput

__all__ = [
    "FusionModule",
    "FusionOutput",
    "albef",
    "attention_weighted",
    "co_attention",
    "early_concat",
    "late_voting",
    "merged_transformer",
]
