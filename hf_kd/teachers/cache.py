"""The offline teacher cache as a teacher source: the top-k rows come with the batch (``hf_kd.teacher_cache``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..teacher_cache import TeacherCacheCollator, TopKReconstruction
from ..teacher_cache.manifest import tokenizer_identity
from .topk import TopKTeacher


class TeacherCache(TopKTeacher):
    """A cache loaded by ``load_teacher_cache``: no teacher in memory, so nothing generated during training can be
    scored (on-policy, seq_kd, SCRG and the bridges are refused). The run must use the cache's tokenizer and
    vocabulary size, and each term that reads the teacher's distribution the temperature it was cached at."""

    description = "a teacher cache"
    rows = "cached rows"
    scores_generated = False
    generates = False
    refusal = (
        "Training from a teacher cache (teacher_model=None) has no teacher in memory, but {needs}. Or pass a live "
        "teacher_model with the original chat dataset."
    )
    temperature_fix = (
        "Rebuild the cache with cache_teacher(..., temperature={temperature}), or set kd_temperature={stored}"
    )

    def __init__(self, manifest: dict[str, Any], tail: str):
        encoding = manifest["encoding"]
        self.temperature = manifest["temperature"]
        self.reconstruction = TopKReconstruction(encoding["vocab_size"], encoding["top_k"], self.temperature, tail)
        self.manifest = manifest
        self.teacher_name = manifest["teacher"].get("name_or_path") or None

    def collator(self, tokenizer: Any, args: Any) -> Callable:
        return TeacherCacheCollator(self.manifest, tokenizer.pad_token_id)

    def prepare(self, trainer: Any) -> None:
        """The cache must be over the student's vocabulary and tokenizer."""
        super().prepare(trainer)
        cached, tokenizer = self.manifest["tokenizer"], trainer.processing_class
        if tokenizer_identity(tokenizer)["vocab_sha256"] != cached["vocab_sha256"]:
            raise ValueError(
                f"The teacher cache was built with the tokenizer {cached['name_or_path']!r} ({cached['size']} "
                f"tokens), whose vocabulary differs from the student's ({len(tokenizer)} tokens): its token ids mean "
                "other tokens. Train with that tokenizer, or rebuild the cache with the student's."
            )
        vocab_size = self.manifest["encoding"]["vocab_size"]
        student_vocab = trainer.model.config.get_text_config().vocab_size
        if student_vocab != vocab_size:
            raise ValueError(
                f"The teacher cache holds distributions over {vocab_size} entries but the student's head has "
                f"{student_vocab}: distill from a cache of a teacher with the student's vocabulary size."
            )
