"""A live teacher: a model in this process over the student's vocabulary, run under no_grad on every batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..heads import loss_forward, real_vocab_size
from .base import LogitSpaceSource, TeacherLogits, logit_rows, prepare_teacher_model


class LiveTeacher(LogitSpaceSource):
    """Its logits per token, or (``fused_loss``) its last hidden states and its own head, applied chunk by chunk and
    checked against its logits on the first batch. It provides every signal, scores and generates sequences, and
    compares logits over the tokens of the shared tokenizer (heads padded differently keep their real rows)."""

    description = "a live teacher"

    def __init__(self, model: nn.Module):
        self.model = model
        self.teacher_name = getattr(model.config, "_name_or_path", None) or None

    def prepare(self, trainer: Any) -> None:
        super().prepare(trainer)
        tokenizer = trainer.processing_class
        self.vocab_size = min(real_vocab_size(trainer.model, tokenizer), real_vocab_size(self.model, tokenizer))
        self.model = prepare_teacher_model(self.model, trainer)

    def teacher_logits(self, inputs: dict[str, Any], device: torch.device, fused: bool) -> TeacherLogits:
        self.model.eval()
        with torch.no_grad():
            outputs = loss_forward(self.model, inputs["input_ids"], inputs["attention_mask"], fused)
        if not fused:
            return TeacherLogits(logit_rows(outputs, None, self.vocab_size))
        head_module = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        return TeacherLogits(logit_rows(outputs, self.model, self.vocab_size), head_module, outputs)
