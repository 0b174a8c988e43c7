"""Total variation distance between the teacher and student next-token distributions.

    TVD(p, q) = 1/2 sum_v |p_v - q_v|,

p the teacher's and q the student's distribution at the term's temperature (default 1.0). It is symmetric and
bounded in [0, 1], so a token the student gets badly wrong cannot dominate the batch as it can under KL. TVD is the
f-divergence with f(t) = |t - 1| / 2; f-distill (Wen et al., arXiv 2307.15190) proposes it for distilling language
models, and DistiLLM's and DistillKit's code offer it as a token-level loss. Difference from f-distill: the paper
estimates a sequence-level TVD from sampled sequences (with a step-wise decomposition); here, as in those
libraries, it is the per-token distance, summed over response tokens and divided by their count like every term.

The gradient is autograd's: d|x|/dx = sign(x), taken as 0 where p_v = q_v exactly.
From a teacher cache p is the reconstructed distribution (top-k plus a flat tail).
"""

from __future__ import annotations

import torch

from ..papers import Paper
from .core import TokenLoss, TokenRows
from .registry import register_loss


@register_loss("tvd")
class TotalVariation(TokenLoss):
    """Total variation distance 1/2 ||p - q||_1 per token (see the module docstring)."""

    paper = Paper(
        "f-distill",
        "f-Divergence Minimization for Sequence-Level Knowledge Distillation",
        "2307.15190",
        """@inproceedings{wen2023fdivergence,
  title     = {f-Divergence Minimization for Sequence-Level Knowledge Distillation},
  author    = {Wen, Yuqiao and Li, Zichao and Du, Wenyu and Mou, Lili},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2023},
  eprint    = {2307.15190},
  archivePrefix = {arXiv}
}""",
    )

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        return 0.5 * (rows.teacher_probs(t) - rows.student_probs(t)).abs().sum(-1)
