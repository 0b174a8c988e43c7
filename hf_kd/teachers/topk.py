"""A teacher given as top-k rows: its top-k log-probabilities and tail mass per response token, rebuilt to dense
rows chunk by chunk. One piece for every source that delivers those rows: the offline cache, and a served teacher
whose prompt log-probabilities are packed the same way."""

from __future__ import annotations

from typing import Any

import torch

from ..losses import LogitSource, TeacherSignal
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

    def __init__(self, reconstruction: TopKReconstruction):
        self.reconstruction = reconstruction

    def rows_name(self, fused: bool) -> str:
        return self.rows

    def teacher_logits(self, inputs: dict[str, Any], device: torch.device, fused: bool) -> TeacherLogits:
        return TeacherLogits(LogitSource(inputs[TEACHER_ROWS].to(device), self.reconstruction))
