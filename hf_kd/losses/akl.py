"""AKL: adaptive Kullback-Leibler divergence (Wu et al., arXiv 2404.02657, COLING 2025).

FKL fits the head of the teacher distribution early and RKL its tail; AKL weighs them per token by
the student's error on each part. Sort p descending and put the (detached) q in the same order;
e_i = |p_i - q_i|. The head is the positions whose cumulative teacher probability is <= mu (the top-1
is always head), the tail the rest; g_head = sum_head e_i, g_tail = sum_tail e_i, and

    AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p).

As in the official snippet the weights carry no gradient. The official snippet applies no temperature
(default 1.0 here); DSKD's copy uses its KD temperature, which ``temperature`` allows.
Difference from the snippet, exact up to the order of floating-point sums: instead of sorting the whole
vocabulary, the head is found by a radix select (``_head_error``), O(V) per row on peaked and flat teachers alike
(a flat teacher's head holds most of the vocabulary, and finding it by sorting cost as much again as JSD); ties are
broken by the lower index first, as a stable sort would, and g_tail = sum_all e - g_head. The gradient is
written in closed form (see ``divergences``): w (q - p) + (1 - w) q (log q - log p - KL(q || p)).
From a teacher cache the head is read from the cached top-k (it is exact while the head lies inside it);
the tail sums are over the reconstructed flat tail.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..knobs import knob
from ..papers import Paper
from .core import TokenLoss, TokenRows
from .divergences import row_dot, softmax_backward, with_gradient
from .registry import register_loss


def akl_head_weight(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    """g_head / (g_head + g_tail) per row (p, q: probabilities [n, V], no gradient).

    The head is found by a radix select over the teacher's probabilities (``_head_error``): O(V) per row, peaked
    teacher or flat. A row holding NaN or inf (non-finite logits, a temperature of 0) gives NaN, which the caller
    sees in the loss value.
    """
    if p.dtype not in _BITS:
        p, q = p.float(), q.float()
    err = torch.sub(p, q).abs_()
    total = err.sum(-1)
    finite = total.isfinite()
    if finite.all():
        head = _head_error(p, err, mu)
    else:  # the select reads the bits of p, which order nothing in a NaN row
        head = torch.full_like(total, float("nan"))
        head[finite] = _head_error(p[finite], err[finite], mu)
    return head / total.clamp_min(torch.finfo(p.dtype).tiny)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # a probability's bits, read as an integer
_TOP_BUCKETS = 1 << 14  # the top 16 bits of a float in [0, 2) (sign 0, exponent at most 1's) lie below 2**14
_LEVEL_BITS = 8  # bits refined per level below the top 16


def _head_error(p: torch.Tensor, err: torch.Tensor, mu: float) -> torch.Tensor:
    """sum over the head of err = |p - q| per row, by a radix select of the head's last entry.

    The bits of a float >= 0 order as its value does. Every entry's mass and error go to a histogram over its top
    16 bits, and the buckets above the one where the descending cumulative mass passes mu are head, whole
    (``_Select.crossing``). Only that bucket's entries are refined, 8 bits at a time, until each row's entries left
    hold one value; of those ties, in index order, the head takes the first ones that keep the cumulative mass
    within mu (``_Select.ties``).
    """
    p = p.contiguous()
    n = p.shape[0]
    select = _Select(p, mu)
    key = _top_bits(p)
    bucket = select.crossing(*(p.new_zeros(n, _TOP_BUCKETS).scatter_add_(1, key, src) for src in (p, err)))
    at = (key == bucket.unsqueeze(-1)).view(-1).nonzero().squeeze(-1)
    del key
    take = lambda t: t.reshape(-1).index_select(0, at)  # noqa: E731
    entries = _Entries(
        at.div(p.shape[1], rounding_mode="floor"), take(p.view(_BITS[p.dtype])).long(), take(p), take(err)
    )
    width = 1 << _LEVEL_BITS
    for shift in range(8 * p.element_size() - 16 - _LEVEL_BITS, -1, -_LEVEL_BITS):
        if entries.settled():
            break
        key = entries.bits.bitwise_right_shift(shift).bitwise_and_(width - 1)
        flat = entries.rows * width + key
        bucket = select.crossing(
            *(p.new_zeros(n * width).index_add_(0, flat, src).view(n, width) for src in (entries.mass, entries.error))
        )
        entries = entries.where(key == bucket[entries.rows])
    select.ties(entries)
    return select.error


def _top_bits(p: torch.Tensor) -> torch.Tensor:
    """The top 16 bits (sign, exponent, leading mantissa bits) of each entry of a contiguous p, as int64: one of the
    int16 words the entry is made of, read without shifting the whole entry."""
    words = p.element_size() // 2
    high = words - 1 if sys.byteorder == "little" else 0
    return p.view(torch.int16)[:, high::words].long()


@dataclass
class _Entries:
    """Entries of the rows' crossing buckets, in row order and, within a row, index order: row, bits, p, err."""

    rows: torch.Tensor
    bits: torch.Tensor
    mass: torch.Tensor
    error: torch.Tensor

    def where(self, keep: torch.Tensor) -> _Entries:
        return _Entries(self.rows[keep], self.bits[keep], self.mass[keep], self.error[keep])

    def settled(self) -> bool:
        """Whether each row's entries hold one value (ties need no refining: a uniform row's are the whole row)."""
        return not ((self.bits[1:] != self.bits[:-1]) & (self.rows[1:] == self.rows[:-1])).any()


class _Select:
    """Per row: the mass the head may still take (``budget``), and the mass and error it holds."""

    def __init__(self, p: torch.Tensor, mu: float):
        self.budget = p.new_full((p.shape[0],), mu)
        self.mass = p.new_zeros(p.shape[0])
        self.error = p.new_zeros(p.shape[0])

    def crossing(self, mass: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """Takes, per row, the histogram's buckets from the highest down while their cumulative mass stays within
        the budget, and returns the bucket that passes it (-1 where none does: the whole row is head)."""
        cumulative = mass.flip(-1).cumsum(-1)
        whole = (cumulative <= self.budget.unsqueeze(-1)).sum(-1, keepdim=True)
        taken = F.pad(cumulative, (1, 0)).gather(-1, whole).squeeze(-1)
        self.budget -= taken
        self.mass += taken
        self.error += F.pad(error.flip(-1).cumsum(-1), (1, 0)).gather(-1, whole).squeeze(-1)
        return mass.shape[-1] - 1 - whole.squeeze(-1)

    def ties(self, entries: _Entries) -> None:
        """Entries of one value per row, in index order: the head takes the first ones whose cumulative mass
        stays within the budget, and at least the first where the head holds nothing yet (the top-1)."""
        if not entries.rows.numel():
            return
        counts = torch.bincount(entries.rows, minlength=self.budget.shape[0])
        first = counts.cumsum(0) - counts
        value = entries.mass[first.clamp_max(entries.rows.numel() - 1)]  # rows without entries: any value
        fit = torch.where(value > 0, self.budget / value, float("inf")).floor_()
        fit = torch.maximum(fit.minimum(counts.to(fit.dtype)).long(), (self.mass == 0).long()).minimum(counts)
        cumulative = F.pad(entries.error.cumsum(0, dtype=torch.float64), (1, 0))
        self.error += (cumulative[first + fit] - cumulative[first]).to(self.error.dtype)


@dataclass
class AKLKnobs:
    """AKL's options (``DistillationConfig`` fields)."""

    akl_mu: float = knob(0.5, "AKL head/tail boundary: cumulative teacher probability.", arg="mu")


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
    knobs = AKLKnobs

    def __init__(self, mu: float = AKLKnobs.akl_mu, temperature: float = 1.0):
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
