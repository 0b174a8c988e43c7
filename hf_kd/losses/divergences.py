"""Token-level divergences every KD library has: FKL, RKL, GKD's generalized JSD, skew KL, and CE.

Notation: p is the teacher distribution, q the student's, both at the term's temperature.

From a teacher cache (``hf_kd.teacher_cache``) p is the reconstructed distribution: the cached top-k
probabilities and the remaining mass spread evenly over the other tokens. Every term here then computes
the same formula on it; the error against the live teacher is bounded through KL(p || p_hat) (see
``benchmarks/teacher_cache.py``). CE does not read the teacher at all.
"""

from __future__ import annotations

import math

import torch

from .core import TokenLoss, TokenRows
from .registry import register_loss


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (finite where p == 0, see the engine's clamping)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


@register_loss("fkl")
class ForwardKL(TokenLoss):
    """Forward KL(p || q) at temperature T (mode covering)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        return kl_rows(rows.teacher_logprobs(t), rows.student_logprobs(t))


@register_loss("rkl")
class ReverseKL(TokenLoss):
    """Reverse KL(q || p) at temperature T (mode seeking)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        return kl_rows(rows.student_logprobs(t), rows.teacher_logprobs(t))


@register_loss("jsd")
class GeneralizedJSD(TokenLoss):
    """GKD's generalized Jensen-Shannon divergence (arXiv 2306.13649, Eq. 1), as TRL computes it.

    beta = 0 gives KL(p || q), beta = 1 gives KL(q || p); otherwise with m = beta p + (1 - beta) q:
    beta KL(p || m) + (1 - beta) KL(q || m).
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd: beta must be in [0, 1], got {beta}.")
        self.beta = beta
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t, beta = self.temperature, self.beta
        log_p, log_q = rows.teacher_logprobs(t), rows.student_logprobs(t)
        if beta == 0.0:
            return kl_rows(log_p, log_q)
        if beta == 1.0:
            return kl_rows(log_q, log_p)
        log_m = log_mixture(log_p, log_q, beta)
        return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)


@register_loss("sfkl")
class SkewForwardKL(TokenLoss):
    """Skew forward KL (DistiLLM, arXiv 2402.03898): KL(p || alpha p + (1 - alpha) q)."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"sfkl: alpha must be in (0, 1), got {alpha}.")
        self.alpha = alpha
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        log_p, log_q = rows.teacher_logprobs(t), rows.student_logprobs(t)
        return kl_rows(log_p, log_mixture(log_p, log_q, self.alpha))


@register_loss("srkl")
class SkewReverseKL(TokenLoss):
    """Skew reverse KL (DistiLLM, arXiv 2402.03898): KL(q || alpha q + (1 - alpha) p)."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"srkl: alpha must be in (0, 1), got {alpha}.")
        self.alpha = alpha
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        log_p, log_q = rows.teacher_logprobs(t), rows.student_logprobs(t)
        return kl_rows(log_q, log_mixture(log_q, log_p, self.alpha))


@register_loss("ce")
class CrossEntropy(TokenLoss):
    """Cross-entropy of the student on the labels (the SFT term); no temperature."""

    teacher_needs = "nothing"

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return -rows.student_logprobs(1.0).gather(-1, rows.labels.unsqueeze(-1)).squeeze(-1)
