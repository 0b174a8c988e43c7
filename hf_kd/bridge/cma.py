"""Cross-model attention (CMA) of DSKD (Zhang et al., arXiv 2406.17328, Sec. 3.3): aligning two tokenizations.

When teacher and student tokenize the same text differently, position t of the student has no teacher
position to compare with. CMA learns a soft alignment. With x the input token and y the target (next) token of
each position, E_s / E_t the embedding tables and h_s / h_t the last hidden states:

    Q = P_query([E_s(x); E_s(y)])                     P_query: Linear(2 d_s -> 2 d_t)
    K = [E_t(x); E_t(y)] / std                         (no parameters)
    V_t = P_t2s(h_t / std + E_t(y) / std)              V_s = P_s2t(h_s)
    A = Q K^T / sqrt(2 d_t)
    t2s hidden = softmax(A) V_t        (one row per student position, in the student's space)
    s2t hidden = softmax(A^T) V_s      (one row per teacher position, in the teacher's space)

Only response positions (target != -100) take part: in softmax(A) the teacher's other positions are masked, in
softmax(A^T) the student's. Embeddings enter detached, as in the official code.

Differences from the official code (``DualSpaceKDWithCMA``): the normalising standard deviations are taken over
the response positions only (the official code takes them over the whole padded batch, where masked positions
hold the embedding of token 0, so its scale depends on the amount of padding); masking uses the most negative
finite value of the dtype instead of adding -1e5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import IGNORE_INDEX


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation of all entries of ``x`` [B, T, d] at the positions where ``mask`` [B, T] holds.

    Falls back to 1 when fewer than two entries are selected (nothing to normalise).
    """
    values = x[mask].float()
    if values.numel() < 2:
        return torch.ones((), dtype=torch.float32, device=x.device)
    return values.std().clamp_min(torch.finfo(torch.float32).tiny)


def index_embeddings(
    embedding: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (E(x), E(y)) for inputs x and targets y [B, T]; positions whose target is -100 look up token 0.

    ``targets[:, t]`` is the label that position t predicts (already shifted).
    """
    valid = targets != IGNORE_INDEX
    with torch.no_grad():
        x = embedding(torch.where(valid, input_ids, torch.zeros_like(input_ids)))
        y = embedding(torch.where(valid, targets, torch.zeros_like(targets)))
    return x.detach().float(), y.detach().float()


def masked_softmax(scores: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of ``scores`` [B, Q, K], keys where ``key_mask`` [B, K] is False excluded.

    A row whose keys are all masked gets uniform weights (it is never used by the loss).
    """
    filled = scores.masked_fill(~key_mask.unsqueeze(1), torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1)


@dataclass
class CMAOutput:
    """Hidden states moved across the two spaces, and the attention weights that moved them."""

    t2s_hidden: torch.Tensor  # [B, T_s, d_s], aligned with the student's positions
    s2t_hidden: torch.Tensor  # [B, T_t, d_t], aligned with the teacher's positions
    t2s_weights: torch.Tensor  # [B, T_s, T_t], rows sum to 1
    s2t_weights: torch.Tensor  # [B, T_t, T_s], rows sum to 1


class CrossModelAttention(nn.Module):
    """The query projector of DSKD-CMA and the alignment it defines (see the module docstring)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.query = nn.Linear(2 * student_dim, 2 * teacher_dim)

    def scores(
        self,
        student_index: torch.Tensor,
        teacher_index: torch.Tensor,
        teacher_mask: torch.Tensor,
    ) -> torch.Tensor:
        """A = P_query(student_index) (teacher_index / std)^T / sqrt(2 d_t), shape [B, T_s, T_t].

        ``student_index`` = [E_s(x); E_s(y)] [B, T_s, 2 d_s], ``teacher_index`` = [E_t(x); E_t(y)] [B, T_t, 2 d_t].
        """
        dim = teacher_index.shape[-1]
        if dim != self.query.out_features:
            raise ValueError(
                f"Teacher embeddings have width {dim // 2} but the query projector was built for "
                f"{self.query.out_features // 2}: build the bridge with the same teacher model."
            )
        q = self.query(student_index.to(self.query.weight.dtype)).float()
        k = (teacher_index / masked_std(teacher_index, teacher_mask)).float()
        return q @ k.transpose(-1, -2) / math.sqrt(dim)

    def forward(
        self,
        student_inputs: tuple[torch.Tensor, torch.Tensor],
        teacher_inputs: tuple[torch.Tensor, torch.Tensor],
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        student_mask: torch.Tensor,
        teacher_mask: torch.Tensor,
        t2s: nn.Module,
        s2t: nn.Module,
    ) -> CMAOutput:
        """Align both ways.

        ``student_inputs`` / ``teacher_inputs``: (E(x), E(y)) from :func:`index_embeddings`; ``*_hidden``: last
        hidden states [B, T, d] aligned with them; ``*_mask``: response positions [B, T]; ``t2s`` / ``s2t``: the
        DSKD projectors, which produce the values.
        """
        s_x, s_y = student_inputs
        t_x, t_y = teacher_inputs
        scores = self.scores(torch.cat([s_x, s_y], -1), torch.cat([t_x, t_y], -1), teacher_mask)
        t2s_weights = masked_softmax(scores, teacher_mask)
        s2t_weights = masked_softmax(scores.transpose(-1, -2), student_mask)

        h_t = teacher_hidden.float()
        teacher_values_in = h_t / masked_std(h_t, teacher_mask) + t_y / masked_std(t_y, teacher_mask)
        teacher_values = t2s(teacher_values_in.to(t2s.weight.dtype)).float()
        student_values = s2t(student_hidden.to(s2t.weight.dtype)).float()
        return CMAOutput(
            t2s_hidden=t2s_weights @ teacher_values,
            s2t_hidden=s2t_weights @ student_values,
            t2s_weights=t2s_weights,
            s2t_weights=s2t_weights,
        )


__all__ = ["CMAOutput", "CrossModelAttention", "index_embeddings", "masked_softmax", "masked_std"]
