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

from ..registry import Registry

BridgeClass = TypeVar("BridgeClass", bound=type)

BRIDGE_REGISTRY = Registry(
    "bridge",
    declared=("paper", "knobs", "lr_knob", "cross_vocabulary", "default_temperature"),
    unknown_hint="Use None or one of:",
)


def register_bridge(name: str) -> Callable[[BridgeClass], BridgeClass]:
    """Class decorator: make a bridge available as ``DistillationConfig(bridge=name)``."""
    return BRIDGE_REGISTRY.register(name)


def bridge_class(name: str) -> type:
    """The bridge class registered under ``name``; unknown names list the known ones."""
    return BRIDGE_REGISTRY.lookup(name)
