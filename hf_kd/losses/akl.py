"""AKL: adaptive Kullback-Leibler divergence (Wu et al., arXiv 2404.02657, COLING 2025).

FKL fits the head of the teacher distribution early and RKL its tail; AKL weighs them per token by
the student's error on each part. Sort p descending and put the (detached) q in the same order;
e_i = |p_i - q_i|. The head is the positions whose cumulative teacher probability is <= mu (the top-1
is always head), the tail the rest; g_head = sum_head e_i, g_tail = sum_tail e_i, and

    AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p).

As in the official snippet the weights carry no gradient. The official snippet applies no temperature
(default 1.0 here); DSKD's copy uses its KD temperature, which ``temperature`` allows.
Difference from the snippet, exact up to ties: instead of sorting the whole vocabulary, only the top-64
teacher entries are sorted (rows whose head reaches past them are sorted in full), since
g_tail = sum_all e - g_head.
From a teacher cache the head is read from the cached top-k (it is exact while the head lies inside it);
the tail sums are over the reconstructed flat tail.
"""

from __future__ import annotations

import torch

from .core import TokenLoss, TokenRows
from .divergences import kl_rows
from .registry import register_loss


def akl_head_weight(p: torch.Tensor, q: torch.Tensor, mu: float, start_k: int = 64) -> torch.Tensor:
    """g_head / (g_head + g_tail) per row (p, q: probabilities [n, V], no gradient).

    The top-``start_k`` teacher entries settle almost every row; the rare rows whose head reaches past them
    (near-uniform teachers) are sorted in full, on their own.
    """
    error_total = (p - q).abs().sum(-1)
    head_error = _head_error(p, q, mu, min(start_k, p.shape[-1]))
    open_rows = head_error.isnan().nonzero().squeeze(-1)
    if open_rows.numel():
        head_error[open_rows] = _head_error(p[open_rows], q[open_rows], mu, p.shape[-1])
    return head_error / error_total.clamp_min(torch.finfo(p.dtype).tiny)


def _head_error(p: torch.Tensor, q: torch.Tensor, mu: float, k: int) -> torch.Tensor:
    """sum over the head of |p_i - q_i| from the top-k teacher entries; NaN where the head may extend past k."""
    top_p, top_idx = p.topk(k, dim=-1)
    in_head = top_p.cumsum(-1) <= mu
    in_head[:, 0] = True
    head_error = ((top_p - q.gather(-1, top_idx)).abs() * in_head).sum(-1)
    if k < p.shape[-1]:
        head_error = head_error.masked_fill(in_head[:, -1], float("nan"))
    return head_error


@register_loss("akl")
class AdaptiveKL(TokenLoss):
    """Adaptive KL: head-error-weighted FKL plus tail-error-weighted RKL (see module docstring)."""

    def __init__(self, mu: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < mu < 1.0:
            raise ValueError(f"akl: mu must be in (0, 1), got {mu}.")
        self.mu = mu
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        log_p, log_q = rows.teacher_logprobs(t), rows.student_logprobs(t)
        with torch.no_grad():
            w_head = akl_head_weight(rows.teacher_probs(t), rows.student_probs(t).detach(), self.mu)
        return w_head * kl_rows(log_p, log_q) + (1 - w_head) * kl_rows(log_q, log_p)
