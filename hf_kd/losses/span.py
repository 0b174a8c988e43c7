"""Span-level correlation loss (MGSR, arXiv 2407.10068, Eq. 10).

The response is cut into spans (sentences, see ``sentence_spans.span_ids_for_batch``); for every pair of
adjacent positions (k, k+1) inside one span the correlation is the elementwise product of their
probability vectors, c_k = p_k * p_{k+1} (teacher) and c~_k = q_k * q_{k+1} (student), both at the
term's temperature. The loss is the L2 distance ||c_k - c~_k||_2 summed over pairs and divided by the
number of response tokens, like every term of the engine. Pairs never cross a span boundary or a
masked position (the engine's ``pair_mask``).

Per token, not per pair: the paper's mean over pairs would need a pair count gathered over the
accumulated micro-batches and the processes; divided by the local pair count instead, the term's
weight grew with accumulation steps x processes (one SGD step at batch 8 x 1 and 4 x 2 differed by
100%). A sequence of n tokens in s spans has n - s pairs, so the two normalisations differ by the
factor (n - s) / n, close to 1 for sentences of many tokens.

The paper says "L2 distance"; ``squared=False`` (default) takes it literally, ``squared=True`` uses
the squared distance (smoother, but its values are tiny since every entry of c is at most 1).
At a zero distance the unsquared gradient is taken as 0.
From a teacher cache the teacher probabilities are the reconstructed ones (top-k plus a flat tail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..knobs import knob
from ..papers import MGSR
from .core import TokenLoss, TokenRows
from .registry import register_loss
from .sentence_spans import span_ids_for_batch


@dataclass
class SpanKnobs:
    """The span loss's options (``DistillationConfig`` fields)."""

    span_segmenter: str = knob("pysbd", "Span loss: sentence segmenter, 'pysbd' or 'punct'.")


@register_loss("span")
class SpanCorrelation(TokenLoss):
    """L2 distance between teacher and student adjacent-token correlations inside spans (Eq. 10)."""

    pairwise = True
    paper = MGSR
    knobs = SpanKnobs
    requires = ("span_ids",)

    @classmethod
    def build_inputs(cls, batch: dict[str, Any], tokenizer: Any, options: Any) -> dict[str, torch.Tensor]:
        """``span_ids``: the sentence of each response token (``sentence_spans``), -1 outside the response."""
        spans = span_ids_for_batch(batch["input_ids"], batch["labels"], tokenizer, segmenter=options.span_segmenter)
        return {"span_ids": spans}

    def __init__(self, squared: bool = False, temperature: float = 1.0):
        super().__init__()
        self.squared = squared
        self.temperature = temperature

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        t = self.temperature
        s_next, t_next = rows.student_probs_next(t), rows.teacher_probs_next(t)
        m = s_next.shape[0]  # the last chunk has no row after its last one
        corr_s = rows.student_probs(t)[:m] * s_next
        corr_t = rows.teacher_probs(t)[:m] * t_next
        sq = (corr_t - corr_s).pow(2).sum(-1)
        dist = sq if self.squared else sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt() * (sq > 0)
        out = torch.zeros(rows.n, dtype=dist.dtype, device=dist.device)
        out[:m] = dist
        mask = rows.pair_mask if rows.pair_mask is not None else torch.zeros_like(out, dtype=torch.bool)
        return out * mask
