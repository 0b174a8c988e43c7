"""Generation callbacks: hooks that see (and may revise) every generated batch before training on it.

The trainer calls each registered callback, in order, right after an on-policy (student) or seq-kd
(teacher) generation, and trains on the batch the last one returns. SCRG (MGSR, arXiv 2407.10068) is
one such callback; users pass their own through ``DistillationTrainer(..., generation_callbacks=[...])``.

Example: drop generations that are too short by masking them out of the loss::

    class MaskShort(GenerationCallback):
        def on_generation(self, batch, ctx):
            n_generated = (batch.labels != -100).sum(-1, keepdim=True)
            batch.labels = batch.labels.masked_fill(n_generated < 4, -100)
            return batch
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GeneratedBatch:
    """A batch of prompt + generated completion, in the student's tokenization.

    ``input_ids``/``attention_mask`` are [B, P + N]; ``labels`` equals ``input_ids`` on generated
    tokens (up to and including EOS) and -100 on prompt and padding; the first ``prompt_length``
    columns are the (left-padded) prompts. ``source`` is "student" or "teacher"; ``stats`` collects
    numbers to log (e.g. ``{"scrg/corrected_tokens": 3}``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_length: int
    source: str
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationContext:
    """What a callback may use: both models (unwrapped, ready to generate/score), tokenizers and settings.

    ``teacher`` is None when the teacher is no model in this process (a served teacher): ``score_teacher`` then gives
    its log-probabilities of the last n tokens, (input_ids, attention_mask, the student's logits [B, n, V]) ->
    [B, n, V] (its top-k, the rest rebuilt as for a teacher cache). ``generate_student`` generates with the student
    through the run's rollout backend, (left-padded ids, mask, generation config) -> sequences as ``generate`` returns
    them; None: ``student.generate``.
    """

    student: PreTrainedModel
    teacher: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    teacher_tokenizer: PreTrainedTokenizerBase | None
    generation_config: GenerationConfig
    args: Any
    score_teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    generate_student: Callable[[torch.Tensor, torch.Tensor, GenerationConfig], torch.Tensor] | None = None


class GenerationCallback:
    """Base class: override ``on_generation`` and return the (possibly new) batch."""

    def on_generation(self, batch: GeneratedBatch, ctx: GenerationContext) -> GeneratedBatch:
        return batch
