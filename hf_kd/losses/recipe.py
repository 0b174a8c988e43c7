"""Recipes: weighted sums of named loss terms, e.g. ``"0.5*ce+0.5*akl"`` or ``"ce+dac_kl+span"``.

A recipe is parsed once into a ``Recipe``: each term's class, weight and constructor arguments (``options``). The
trainer builds its loss from it, a bridge its divergence terms, the model card reads its terms' papers.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .core import LogitSource, LossEngine, TokenLoss
from .registry import loss_class

_TERM = re.compile(
    r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*$"
)


def parse_recipe(recipe: str) -> list[tuple[float, str]]:
    """``"0.5*ce+0.5*akl"`` -> [(0.5, "ce"), (0.5, "akl")]; a bare name has weight 1.

    Weights are numbers >= 0 (a negative one would push the student away from the teacher) with a positive,
    finite sum (at 0 nothing is trained); a single term may have weight 0 to be logged only."""
    if not isinstance(recipe, str) or not recipe.strip():
        raise ValueError("A loss recipe must be a non-empty string such as 'akl' or '0.5*ce+0.5*akl'.")
    terms = []
    for part in recipe.split("+"):
        match = _TERM.match(part)
        if match is None:
            raise ValueError(
                f"Cannot parse recipe term '{part.strip()}' in '{recipe}': write terms as 'name' or 'weight*name' "
                "joined by '+', with weights >= 0 (no subtraction: a negative weight would push the student away "
                "from the teacher), e.g. '0.5*ce+0.5*akl'."
            )
        loss_class(match["name"])  # fails early, listing the known names
        terms.append((float(match["weight"] or 1.0), match["name"]))
    names = [name for _, name in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"Recipe '{recipe}' names a term twice; combine the weights instead.")
    total = sum(weight for weight, _ in terms)
    if not 0 < total < math.inf:
        raise ValueError(
            f"The weights of recipe '{recipe}' sum to {total:g}: the loss would be {total:g} whatever the student "
            "does. Give at least one term a positive, finite weight, e.g. '1*fkl' (a term of weight 0 is only logged)."
        )
    return terms


def _takes(cls: type[TokenLoss], argument: str) -> bool:
    return argument in inspect.signature(cls.__init__).parameters


@dataclass(frozen=True)
class RecipeTerm:
    """One term of a recipe: its class, its weight and its constructor arguments (``options``)."""

    cls: type[TokenLoss]
    weight: float
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        temperature = self.options.get("temperature")
        if temperature is not None and not 0 < temperature < math.inf:
            raise ValueError(
                f"{self.name}: temperature must be a positive number, got {temperature}: the logits are divided by "
                "it (0 gives NaN, a negative value inverts the distributions). Use e.g. 1.0, or 2.0 for softer ones."
            )

    @property
    def name(self) -> str:
        return self.cls.name

    def build(self, default_temperature: float | None = None) -> TokenLoss:
        """The term, at ``default_temperature`` (a bridge's KD temperature) unless its options set one."""
        options = dict(self.options)
        if default_temperature is not None and _takes(self.cls, "temperature"):
            options.setdefault("temperature", default_temperature)
        return self.cls(**options)


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its text and its terms in order, each with its class, weight and constructor arguments."""

    text: str
    terms: tuple[RecipeTerm, ...]

    @classmethod
    def parse(
        cls, recipe: str, kwargs: Mapping[str, Any] | None = None, base: Mapping[str, Mapping[str, Any]] | None = None
    ) -> Recipe:
        """``recipe`` (see ``parse_recipe``) with its terms' constructor arguments: ``base[name]`` (a term's own
        options), then ``kwargs``, where ``<name>_<arg>`` targets one term (over its base) and a plain ``arg`` every
        term taking it (under its base). A key no term takes is an error."""
        kwargs, base = dict(kwargs or {}), base or {}
        used: set[str] = set()
        terms = []
        for weight, name in parse_recipe(recipe):
            term_cls = loss_class(name)
            accepted = set(inspect.signature(term_cls.__init__).parameters) - {"self"}
            options = dict(base.get(name, {}))
            for key, value in kwargs.items():
                if key in accepted:
                    options.setdefault(key, value)
                    used.add(key)
                elif key.startswith(f"{name}_") and key[len(name) + 1 :] in accepted:
                    options[key[len(name) + 1 :]] = value
                    used.add(key)
            terms.append(RecipeTerm(term_cls, weight, options))
        unused = sorted(set(kwargs) - used)
        if unused:
            raise ValueError(f"Recipe '{recipe}' has no term that takes {unused}; check the names of the arguments.")
        return cls(recipe, tuple(terms))

    @classmethod
    def from_config(cls, config: Any) -> Recipe:
        """The run's recipe (``config.kd_loss``): each term with the values of its knobs (``config_options``) and
        ``kd_temperature`` when set, then ``loss_kwargs`` as ``parse`` applies them."""
        base = {}
        for _, name in parse_recipe(config.kd_loss):
            term_cls = loss_class(name)
            base[name] = term_cls.config_options(config)
            if config.kd_temperature is not None and _takes(term_cls, "temperature"):
                base[name]["temperature"] = config.kd_temperature
        return cls.parse(config.kd_loss, getattr(config, "loss_kwargs", None), base)

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def build(self, chunk_size: int | None = None, default_temperature: float | None = None) -> DistillationLoss:
        """The loss: every term built (``RecipeTerm.build``) and summed with its weight by one engine."""
        terms = [term.build(default_temperature) for term in self.terms]
        return DistillationLoss(terms, [term.weight for term in self.terms], chunk_size)


class DistillationLoss(nn.Module):
    """A recipe, built: ``loss(student_logits, teacher_logits, labels)`` -> scalar.

    Logits [B, T, V] are aligned with labels [B, T] (no shifting inside); labels == -100 are ignored.
    The value is the weighted sum of each term's mean over tokens (or sum / ``num_items_in_batch``); a term
    computed on other rows (``TokenLoss.positions``, e.g. prompt positions) is divided by
    ``position_counts[positions]`` when given, else by its local row count.
    ``last_values`` holds each term's value from the latest call, for logging.
    ``forward_fused`` takes hidden states and heads instead of logits and never builds full logits.
    """

    def __init__(self, terms: list[TokenLoss], weights: list[float], chunk_size: int | None = None):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.weights = list(weights)
        self.engine = LossEngine(terms, weights, chunk_size)

    @property
    def last_values(self) -> dict[str, torch.Tensor]:
        return self.engine.last_values

    @property
    def recipe(self) -> str:
        return "+".join(f"{w:g}*{t.name}" for w, t in zip(self.weights, self.terms))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        position_counts: dict[str, int | torch.Tensor] | None = None,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        return self.forward_sources(
            LogitSource(student_logits),
            LogitSource(teacher_logits),
            labels,
            num_items_in_batch,
            position_counts,
            **extras,
        )

    def forward_fused(
        self,
        student_hidden: torch.Tensor,
        student_head: nn.Module,
        teacher_hidden: torch.Tensor,
        teacher_head: nn.Module,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        position_counts: dict[str, int | torch.Tensor] | None = None,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """Same value as ``forward(student_head(student_hidden), teacher_head(teacher_hidden), labels)``."""
        return self.forward_sources(
            LogitSource(student_hidden, student_head),
            LogitSource(teacher_hidden, teacher_head),
            labels,
            num_items_in_batch,
            position_counts,
            **extras,
        )

    def forward_sources(
        self,
        student: LogitSource,
        teacher: LogitSource,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        position_counts: dict[str, int | torch.Tensor] | None = None,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """The loss from any two sides (logits, hidden states + head, or cached teacher rows + reconstruction)."""
        return self.engine(
            student,
            teacher,
            labels,
            num_items_in_batch,
            extras,
            trainable=[p for p in self.parameters() if p.requires_grad],
            position_counts=position_counts,
        )


def build_loss(recipe: str, chunk_size: int | None = None, **kwargs: Any) -> DistillationLoss:
    """Build a loss from a recipe. Keyword arguments go to every term that accepts them
    (``temperature=2.0``), or to one term with its name as prefix (``bild_temperature=3.0``)."""
    return Recipe.parse(recipe, kwargs).build(chunk_size)
