"""Checks that a run can train from a teacher cache: what needs a live teacher, and whether the cache fits."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..losses.core import TokenLoss
from .manifest import tokenizer_identity

CACHEABLE_TERMS = "fkl, rkl, jsd, sfkl, srkl, akl, dac_kl, span, ce"


def check_config_for_cache(args: Any) -> None:
    """Refuse what needs the teacher during training: generation (on-policy, seq_kd, SCRG) and the DSKD bridge."""
    needs = []
    if args.lmbda > 0:
        needs.append(f"on-policy distillation (lmbda={args.lmbda}) scores student-generated sequences; set lmbda=0")
    if args.seq_kd:
        needs.append("seq_kd generates with the teacher; set seq_kd=False")
    if args.scrg_corrections > 0:
        needs.append(f"SCRG (scrg_corrections={args.scrg_corrections}) corrects with the teacher; set it to 0")
    if args.bridge is not None:
        needs.append(f"the {args.bridge} bridge reads the teacher's hidden states; set bridge=None")
    if needs:
        raise ValueError(
            "Training from a teacher cache (teacher_model=None) has no teacher in memory, but "
            + "; ".join(needs)
            + ". Or pass a live teacher_model with the original chat dataset."
        )


def check_cache_matches_run(
    manifest: dict[str, Any], model: nn.Module, tokenizer: Any, terms: list[TokenLoss]
) -> None:
    """The cache must be over the student's vocabulary and tokenizer, and every loss term must work from it."""
    cached = manifest["tokenizer"]
    if tokenizer_identity(tokenizer)["vocab_sha256"] != cached["vocab_sha256"]:
        raise ValueError(
            f"The teacher cache was built with the tokenizer {cached['name_or_path']!r} ({cached['size']} tokens), "
            f"whose vocabulary differs from the student's ({len(tokenizer)} tokens): its token ids mean other "
            "tokens. Train with that tokenizer, or rebuild the cache with the student's."
        )
    vocab_size = manifest["encoding"]["vocab_size"]
    student_vocab = model.config.get_text_config().vocab_size
    if student_vocab != vocab_size:
        raise ValueError(
            f"The teacher cache holds distributions over {vocab_size} entries but the student's head has "
            f"{student_vocab}: distill from a cache of a teacher with the student's vocabulary size."
        )
    cache_temperature = manifest["temperature"]
    for term in terms:
        temperature = getattr(term, "temperature", cache_temperature)
        if term.teacher_needs == "distribution" and temperature != cache_temperature:
            raise ValueError(
                f"Loss term '{term.name}' runs at temperature {temperature} but the teacher cache stores the teacher "
                f"at {cache_temperature}: the top-k would rescale exactly but the flat tail would not (its mass at "
                f"another temperature is far off, see benchmarks/teacher_cache.py). Rebuild the cache with "
                f"cache_teacher(..., temperature={temperature}), or set kd_temperature={cache_temperature}."
            )
        if term.teacher_needs == "prompt_distribution":
            raise ValueError(
                f"Loss term '{term.name}' reads the teacher at the prompt positions, and a teacher cache stores the "
                f"teacher at the response tokens only. From a cache drop '{term.name}' from the recipe, or train it "
                "with a live teacher_model."
            )
        if term.teacher_needs == "logits_at_student_top_k":
            raise ValueError(
                f"Loss term '{term.name}' needs the teacher's logits at the student's own top-k tokens, which a "
                f"teacher cache does not hold. From a cache use terms that work from the teacher's top-k and tail "
                f"({CACHEABLE_TERMS}), or train '{term.name}' with a live teacher_model."
            )
