"""Name -> loss term class. Adding a method is one file in this package with one ``@register_loss`` line.

The package imports every module in it (``hf_kd.losses.__init__``), so a new file is found without being listed.
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .core import TokenLoss

LOSS_REGISTRY = Registry("loss", unknown_hint="Known losses:")


def register_loss(name: str) -> Callable[[type[TokenLoss]], type[TokenLoss]]:
    """Class decorator: make a ``TokenLoss`` available to recipes under ``name``."""
    return LOSS_REGISTRY.register(name)


def loss_class(name: str) -> type[TokenLoss]:
    """The term class registered under ``name``; unknown names list the known ones."""
    return LOSS_REGISTRY.lookup(name)
