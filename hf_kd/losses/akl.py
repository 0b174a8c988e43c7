"""AKL: adaptive Kullback-Leibler divergence (Wu et al., arXiv 2404.02657, COLING 2025).

FKL fits the head of the teacher distribution early and RKL its tail; AKL weighs them per token by
the student's error on each part. Sort p descending and put the (detached) q in the same order;
e_i = |p_i - q_i|. The head is the positions whose cumulative teacher probability is <= mu (the top-1
is always head), the tail the rest; g_head = sum_head e_i, g_tail = sum_tail e_i, and

    AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p).

As in the official snippet the weights carry no gradient. The official snippet applies no temperature
(default 1.0 here); DSKD's copy uses its KD temperature, which ``temperature`` allows.
Difference from the snippet, exact up to ties: instead of sorting the whole vocabulary, only the top-64
teacher entries are sorted (rows whose head reaches past them take the top 256, 1024, ... until it fits),
since g_tail = sum_all e - g_head. The gradient is written in closed form (see ``divergences``):
w (q - p) + (1 - w) q (log q - log p - KL(q || p)).
From a teacher cache the head is read from the cached top-k (it is exact while the head lies inside it);
the tail sums are over the reconstructed flat tail.
"""

from __future__ import annotations

import torch

from ..knobs import Knob
from ..papers import Paper
from .core import TokenLoss, TokenRows
from .divergences import row_dot, softmax_backward, with_gradient
from .registry import register_loss


def akl_head_weight(p: torch.Tensor, q: torch.Tensor, mu: float, start_k: int = 64) -> torch.Tensor:
    """g_head / (g_head + g_tail) per row (p, q: probabilities [n, V], no gradient).

    The top-``start_k`` teacher entries settle almost every row; the rare rows whose head reaches past them
    (flat teachers) are retried on their own with a 4x longer prefix, up to the whole vocabulary. A row holding
    NaN (non-finite logits, a temperature of 0) gives NaN, which the caller sees in the loss value.
    """
    return _head_error_prefix(p, q, mu, start_k) / (p - q).norm(p=1, dim=-1).clamp_min(torch.finfo(p.dtype).tiny)


def _head_error_prefix(p: torch.Tensor, q: torch.Tensor, mu: float, start_k: int) -> torch.Tensor:
    vocab = p.shape[-1]
    head_error = _head_error(p, q, mu, min(start_k, vocab))
    open_rows, k = head_error.isnan().nonzero().squeeze(-1), min(start_k, vocab)
    while open_rows.numel() and k < vocab:  # the whole vocabulary is exact: a NaN left there is the input's
        k = min(4 * k, vocab)
        retry = _head_error(p[open_rows], q[open_rows], mu, k)
        head_error[open_rows] = retry
        open_rows = open_rows[retry.isnan()]
    return head_error


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

    paper = Paper(
        "AKL",
        "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models",
        "2404.02657",
        """@article{wu2024rethinking,
  title   = {Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models},
  author  = {Wu, Taiqiang and Tao, Chaofan and Wang, Jiahao and Yang, Runming and Zhao, Zhe and Wong, Ngai},
  journal = {arXiv preprint arXiv:2404.02657},
  year    = {2024}
}""",
    )
    knobs = (Knob("akl_mu", "AKL head/tail boundary: cumulative teacher probability.", arg="mu"),)

    def __init__(self, mu: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < mu < 1.0:
            raise ValueError(f"akl: mu must be in (0, 1), got {mu}.")
        self.mu = mu
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        p, q = rows.detached_probs("t", t), rows.detached_probs("s", t)
        with torch.no_grad():
            w_head = akl_head_weight(p, q, self.mu).unsqueeze(-1)
            log_ratio = rows.detached_logprobs("s", t) - rows.detached_logprobs("t", t)  # log q - log p
            rkl = row_dot(q, log_ratio)
            value = torch.lerp(rkl, -row_dot(p, log_ratio), w_head.squeeze(-1))

        def grad() -> torch.Tensor:
            fkl_grad = torch.sub(q, p).mul_(w_head)
            return softmax_backward(q, log_ratio, rkl).mul_(1 - w_head).add_(fkl_grad)

        return with_gradient(rows.student_logits(t), value, grad)
