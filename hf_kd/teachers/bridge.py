"""A live teacher distilled through a bridge (``hf_kd.bridge``, DSKD): the bridge computes the whole loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..bridge import DualTokenizationCollator, bridge_class
from ..heads import real_vocab_size
from ..losses import DistillationLoss
from .base import TeacherSource, prepare_teacher_model


class BridgeTeacher(TeacherSource):
    """The teacher model and the bridge that projects hidden states between it and the student (DSKD's projectors,
    trained beside the student and saved as ``bridge``). The bridge builds the recipe's terms and computes the loss.

    ``teacher_tokenizer`` is given when the teacher has its own vocabulary (DSKD-CMA): batches then carry the
    teacher's tokenization (``DualTokenizationCollator``), generated sequences are re-tokenized for it, and the
    teacher cannot generate for the student (seq_kd).
    """

    refusal = (
        "The teacher has its own tokenizer, whose sequences the student cannot train on: {needs}. Generate the "
        "teacher's responses once (sequence-level KD data) and train on them off-policy instead."
    )

    def __init__(self, model: nn.Module, args: Any, teacher_tokenizer: Any | None = None):
        self.model = model
        self.name = args.bridge
        self.description = f"the {args.bridge} bridge"
        self.teacher_tokenizer = teacher_tokenizer
        self.generates = teacher_tokenizer is None
        self.bridge: nn.Module | None = None

    def chat_collator(self, tokenizer: Any, args: Any) -> Callable:
        if self.teacher_tokenizer is None:
            return super().chat_collator(tokenizer, args)
        return DualTokenizationCollator(tokenizer, self.teacher_tokenizer, args.max_length)

    def build_loss(self, recipe: Any, args: Any) -> DistillationLoss | None:
        return None  # the bridge builds (and owns) the recipe's terms: no second, unused copy

    def prepare(self, trainer: Any) -> None:
        self.accelerator, self.tokenizer = trainer.accelerator, trainer.processing_class
        self.max_length = trainer.args.max_length
        self.vocab_size = real_vocab_size(trainer.model, self.tokenizer)
        if self.teacher_tokenizer is None:
            self.vocab_size = min(self.vocab_size, real_vocab_size(self.model, self.tokenizer))
        self.model = prepare_teacher_model(self.model, trainer)
        cls = bridge_class(self.name)
        bridge = cls(trainer.model, self.model, trainer.args, self.teacher_tokenizer, self.tokenizer, trainer.recipe)
        self.bridge = bridge.to(trainer.args.device)

    def modules(self) -> dict[str, nn.Module]:
        return {"bridge": self.bridge}

    def inputs_for_generated(self, batch: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.teacher_tokenizer is None:
            return {}
        return self.bridge.teacher_inputs_for_generated(
            batch,
            self.tokenizer,
            self.teacher_tokenizer,
            prompt_messages=inputs["prompt_messages"],
            max_length=self.max_length,
        )

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        loss_fn: DistillationLoss | None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, torch.Tensor | None]:
        """The bridge's loss; it runs its own forwards (so no student outputs: the trainer runs one more forward for
        ``compute_metrics``) and reads hidden states, no teacher rows (the trainer checks the loss alone)."""
        with self.accelerator.autocast():  # as for the other losses: heads in the mixed-precision dtype
            loss, terms = self.bridge.compute_loss(model, self.model, inputs, num_items_in_batch)
        return loss, terms, None, None
