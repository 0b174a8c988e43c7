"""Name -> bridge class, as ``losses.registry`` does for loss terms: ``DistillationConfig(bridge=name)`` picks one.

A bridge class declares, like a loss term: ``paper`` (cited on the model card), ``knobs`` (its config fields),
``lr_knob`` (the learning rate of its parameters' optimizer group), ``cross_vocabulary`` (whether it can distill
between models with different vocabularies) and ``default_temperature`` (the KD temperature when
``kd_temperature`` is None). Its constructor is
``(student_model, teacher_model, args, teacher_tokenizer, tokenizer)``.
The package imports every module in it, so a new bridge is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..knobs import check_knobs

BridgeClass = TypeVar("BridgeClass", bound=type)

BRIDGE_REGISTRY: dict[str, type] = {}

_DECLARED = ("paper", "knobs", "lr_knob", "cross_vocabulary", "default_temperature")


def register_bridge(name: str) -> Callable[[BridgeClass], BridgeClass]:
    """Class decorator: make a bridge available as ``DistillationConfig(bridge=name)``."""

    def decorate(cls: BridgeClass) -> BridgeClass:
        if name in BRIDGE_REGISTRY and BRIDGE_REGISTRY[name] is not cls:
            raise ValueError(f"A bridge named '{name}' is already registered ({BRIDGE_REGISTRY[name].__name__}).")
        missing = [attr for attr in _DECLARED if not hasattr(cls, attr)]
        if missing:
            raise ValueError(f"Bridge '{name}' ({cls.__name__}) must declare {missing}.")
        check_knobs(cls)
        cls.name = name
        BRIDGE_REGISTRY[name] = cls
        return cls

    return decorate


def bridge_class(name: str) -> type:
    """The bridge class registered under ``name``; unknown names list the known ones."""
    try:
        return BRIDGE_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(BRIDGE_REGISTRY))
        raise ValueError(f"Unknown bridge '{name}': use None or one of: {known}.") from None
