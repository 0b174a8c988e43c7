"""The loss library: ``build_loss("akl", mu=0.5)(student_logits, teacher_logits, labels)``.

Every module of this package is imported here, which registers its terms: a new method is one new file.
``LOSS_REGISTRY`` lists every name a recipe may use.
"""

import importlib
import pkgutil

from .core import IGNORE_INDEX, LogitSource, LossEngine, TeacherSignal, TokenLoss, TokenRows, default_chunk_size
from .recipe import DistillationLoss, Recipe, RecipeTerm, build_loss, parse_recipe
from .registry import LOSS_REGISTRY, register_loss

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "IGNORE_INDEX",
    "LOSS_REGISTRY",
    "DistillationLoss",
    "LogitSource",
    "LossEngine",
    "Recipe",
    "RecipeTerm",
    "TeacherSignal",
    "TokenLoss",
    "TokenRows",
    "build_loss",
    "default_chunk_size",
    "parse_recipe",
    "register_loss",
]
