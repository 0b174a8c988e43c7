"""Knobs: the options of a loss term or a bridge, declared once, as fields of a small dataclass in the method's file.

``knob(default, help, arg=...)`` makes one field: a ``DistillationConfig`` field, so also a CLI flag and a YAML key,
with its help text. A method groups its knobs in a dataclass (``AKLKnobs`` in ``losses/akl.py``) that its class
names (``knobs = AKLKnobs``) and that ``DistillationConfig`` inherits from, so a reader, an IDE and a type checker
see every field. A knob that sets a constructor argument names it (``arg``), and the constructor takes its default
from the field (``mu: float = AKLKnobs.akl_mu``): there is no second copy. A knob read elsewhere (a learning rate,
a per-token input's option) has no ``arg``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any


class KnobField(dataclasses.Field):
    """A dataclass field that also names the constructor argument it sets (``arg``). Not in ``metadata``: the
    argument parsers hand every metadata key to ``argparse``."""

    __slots__ = ("arg",)


def knob(default: Any, help: str, arg: str | None = None) -> Any:
    """One knob field: its ``default``, its ``help`` text (the CLI's) and the constructor argument it sets, if any."""
    plain = dataclasses.field(default=default, metadata={"help": help})
    made = KnobField.__new__(KnobField)
    for slot in dataclasses.Field.__slots__:
        setattr(made, slot, getattr(plain, slot))
    made.arg = arg
    return made


@dataclass(frozen=True)
class Knob:
    """One declared knob, as read back from its field: ``field`` of the config, ``arg`` of the constructor it sets."""

    field: str
    help: str
    default: Any
    arg: str | None = None


def knobs_of(owner: type) -> tuple[Knob, ...]:
    """The knobs a term or bridge class declares: the fields of its ``knobs`` dataclass (none when it is None)."""
    declared = getattr(owner, "knobs", None)
    if declared is None:
        return ()
    return tuple(
        Knob(f.name, f.metadata["help"], f.default, getattr(f, "arg", None)) for f in dataclasses.fields(declared)
    )


def knob_value(config: Any, knob: Knob) -> Any:
    """The knob's value in ``config``: a ``DistillationConfig``'s field (its ``knob_value`` refuses a knob it has no
    field for), or the knob's default where a plain namespace lacks it (a bridge built outside a trainer)."""
    if hasattr(config, "knob_value"):
        return config.knob_value(knob.field)
    return getattr(config, knob.field, knob.default)


def check_knobs(owner: type) -> None:
    """Fail at registration, not mid-run: ``knobs`` is a dataclass of ``knob`` fields, each constructor knob's
    argument defaults to its field's default, and ``lr_knob`` names one of them."""
    declared = getattr(owner, "knobs", None)
    if declared is not None and not (isinstance(declared, type) and dataclasses.is_dataclass(declared)):
        raise ValueError(
            f"{owner.__name__}.knobs must be None or a dataclass of `hf_kd.knobs.knob` fields, got {declared!r}."
        )
    knobs = knobs_of(owner)
    for item in knobs:
        if item.arg is None:
            continue
        parameter = inspect.signature(owner.__init__).parameters.get(item.arg)
        if parameter is None or parameter.default != item.default:
            raise ValueError(
                f"Knob '{item.field}' of {owner.__name__} sets '{item.arg}', which must be a constructor argument "
                f"defaulting to the knob's default {item.default!r}: write `{item.arg}={declared.__name__}."
                f"{item.field}` in the constructor."
            )
    fields = {item.field for item in knobs}
    if owner.lr_knob is not None and owner.lr_knob not in fields:
        raise ValueError(f"{owner.__name__}: lr_knob '{owner.lr_knob}' is not one of its knobs {sorted(fields)}.")


__all__ = ["Knob", "KnobField", "check_knobs", "knob", "knob_value", "knobs_of"]
