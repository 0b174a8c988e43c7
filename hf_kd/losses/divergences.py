"""Token-level divergences every KD library has: FKL, RKL, GKD's generalized JSD, skew KL, and CE.

Notation: p is the teacher distribution, q the student's, both at the term's temperature, z the student's
logits at that temperature.

Speed: the divergences are computed without autograd. Each term forms its per-row value and its gradient with
respect to z in closed form from the (cached, detached) log-probabilities, and ``with_gradient`` attaches that
gradient to z. This saves the dozen [rows, V] temporaries autograd would record and replay per chunk. The
closed forms all follow from dq_v/dz_u = q_v (1[u = v] - q_u): a row value f(q) with a_v = df/dq_v has
df/dz = q (a - <q, a>). Where a logit is -inf the gradient there is 0 (q = 0); the autograd reference of the
clamped formula may differ at those entries only.

From a teacher cache (``hf_kd.teacher_cache``) p is the reconstructed distribution: the cached top-k
probabilities and the remaining mass spread evenly over the other tokens. Every term here then computes
the same formula on it; the error against the live teacher is bounded through KL(p || p_hat) (see
``benchmarks/teacher_cache.py``). CE does not read the teacher at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import knob
from ..papers import DISTILLM, GKD
from .core import TeacherSignal, TokenLoss, TokenRows
from .registry import register_loss


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (finite where p == 0, see the engine's clamping)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[:, v] * b[:, v] in one pass, without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _AnalyticGradient(torch.autograd.Function):
    """Identity on ``value`` whose gradient with respect to ``logits`` is ``grad`` (one row of it per value)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_value * ctx.scale).unsqueeze(-1).to(grad.dtype), None, None, None


def with_gradient(logits: torch.Tensor, value: torch.Tensor, grad_fn, scale: float = 1.0) -> torch.Tensor:
    """``value`` ([n], no graph) carrying d value / d logits = ``scale * grad_fn()`` ([n, V]) back to ``logits``.

    ``grad_fn`` is only called when ``logits`` needs a gradient, so no-grad evaluation skips the gradient; a
    constant factor of it goes in ``scale``, which costs nothing (it joins the upstream gradient, a vector).
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return value
    with torch.no_grad():
        grad = grad_fn()
    return _AnalyticGradient.apply(logits, value, grad, scale)


def softmax_backward(q: torch.Tensor, a: torch.Tensor, q_dot_a: torch.Tensor | None = None) -> torch.Tensor:
    """q (a - <q, a>): the gradient with respect to the logits of f(q) with df/dq = a ([n, V]); overwrites ``a``.

    Formed as q a - q <q, a> so that entries with q = 0 stay 0 even where a is near the float limit.
    """
    q_dot_a = row_dot(q, a) if q_dot_a is None else q_dot_a
    return a.mul_(q).addcmul_(q, q_dot_a.unsqueeze(-1), value=-1.0)


def forward_kl(rows: TokenRows, t: float) -> torch.Tensor:
    """KL(p || q) per row, with gradient q - p."""
    p = rows.detached_probs("t", t)
    value = row_dot(p, rows.detached_logprobs("t", t)) - row_dot(p, rows.detached_logprobs("s", t))
    return with_gradient(rows.student_logits(t), value, lambda: rows.detached_probs("s", t) - p)


def reverse_kl(rows: TokenRows, t: float) -> torch.Tensor:
    """KL(q || p) per row, with gradient q (log q - log p - KL)."""
    q = rows.detached_probs("s", t)
    log_ratio = rows.detached_logprobs("s", t) - rows.detached_logprobs("t", t)
    value = row_dot(q, log_ratio)
    return with_gradient(rows.student_logits(t), value, lambda: softmax_backward(q, log_ratio, value))


def mixture_kl(rows: TokenRows, t: float, beta: float, weight_p: float, weight_q: float) -> torch.Tensor:
    """weight_p KL(p || m) + weight_q KL(q || m) per row, m = beta p + (1 - beta) q (0 < beta < 1).

    df/dq_v = weight_q (log q_v - log m_v + 1) - (weight_p p_v + weight_q q_v) (1 - beta) / m_v, so that
    GKD's JSD (weight_p = beta, weight_q = 1 - beta) has the gradient (1 - beta) q (log q - log m - KL(q || m)).
    The mixture is formed in probability space (one lerp and one log instead of a log-space logaddexp);
    entries where both p and q underflow get log m clamped to the most negative finite number (they add 0).
    """
    p, q = rows.detached_probs("t", t), rows.detached_probs("s", t)
    jsd = weight_p == beta and weight_q == 1 - beta  # GKD's JSD: the p / m terms of the gradient cancel
    m = torch.lerp(q, p, beta)
    log_m = (m.log_() if jsd else m.log()).clamp_(min=torch.finfo(m.dtype).min)
    value = torch.zeros_like(log_m[:, 0])
    if weight_p:  # <p, log p - log m> as two row sums: no [n, V] difference is formed
        value.add_(row_dot(p, rows.detached_logprobs("t", t)) - row_dot(p, log_m), alpha=weight_p)
    q_gap = kl_qm = None
    if weight_q:  # log q - log m, in log m's buffer (log m is not read past this point)
        q_gap = log_m.neg_().add_(rows.detached_logprobs("s", t))
        kl_qm = row_dot(q, q_gap)
        value.add_(kl_qm, alpha=weight_q)

    logits = rows.student_logits(t)
    if jsd:
        return with_gradient(logits, value, lambda: softmax_backward(q, q_gap, kl_qm), weight_q)
    # Otherwise df/dq = weight_q (log q - log m) + coef mix / m, with mix the (weight_p, weight_q) blend of p and q
    # (weight_q's constant cancels in the softmax backward); coef goes into the upstream scale where it can.
    coef = -(1 - beta) * (weight_p + weight_q)

    def mix_over_m() -> tuple[torch.Tensor, torch.Tensor]:  # where p and q both underflow, mix / m is 0, not 0 / 0
        mix = p if not weight_q else q if not weight_p else torch.lerp(q, p, weight_p / (weight_p + weight_q))
        return mix, m.clamp_min_(torch.finfo(m.dtype).tiny)

    if not weight_q:  # skew forward KL
        return with_gradient(logits, value, lambda: softmax_backward(q, torch.div(*mix_over_m())), coef)

    def grad() -> torch.Tensor:
        a = q_gap if weight_q == 1 else q_gap.mul_(weight_q)
        return softmax_backward(q, a.addcdiv_(*mix_over_m(), value=coef))

    return with_gradient(logits, value, grad)


@register_loss("fkl")
class ForwardKL(TokenLoss):
    """Forward KL(p || q) at temperature T (mode covering)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return forward_kl(rows, self.temperature)


@register_loss("rkl")
class ReverseKL(TokenLoss):
    """Reverse KL(q || p) at temperature T (mode seeking)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return reverse_kl(rows, self.temperature)


@dataclass
class JSDKnobs:
    """The jsd term's option: GKD's own ``beta`` field (TRL's ``GKDConfig`` declares it for the config)."""

    beta: float = knob(0.5, "GKD's generalized JSD interpolation coefficient beta (jsd term).", arg="beta")


@register_loss("jsd")
class GeneralizedJSD(TokenLoss):
    """GKD's generalized Jensen-Shannon divergence (arXiv 2306.13649, Eq. 1), as TRL computes it.

    beta = 0 gives KL(p || q), beta = 1 gives KL(q || p); otherwise with m = beta p + (1 - beta) q:
    beta KL(p || m) + (1 - beta) KL(q || m).
    """

    paper = GKD
    knobs = JSDKnobs

    def __init__(self, beta: float = JSDKnobs.beta, temperature: float = 1.0):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd: beta must be in [0, 1], got {beta}.")
        self.beta = beta
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t, beta = self.temperature, self.beta
        if beta == 0.0:
            return forward_kl(rows, t)
        if beta == 1.0:
            return reverse_kl(rows, t)
        return mixture_kl(rows, t, beta, weight_p=beta, weight_q=1 - beta)


@dataclass
class SkewKnobs:
    """The skew KLs' option, shared by sfkl and srkl (a ``DistillationConfig`` field)."""

    skew_alpha: float = knob(0.1, "Skew KL (sfkl/srkl) mixing weight alpha.", arg="alpha")


@register_loss("sfkl")
class SkewForwardKL(TokenLoss):
    """Skew forward KL (DistiLLM, arXiv 2402.03898): KL(p || alpha p + (1 - alpha) q)."""

    paper = DISTILLM
    knobs = SkewKnobs

    def __init__(self, alpha: float = SkewKnobs.skew_alpha, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"sfkl: alpha must be in (0, 1), got {alpha}.")
        self.alpha = alpha
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return mixture_kl(rows, self.temperature, self.alpha, weight_p=1.0, weight_q=0.0)


@register_loss("srkl")
class SkewReverseKL(TokenLoss):
    """Skew reverse KL (DistiLLM, arXiv 2402.03898): KL(q || alpha q + (1 - alpha) p)."""

    paper = DISTILLM
    knobs = SkewKnobs

    def __init__(self, alpha: float = SkewKnobs.skew_alpha, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"srkl: alpha must be in (0, 1), got {alpha}.")
        self.alpha = alpha
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return mixture_kl(rows, self.temperature, 1 - self.alpha, weight_p=0.0, weight_q=1.0)


@register_loss("ce")
class CrossEntropy(TokenLoss):
    """Cross-entropy of the student on the labels (the SFT term); no temperature."""

    teacher_needs = TeacherSignal.NOTHING

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return -rows.student_logprobs(1.0).gather(-1, rows.labels.unsqueeze(-1)).squeeze(-1)
