"""A teacher served by vLLM as a teacher source: every batch's exact token ids scored over HTTP into top-k rows.

The rows are the teacher cache's (``ServedTeacher.score`` packs them as the cache does), so the loss, the terms it
feeds and its refusals are the cache's (``TopKTeacher``). Unlike a cache it scores sequences generated during
training: on-policy steps (``lmbda > 0``) and SCRG's corrections read the server too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..heads import real_vocab_size
from ..teacher_cache import TopKReconstruction
from .prefetch import PREFETCHED, PrefetchingCollator
from .served import ServedTeacher
from .topk import TopKTeacher


def is_served_url(teacher_model: Any) -> bool:
    """Whether ``teacher_model`` names a teacher server (an http(s) URL) rather than a model path or Hub id."""
    return isinstance(teacher_model, str) and teacher_model.startswith(("http://", "https://"))


class ServedTeacherSource(TopKTeacher):
    """The top-k log-probabilities of a vLLM server (``ServedTeacher``) on each batch, rebuilt as for a cache.

    Construction checks the server (``ServedTeacher.check``): it serves ``model_name`` (when given) with the student's
    tokenizer and can give ``top_k``. Its rows hold the teacher at temperature 1 (vLLM's prompt log-probabilities).
    Under seq_kd the server generates the teacher's answers too (``hf_kd.rollout.select.teacher_backend``: its
    completions as token ids, never synced). A server that fails mid-run raises an error naming its URL, which stops
    training.
    """

    rows = "served top-k rows"
    generates = True  # seq_kd: through its server (hf_kd.rollout.vllm_backend), not a model in this process
    holds = "the teacher's top-k and tail at each token only"
    temperature_fix = "vLLM's prompt log-probabilities are the teacher's at temperature 1: set kd_temperature={stored}"

    def __init__(self, client: ServedTeacher, tail: str, tokenizer: Any, model_name: str | None = None):
        self.client, self.tail = client, tail
        self.description = f"the served teacher at {client.url}"
        self.refusal = f"The served teacher at {client.url} cannot serve the run: {{needs}}."
        client.check(tokenizer, model_name)
        self.teacher_name = model_name or client.model

    def prepare(self, trainer: Any) -> None:
        """Rows over the student's real vocabulary (ids the server returns beyond it are an error)."""
        super().prepare(trainer)
        self.vocab_size = real_vocab_size(trainer.model, trainer.processing_class)
        self.client.vocab_size = self.vocab_size
        self.reconstruction = TopKReconstruction(self.vocab_size, self.client.top_k, self.temperature, self.tail)

    def collator(self, tokenizer: Any, args: Any) -> Callable:
        """The chat collator, requesting each batch's scores as it is collated (``teacher_prefetch``) unless every
        step replaces its batch by generated sequences (``lmbda=1`` or ``seq_kd``)."""
        collator = super().collator(tokenizer, args)
        if not args.teacher_prefetch or args.lmbda >= 1 or args.seq_kd:
            return collator
        return PrefetchingCollator(collator, self.client.score)

    def teacher_rows(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The prefetched scores of the batch's ids when it brought them (``prefetch.py``), else a request now."""
        prefetched = inputs.get(PREFETCHED)
        rows = prefetched.rows_for(inputs["input_ids"]) if prefetched is not None else None
        if rows is None:
            rows = self.client.score(inputs["input_ids"], inputs["attention_mask"]).packed_rows()
        return rows

    def score_completions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, student_logits: torch.Tensor
    ) -> torch.Tensor:
        rows = self.client.score(input_ids, attention_mask).packed_rows()[:, -student_logits.shape[1] :]
        student = student_logits if self.reconstruction.reads_student_logits else None
        return self.reconstruction(rows.to(student_logits.device), student)
