"""Recipes: weighted sums of named loss terms, e.g. ``"0.5*ce+0.5*akl"`` or ``"ce+dac_kl+span"``."""

from __future__ import annotations

import inspect
import math
import re
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


def _term_kwargs(name: str, cls: type[TokenLoss], kwargs: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """Keyword arguments for one term: ``<name>_<arg>`` targets this term, a plain ``arg`` every term taking it."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    chosen = {}
    for key, value in kwargs.items():
        if key in accepted:
            chosen.setdefault(key, value)
            used.add(key)
    for key, value in kwargs.items():
        prefix = f"{name}_"
        if key.startswith(prefix) and key[len(prefix) :] in accepted:
            chosen[key[len(prefix) :]] = value
            used.add(key)
    return chosen


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
    used: set[str] = set()
    terms, weights = [], []
    for weight, name in parse_recipe(recipe):
        cls = loss_class(name)
        term_kwargs = _term_kwargs(name, cls, kwargs, used)
        temperature = term_kwargs.get("temperature")
        if temperature is not None and not 0 < temperature < math.inf:
            raise ValueError(
                f"{name}: temperature must be a positive number, got {temperature}: the logits are divided by it "
                "(0 gives NaN, a negative value inverts the distributions). Use e.g. 1.0, or 2.0 for softer ones."
            )
        terms.append(cls(**term_kwargs))
        weights.append(weight)
    unused = sorted(set(kwargs) - used)
    if unused:
        raise ValueError(f"Recipe '{recipe}' has no term that takes {unused}; check the names of the arguments.")
    return DistillationLoss(terms, weights, chunk_size)
