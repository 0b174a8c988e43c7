"""The loss library: ``build_loss("akl", mu=0.5)(student_logits, teacher_logits, labels)``.

Importing a method's module registers it; ``LOSS_REGISTRY`` lists every name a recipe may use.
"""

from . import akl, bild, dac_kl, divergences, span  # noqa: F401  (register the terms)
from .core import IGNORE_INDEX, LogitSource, LossEngine, TokenLoss, TokenRows, default_chunk_size
from .recipe import DistillationLoss, build_loss, parse_recipe
from .registry import LOSS_REGISTRY, register_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSS_REGISTRY",
    "DistillationLoss",
    "LogitSource",
    "LossEngine",
    "TokenLoss",
    "TokenRows",
    "build_loss",
    "default_chunk_size",
    "parse_recipe",
    "register_loss",
]
