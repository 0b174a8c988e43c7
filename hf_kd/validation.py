"""Checks run before training starts, so that bad input fails with a message naming the fix."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig

from .bridge import BRIDGE_REGISTRY, bridge_class


def check_tokenizer(tokenizer: Any, what: str, need_template: bool = True) -> None:
    """A tokenizer must exist, have a pad token, and (for chat data) a chat template."""
    if tokenizer is None:
        raise ValueError(f"{what} is required: pass the tokenizer, e.g. AutoTokenizer.from_pretrained(...).")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            f"{what} has no pad token. Set one before training, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
        )
    if need_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{what} has no chat template, which the `messages` data needs. Set `tokenizer.chat_template` "
            "(a Jinja template) or use an instruct model's tokenizer."
        )


def check_dataset(dataset: Any, what: str) -> None:
    """Datasets must be non-empty and carry `messages` (or pre-tokenized `input_ids`)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            check_dataset(part, f"{what}['{name}']")
        return
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty: give it at least one conversation.")
    columns = set(getattr(dataset, "column_names", None) or dataset[0].keys())
    if not {"messages", "input_ids"} & columns:
        raise ValueError(
            f"{what} has no `messages` column (found: {sorted(columns)}). Convert it to chat format, e.g. with "
            "`hf_kd.data.map_to_messages(dataset)` for Dolly/Alpaca/prompt-completion columns."
        )


def _vocab_size(model: nn.Module | str) -> int:
    config = AutoConfig.from_pretrained(model) if isinstance(model, str) else model.config
    return config.get_text_config().vocab_size


def _bridge_hint() -> str:
    """``bridge='dskd'``: the registered bridges that distill across vocabularies, for error messages."""
    return " or ".join(f"bridge='{name}'" for name, cls in BRIDGE_REGISTRY.items() if cls.cross_vocabulary)


def check_vocabularies(
    student: nn.Module | str, teacher: nn.Module, tokenizer: Any, teacher_tokenizer: Any, bridge: str | None
) -> bool:
    """True when the teacher has its own tokenizer (cross-vocabulary KD); errors where that needs a bridge.

    Heads of different sizes over one tokenizer are accepted (a family pads its heads differently, e.g. Qwen2.5
    151936 vs 152064 rows for 151665 tokens): the losses then compare the ``len(tokenizer)`` real tokens. hf_kd
    only knows that the tokenizer is shared when the teacher's is given and has the student's vocabulary.
    """
    cross = teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    s_vocab, t_vocab = _vocab_size(student), _vocab_size(teacher)
    if cross and (bridge is None or not bridge_class(bridge).cross_vocabulary):
        raise ValueError(
            f"The student (vocab_size {s_vocab}) and the teacher (vocab_size {t_vocab}) do not share a vocabulary, "
            "so their next-token distributions cannot be compared directly. Use a cross-vocabulary bridge: "
            f"DistillationConfig({_bridge_hint()}) and DistillationTrainer(..., teacher_processing_class="
            "<the teacher's tokenizer>)."
        )
    if s_vocab != t_vocab and teacher_tokenizer is None:
        raise ValueError(
            f"The teacher's head has {t_vocab} rows and the student's {s_vocab}: pass the teacher's tokenizer as "
            "DistillationTrainer(..., teacher_processing_class=teacher_tokenizer). If it has the student's "
            f"vocabulary (one family whose heads are padded differently) the pair trains as it is, over the "
            f"tokenizer's {len(tokenizer)} tokens; if not, use a cross-vocabulary bridge: "
            f"DistillationConfig({_bridge_hint()})."
        )
    if not cross and s_vocab != t_vocab and min(s_vocab, t_vocab) < len(tokenizer):
        raise ValueError(
            f"The student's head has {s_vocab} rows and the teacher's {t_vocab}, but their shared tokenizer has "
            f"{len(tokenizer)} tokens: one head cannot predict every token, so they do not share this tokenizer. "
            "Pass the teacher's own tokenizer as teacher_processing_class and use "
            f"DistillationConfig({_bridge_hint()})."
        )
    return cross


# SFTConfig options whose SFTTrainer code path DistillationTrainer replaces (its chat collator, its compute_loss):
# (is the option set to something the trainer cannot honour?, why and what to do instead).
_REPLACED_SFT_OPTIONS = {
    "packing": (lambda a: a.packing, "conversations are batched one per row by the chat collator"),
    "padding_free": (lambda a: a.padding_free, "conversations are padded per batch by the chat collator"),
    "assistant_only_loss": (
        lambda a: a.assistant_only_loss,
        "the loss is on the last assistant message of each conversation (the prompt is masked)",
    ),
    "completion_only_loss": (
        lambda a: a.completion_only_loss is False,
        "the prompt is always masked: distillation trains on the completion only",
    ),
    "pad_to_multiple_of": (lambda a: a.pad_to_multiple_of is not None, "the chat collator pads to the longest row"),
    "loss_type": (lambda a: a.loss_type != "nll", "the loss is `kd_loss`; add 'ce' to the recipe for an SFT term"),
    "label_smoothing_factor": (
        lambda a: a.label_smoothing_factor > 0,
        "the loss is `kd_loss`, which never reads the Trainer's label smoother",
    ),
}


def check_inherited_options(args: Any) -> None:
    """Refuse SFTConfig options that DistillationTrainer would otherwise silently ignore (see its docstring)."""
    for option, (is_set, reason) in _REPLACED_SFT_OPTIONS.items():
        if is_set(args):
            raise ValueError(
                f"`{option}={getattr(args, option)!r}` is not supported by DistillationTrainer: {reason}. "
                f"Leave `{option}` at its default."
            )


def check_lora_targets(model: nn.Module, peft_config: Any) -> None:
    """LoRA `target_modules` given as names must match at least one module of the student."""
    targets = getattr(peft_config, "target_modules", None)
    if targets is None or isinstance(targets, str):  # None, "all-linear" or a regex: PEFT resolves them
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if len(missing) == len(list(targets)):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target_modules {sorted(targets)} match no module of the student. Its linear layers are named "
            f"{linear}; pass some of those (or 'all-linear')."
        )
