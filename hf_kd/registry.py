"""Name -> class registries filled by class decorators: loss terms (``hf_kd.losses``) and bridges (``hf_kd.bridge``).

Each package imports every module in it, so a new method is one new file with one ``@register...`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .knobs import check_knobs

Registered = TypeVar("Registered", bound=type)


class Registry(dict):
    """A ``dict`` of registered classes with the decorator that fills it and a lookup that lists the known names.

    ``declared``: attributes every registered class must have; registering names the class (``cls.name``) and
    checks its knobs (``hf_kd.knobs.check_knobs``).
    """

    def __init__(self, kind: str, declared: tuple[str, ...] = (), unknown_hint: str = "Known:"):
        super().__init__()
        self.kind = kind
        self.declared = declared
        self.unknown_hint = unknown_hint

    def register(self, name: str) -> Callable[[Registered], Registered]:
        def decorate(cls: Registered) -> Registered:
            if name in self and self[name] is not cls:
                raise ValueError(f"A {self.kind} named '{name}' is already registered ({self[name].__name__}).")
            missing = [attr for attr in self.declared if not hasattr(cls, attr)]
            if missing:
                raise ValueError(f"{self.kind.capitalize()} '{name}' ({cls.__name__}) must declare {missing}.")
            check_knobs(cls)
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def lookup(self, name: str) -> type:
        """The class registered under ``name``; an unknown name is an error listing the known ones."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise ValueError(f"Unknown {self.kind} '{name}'. {self.unknown_hint} {known}.") from None
