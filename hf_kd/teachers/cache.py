"""The offline teacher cache as a teacher source: the top-k rows come with the batch (``hf_kd.teacher_cache``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..losses import TeacherSignal, TokenLoss
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

    def __init__(self, manifest: dict[str, Any], tail: str):
        encoding = manifest["encoding"]
        super().__init__(TopKReconstruction(encoding["vocab_size"], encoding["top_k"], manifest["temperature"], tail))
        self.manifest = manifest
        self.teacher_name = manifest["teacher"].get("name_or_path") or None

    def collator(self, tokenizer: Any, args: Any) -> Callable:
        return TeacherCacheCollator(self.manifest, tokenizer.pad_token_id)

    def check_terms(self, terms: list[TokenLoss]) -> None:
        super().check_terms(terms)
        cache_temperature = self.manifest["temperature"]
        for term in terms:
            temperature = getattr(term, "temperature", cache_temperature)
            if TeacherSignal(term.teacher_needs) == TeacherSignal.TOP_K and temperature != cache_temperature:
                raise ValueError(
                    f"Loss term '{term.name}' runs at temperature {temperature} but the teacher cache stores the "
                    f"teacher at {cache_temperature}: the top-k would rescale exactly but the flat tail would not "
                    f"(its mass at another temperature is far off, see benchmarks/teacher_cache.py). Rebuild the "
                    f"cache with cache_teacher(..., temperature={temperature}), or set "
                    f"kd_temperature={cache_temperature}."
                )

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
