"""Knobs: the options a loss term or a bridge declares once, and the config fields derived from them.

A ``Knob`` names a ``DistillationConfig`` field (so also a CLI flag and a YAML key) with its help text. A knob that
sets a constructor argument (``arg``) takes its default from that argument's default in the constructor, the
paper's default: there is no second copy. A knob read elsewhere (a learning rate, a per-token input's option) gives
its ``default`` itself. ``knob_fields`` turns the knobs of the registered terms and bridges into a dataclass that
``DistillationConfig`` inherits from.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_UNSET: Any = object()  # a Knob's `default` when the constructor argument gives it


@dataclass(frozen=True)
class Knob:
    """One option of a term or bridge: ``field`` in the config, set from ``arg`` of the constructor or ``default``."""

    field: str
    help: str
    arg: str | None = None
    default: Any = _UNSET

    def __post_init__(self):
        if (self.arg is None) == (self.default is _UNSET):
            raise ValueError(f"Knob '{self.field}': give either `arg` (a constructor argument) or `default`.")

    def default_for(self, owner: type) -> Any:
        """The knob's default: ``default``, or the default of ``arg`` in ``owner.__init__``."""
        if self.arg is None:
            return self.default
        parameter = inspect.signature(owner.__init__).parameters.get(self.arg)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise ValueError(
                f"Knob '{self.field}' of {owner.__name__} sets '{self.arg}', which is not a constructor argument "
                "with a default."
            )
        return parameter.default


def check_knobs(owner: type) -> None:
    """Fail at registration, not mid-run: every knob resolves its default and ``lr_knob`` names one of them."""
    fields = {knob.field for knob in owner.knobs}
    for knob in owner.knobs:
        knob.default_for(owner)
    if owner.lr_knob is not None and owner.lr_knob not in fields:
        raise ValueError(f"{owner.__name__}: lr_knob '{owner.lr_knob}' is not one of its knobs {sorted(fields)}.")


def knob_fields(owners: Iterable[type], class_name: str, skip: Iterable[str] = ()) -> type:
    """A dataclass with one field per distinct knob of ``owners`` (classes with a ``knobs`` tuple).

    Owners may share a knob (sfkl and srkl share ``skew_alpha``) if they agree on its default. Fields in ``skip``
    are defined elsewhere (e.g. GKD's ``beta``, which the ``jsd`` term reads) and are not added again.
    """
    found: dict[str, tuple[Any, str, str]] = {}
    for owner in owners:
        for knob in owner.knobs:
            default = knob.default_for(owner)
            if knob.field in found and found[knob.field][0] != default:
                raise ValueError(
                    f"Knob '{knob.field}' has default {default!r} in {owner.__name__} but "
                    f"{found[knob.field][0]!r} in {found[knob.field][2]}: shared knobs need one default."
                )
            found.setdefault(knob.field, (default, knob.help, owner.__name__))
    skipped = set(skip)
    fields = [
        (name, type(default), dataclasses.field(default=default, metadata={"help": text}))
        for name, (default, text, _) in found.items()
        if name not in skipped
    ]
    return dataclasses.make_dataclass(class_name, fields)


__all__ = ["Knob", "check_knobs", "knob_fields"]
