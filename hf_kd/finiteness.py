"""Non-finite values (NaN, +inf) in logits or hidden states: found with one reduction, reported with their causes.

A NaN in the teacher's rows or in the loss ruins the student in one optimizer step, while the Trainer's NaN filter
hides it from the log; the trainer and the cache writer stop instead, naming where and why it may have happened.
"""

from __future__ import annotations

import math

import torch

LIKELY_CAUSES = (
    "a model run in float16 that overflows (load it in bfloat16 or float32), a temperature of 0, or NaN or inf in "
    "the inputs (the data, a teacher cache, the model's weights)"
)
TRAINING_CAUSES = f"{LIKELY_CAUSES}, or a student that diverged (lower the learning rate)"


def valid_rows(rows: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [...] bool: False where a row holds NaN or +inf.

    -inf is allowed (a masked logit, or a cache's empty tail: the loss engine clamps it). One sum per row, kept at
    least float32 so that finite values cannot overflow it; no [..., n] temporary.
    """
    return rows.sum(-1, dtype=torch.promote_types(rows.dtype, torch.float32)) < math.inf
