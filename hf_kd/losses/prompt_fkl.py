"""Forward KL on the prompt positions, as BiLD's official trainer adds it to every loss (arXiv 2406.13555).

The paper's runs (``fpcsong/BiLD``, ``trainers/custom_trainer.py``) add, for every loss type and without a
switch, an "instruction loss": KL(teacher || student) at temperature 1 at the positions that predict a prompt
token, averaged over those positions and added with weight 1 to the response loss. ``kd_loss="bild+prompt_fkl"``
is the paper's objective; ``bild`` alone trains on the response only.

Rows: position t is kept when tokens t and t+1 are attended and token t+1 is a prompt token (label -100). The
official code keeps position t when token t is attended and token t+1 has label -100, which also counts the
last token of a right-padded sequence (it predicts padding); that one row per sequence is left out here.

Normalisation: the sum over prompt positions is divided by the prompt-position count of the whole optimizer
step (the trainer gathers it over accumulated micro-batches and processes, like ``num_items_in_batch``), so the
update is the same at any accumulation or process split; the official code takes the mean per micro-batch.
Not trainable from a teacher cache (it stores the teacher at response tokens only) nor inside the DSKD bridge.
"""

from __future__ import annotations

from typing import Any

import torch

from ..papers import BILD
from .core import IGNORE_INDEX, TeacherSignal, TokenLoss, TokenRows
from .divergences import forward_kl
from .registry import register_loss

PROMPT_POSITIONS = "prompt_positions"


@register_loss("prompt_fkl")
class PromptForwardKL(TokenLoss):
    """KL(teacher || student) at T = 1 over the positions predicting prompt tokens (BiLD's instruction loss)."""

    paper = BILD
    requires = (PROMPT_POSITIONS,)
    positions = PROMPT_POSITIONS
    teacher_needs = TeacherSignal.PROMPT_ROWS

    @classmethod
    def build_inputs(cls, batch: dict[str, Any], tokenizer: Any, options: Any) -> dict[str, torch.Tensor]:
        """``prompt_positions``: True at attended prompt tokens (label -100) whose previous token is attended too,
        aligned with ``input_ids``; the trainer shifts it with the labels, so position t is kept when it and the
        prompt token it predicts are both real tokens (a left-padded sequence's first token has no predictor)."""
        attended = batch["attention_mask"].bool()
        prompt = attended & (batch["labels"] == IGNORE_INDEX)
        prompt[:, 1:] &= attended[:, :-1]
        return {PROMPT_POSITIONS: prompt}

    def per_token(self, rows: TokenRows) -> torch.Tensor:
        return forward_kl(rows, 1.0)  # no temperature knob: the official trainer fixes it at 1
