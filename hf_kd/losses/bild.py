"""BiLD: bi-directional logits difference loss (Li et al., arXiv 2406.13555).

Only the top-k logits matter. t-LD: take the teacher's top-k vocabulary entries, gather both models'
logits there (divided by T), form all k(k-1)/2 differences z_i - z_j (i < j, in the teacher's ranking)
and take KL(softmax(teacher differences) || softmax(student differences)). s-LD: the same with the
student's top-k entries. BiLD = t-LD + s-LD per token, mean over response tokens; as in the paper's
runs there is no T^2 factor. Defaults follow the official code: k = 8, T = 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import knob
from ..papers import BILD
from .core import TeacherSignal, TokenLoss, TokenRows
from .divergences import kl_rows
from .registry import register_loss


def pairwise_differences(values: torch.Tensor) -> torch.Tensor:
    """[n, k] -> [n, k(k-1)/2]: values[:, i] - values[:, j] for every i < j."""
    k = values.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=values.device)
    return values[:, i] - values[:, j]


def logit_difference_kl(leader: torch.Tensor, follower: torch.Tensor, student_leads: bool, k: int) -> torch.Tensor:
    """KL between the softmaxed pairwise differences of the teacher and student logits at the leader's top-k."""
    top_idx = leader.detach().topk(k, dim=-1).indices
    floor = torch.finfo(leader.dtype).min / 2  # -inf logits (masked entries) would give inf - inf
    lead_diffs = pairwise_differences(leader.gather(-1, top_idx).clamp(min=floor))
    follow_diffs = pairwise_differences(follower.gather(-1, top_idx).clamp(min=floor))
    student_diffs, teacher_diffs = (lead_diffs, follow_diffs) if student_leads else (follow_diffs, lead_diffs)
    return kl_rows(torch.log_softmax(teacher_diffs, -1), torch.log_softmax(student_diffs, -1))


@dataclass
class BiLDKnobs:
    """BiLD's options (``DistillationConfig`` fields)."""

    bild_top_k: int = knob(8, "BiLD: number of top logits whose differences are used.", arg="top_k")


@register_loss("bild")
class BiLD(TokenLoss):
    """Teacher-led plus student-led logit-difference KL over the top-k logits.

    Not trainable from a teacher cache: the student-led half reads the teacher's logits at the student's
    top-k tokens, which a cache of the teacher's own top-k does not hold.
    """

    paper = BILD
    knobs = BiLDKnobs
    teacher_needs = TeacherSignal.FULL_ROWS  # the teacher at the student's own top-k tokens

    def __init__(self, top_k: int = BiLDKnobs.bild_top_k, temperature: float = 3.0):
        super().__init__()
        if top_k < 2:
            raise ValueError(f"bild: top_k must be >= 2 (differences need two logits), got {top_k}.")
        self.top_k = top_k
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        s, t = rows.student_logits(self.temperature), rows.teacher_logits(self.temperature)
        k = min(self.top_k, s.shape[-1])
        t_led = logit_difference_kl(t, s, student_leads=False, k=k)
        s_led = logit_difference_kl(s, t, student_leads=True, k=k)
        return t_led + s_led
