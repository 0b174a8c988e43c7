"""AKL: adaptive Kullback-Leibler divergence (Wu et al., arXiv 2404.02657, COLING 2025).

FKL fits the head of the teacher distribution early and RKL its tail; AKL weighs them per token by
the student's error on each part. Sort p descending and put the (detached) q in the same order;
e_i = |p_i - q_i|. The head is the positions whose cumulative teacher probability is <= mu (the top-1
is always head), the tail the rest; g_head = sum_head e_i, g_tail = sum_tail e_i, and

    AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p).

As in the official snippet the weights carry no gradient. The official snippet applies no temperature
(default 1.0 here); DSKD's copy uses its KD temperature, which ``temperature`` allows.
Difference from the snippet, exact up to ties: instead of sorting the whole vocabulary, only the
top-K teacher entries are sorted, with K doubled until the head boundary lies inside them, since
g_tail = sum_all e - g_head.
"""

from __future__ import annotations

import torch

from .core import TokenLoss, TokenRows
from .divergences import kl_rows
from .registry import register_loss


def akl_head_weight(p: torch.Tensor, q: torch.Tensor, mu: float, start_k: int = 64) -> torch.Tensor:
    """g_head / (g_head + g_tail) per row (p, q: probabilities [n, V], no gradient)."""
    vocab = p.shape[-1]
    error_total = (p - q).abs().sum(-1)
    k = min(start_k, vocab)
    while True:
        top_p, top_idx = p.topk(k, dim=-1)
        in_head = top_p.cumsum(-1) <= mu
        in_head[:, 0] = True
        # the head is complete when its boundary lies inside the top-k (or k covers the vocabulary)
        if k == vocab or not in_head[:, -1].any():
            break
        k = min(2 * k, vocab)
    head_error = ((top_p - q.gather(-1, top_idx)).abs() * in_head).sum(-1)
    return head_error / error_total.clamp_min(torch.finfo(p.dtype).tiny)


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
