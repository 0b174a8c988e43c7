"""A teacher given as top-k rows: its top-k log-probabilities and tail mass per response token, rebuilt to dense
rows chunk by chunk. One piece for every source that delivers those rows: the offline cache, and a served teacher
whose prompt log-probabilities are packed the same way."""

from __future__ import annotations

from typing import Any

import torch

from ..losses import LogitSource, TeacherSignal, TokenLoss
from ..teacher_cache import TopKReconstruction
from .base import LogitSpaceSource, TeacherLogits

TEACHER_ROWS = "teacher_rows"  # batch key: [B, L - 1, 2k + 1] rows packed by hf_kd.teacher_cache.encoding.pack_rows


class TopKTeacher(LogitSpaceSource):
    """The batch's ``teacher_rows`` through ``TopKReconstruction`` (the top-k, then a flat or student-shaped tail):
    feeds the terms that work from the teacher's top-k and tail (``TeacherSignal.TOP_K``) and those that read no
    teacher. Subclasses fill ``teacher_rows`` (a collator, or a client of a server)."""

    signals = frozenset({TeacherSignal.NOTHING, TeacherSignal.TOP_K})
    holds = "the teacher's top-k and tail at the response tokens only"
    rows = "top-k rows"  # what its teacher rows are, for messages
    temperature: float = 1.0  # the temperature its rows hold the teacher at
    temperature_fix = "set kd_temperature={stored}"  # how to train a term at another temperature, for the refusal
    reconstruction: TopKReconstruction | None = None  # set once the vocabulary is known

    def check_terms(self, terms: list[TokenLoss]) -> None:
        """Also refuse a term that reads the teacher's distribution at another temperature than the rows'."""
        super().check_terms(terms)
        stored = self.temperature
        for term in terms:
            temperature = getattr(term, "temperature", stored)
            if term.teacher_needs == TeacherSignal.TOP_K and temperature != stored:
                raise ValueError(
                    f"Loss term '{term.name}' runs at temperature {temperature} but {self.description} gives the "
                    f"teacher at {stored}: the top-k would rescale exactly but the flat tail would not (its mass at "
                    f"another temperature is far off, see benchmarks/teacher_cache.py). "
                    + self.temperature_fix.format(temperature=temperature, stored=stored)
                    + "."
                )

    def rows_name(self, fused: bool) -> str:
        return self.rows

    def teacher_rows(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The batch's packed top-k rows [B, L - 1, 2k + 1] (here: those its collator put in the batch)."""
        return inputs[TEACHER_ROWS]

    def teacher_logits(self, inputs: dict[str, Any], device: torch.device, fused: bool) -> TeacherLogits:
        return TeacherLogits(LogitSource(self.teacher_rows(inputs).to(device), self.reconstruction))
