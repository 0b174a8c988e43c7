"""Name -> loss term class. Adding a method is one file in this package with one ``@register_loss`` line.

The package imports every module in it (``hf_kd.losses.__init__``), so a new file is found without being listed.
"""

from __future__ import annotations

from collections.abc import Callable

from ..knobs import check_knobs
from .core import TokenLoss

LOSS_REGISTRY: dict[str, type[TokenLoss]] = {}


def register_loss(name: str) -> Callable[[type[TokenLoss]], type[TokenLoss]]:
    """Class decorator: make a ``TokenLoss`` available to recipes under ``name``."""

    def decorate(cls: type[TokenLoss]) -> type[TokenLoss]:
        if name in LOSS_REGISTRY and LOSS_REGISTRY[name] is not cls:
            raise ValueError(f"A loss named '{name}' is already registered ({LOSS_REGISTRY[name].__name__}).")
        check_knobs(cls)
        cls.name = name
        LOSS_REGISTRY[name] = cls
        return cls

    return decorate


def loss_class(name: str) -> type[TokenLoss]:
    """The term class registered under ``name``; unknown names list the known ones."""
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(LOSS_REGISTRY))
        raise ValueError(f"Unknown loss '{name}'. Known losses: {known}.") from None
