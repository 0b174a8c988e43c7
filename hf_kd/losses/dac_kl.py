"""DAC-KL: distribution adaptive clipping KL (MGSR, arXiv 2407.10068, Eq. 6-8).

A small learnable sub-network reads the teacher distribution and predicts a lower and an upper
quantile bound of its "semantically dense" band; teacher and student are clipped to that band (a soft
sigmoid mask), the target-class (maximum probability) entry is always kept, both vectors are
renormalised and compared with KL. The sub-network is trained end to end through this loss.

The paper leaves several points open; the choices made here (each a constructor knob):

* Input features (Eq. 6): the teacher's top-M probabilities in descending order (``top_m``, default
  64), at the term's temperature. Only the top-M entries can enter the band, so no full-vocabulary sort
  is ever done (``topk`` only) and the cost does not grow with the vocabulary. At most V - 1 entries
  are taken, so the band never covers the whole vocabulary; missing features are zero-padded.
* Bounds as quantiles: with the entries sorted by teacher probability, keeping the probabilities
  inside [l, u] keeps a contiguous range of ranks, i.e. a range [lo, hi] of the teacher's cumulative
  mass. The sub-network's two outputs (a, b) are mapped to

      hi = min_mass + (1 - min_mass) * sigmoid(a),      lo = (hi - min_mass) * sigmoid(b),

  so hi - lo >= ``min_mass``: the band can never collapse to (almost) nothing, which is the optimum
  the KL alone would push it to. Entry i (mass s_i before it, c_i = s_i + p_i up to it) belongs to
  the band when it overlaps [lo, hi]; its soft mask is
  w_i = sigmoid(sharpness (c_i - lo)) * sigmoid(sharpness (hi - s_i)). In the hard limit the band
  holds at least ``min_mass`` of the teacher mass (or all of the top-M mass when that is smaller).
* Target class (Eq. 8): the paper concatenates the maximum-probability entry to the clipped vector;
  since it is already one of the top-M entries, its mask is fixed to 1 instead of counting it twice.
* Renormalisation: both vectors are renormalised over the masked band, p~_i = w_i p_i / sum_j w_j p_j
  (student alike), i.e. the clipped distributions of the paper; the student's mass outside the band is
  not modelled.
* Direction: KL(p~ || q~) (``direction="forward"``, the paper's KD setting); ``"reverse"`` gives
  KL(q~ || p~).

From a teacher cache the features and the band come from the cached top-k; with ``top_m`` above the cached
k, the features past k are entries of the flat tail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core import TokenLoss, TokenRows
from .divergences import kl_rows
from .registry import register_loss


class BandPredictor(nn.Module):
    """f_sub of Eq. 6: sorted top-M teacher probabilities -> quantile bounds (lo, hi) of the dense band.

    The paper does not give its size; a two-layer MLP (``hidden`` units, GELU) is used. The output
    bias starts at ``init_hi``/``init_lo`` (as fractions of their allowed ranges, see the module docstring).
    """

    def __init__(self, top_m: int, hidden: int, min_mass: float, init_hi: float = 0.5, init_lo: float = 0.1):
        super().__init__()
        self.min_mass = min_mass
        self.net = nn.Sequential(nn.Linear(top_m, hidden), nn.GELU(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.logit(torch.tensor([init_hi, init_lo])))

    def forward(self, sorted_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.net[0].weight
        raw = self.net(sorted_probs.to(weight.dtype)).to(sorted_probs.dtype)
        hi = self.min_mass + (1.0 - self.min_mass) * torch.sigmoid(raw[..., 0])
        lo = (hi - self.min_mass) * torch.sigmoid(raw[..., 1])
        return lo, hi


def band_log_weights(sorted_probs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, sharpness: float) -> torch.Tensor:
    """log w_i of the soft band mask over descending teacher probabilities [n, M]; the top-1 keeps weight 1."""
    upto = sorted_probs.cumsum(-1)  # c_i: mass up to and including entry i
    before = upto - sorted_probs  # s_i: mass strictly before entry i
    log_w = F.logsigmoid(sharpness * (upto - lo.unsqueeze(-1))) + F.logsigmoid(sharpness * (hi.unsqueeze(-1) - before))
    return torch.cat([torch.zeros_like(log_w[:, :1]), log_w[:, 1:]], dim=-1)


@register_loss("dac_kl")
class DACKL(TokenLoss):
    """Distribution adaptive clipping KL with a learned band (see the module docstring)."""

    def __init__(
        self,
        top_m: int = 64,
        hidden: int = 64,
        min_mass: float = 0.5,
        sharpness: float = 50.0,
        direction: str = "forward",
        temperature: float = 1.0,
    ):
        super().__init__()
        if top_m < 1 or hidden < 1:
            raise ValueError(f"dac_kl: top_m and hidden must be >= 1, got top_m={top_m}, hidden={hidden}.")
        if not 0.0 < min_mass < 1.0:
            raise ValueError(f"dac_kl: min_mass must be in (0, 1), got {min_mass}.")
        if sharpness <= 0:
            raise ValueError(f"dac_kl: sharpness must be > 0, got {sharpness}.")
        if direction not in ("forward", "reverse"):
            raise ValueError(f"dac_kl: direction must be 'forward' or 'reverse', got '{direction}'.")
        self.top_m = top_m
        self.sharpness = sharpness
        self.direction = direction
        self.temperature = temperature
        self.band = BandPredictor(top_m, hidden, min_mass)

    def band_weights(self, teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices [n, M'], teacher log-probs there [n, M'], log band weights [n, M']) with M' = min(M, V - 1)."""
        k = min(self.top_m, teacher_logprobs.shape[-1] - 1)
        if k < 1:
            raise ValueError("dac_kl needs a vocabulary of at least 2 entries.")
        top_lp, idx = teacher_logprobs.topk(k, dim=-1)
        top_p = top_lp.exp()
        features = F.pad(top_p, (0, self.top_m - k))
        lo, hi = self.band(features)
        return idx, top_lp, band_log_weights(top_p, lo, hi, self.sharpness)

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        idx, top_lp, log_w = self.band_weights(rows.teacher_logprobs(t))
        log_p = torch.log_softmax(top_lp + log_w, dim=-1)
        log_q = torch.log_softmax(rows.student_logprobs(t).gather(-1, idx) + log_w, dim=-1)
        return kl_rows(log_p, log_q) if self.direction == "forward" else kl_rows(log_q, log_p)
