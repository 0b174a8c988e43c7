"""Checks run before training starts, so that bad input fails with a message naming the fix."""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import AutoConfig

from .bridge import BRIDGE_REGISTRY, bridge_class
from .formats import (
    FORMATS_HELP,
    MESSAGES,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    TEXT,
    data_format,
    first_rows,
    is_conversational,
)
from .losses import parse_recipe
from .teacher_cache import cache_manifest


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
            f"{what} has no chat template, which conversational data needs. Set `tokenizer.chat_template` "
            "(a Jinja template) or use an instruct model's tokenizer."
        )


def check_dataset(dataset: Any, what: str, args: Any, evaluation: bool = False) -> None:
    """A dataset must be non-empty, in a format hf_kd reads (`hf_kd.formats`), and suit the run: plain `text` has no
    prompt to generate from (lmbda=0, no seq_kd); a `prompt` alone has no answer, so only fully on-policy training
    (lmbda=1, no 'ce' term) reads it. The format is read from the first row (a stream is not read further here)."""
    if dataset is None:
        return
    if isinstance(dataset, (str, os.PathLike)):
        cache_manifest(dataset)  # a teacher cache's folder: "Load the teacher cache first"
        raise TypeError(
            f"{what} is a path ({str(dataset)!r}), not a dataset: load it first, with datasets.load_dataset, or "
            "hf_kd.load_teacher_cache(path) for a teacher cache (cache_teacher's folder)."
        )
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            check_dataset(part, f"{what}['{name}']", args, evaluation)
        return
    rows = first_rows(dataset, 1)
    if not rows:
        raise ValueError(f"{what} is empty: give it at least one row.")
    fmt = data_format(rows[0], args.dataset_text_field)
    if fmt is None:
        raise ValueError(
            f"{what} has no column of a format DistillationTrainer reads (found: {sorted(rows[0])}). Give it "
            f"{FORMATS_HELP}; `hf_kd.data.map_to_messages(dataset)` converts Dolly/Alpaca columns to `messages`."
        )
    if fmt == TEXT and not evaluation and (args.lmbda > 0 or args.seq_kd):
        raise ValueError(
            f"{what} is plain `{args.dataset_text_field}` with no prompt, so a model has nothing to generate from: "
            f"on-policy (lmbda={args.lmbda}) and seq_kd steps need prompts. Set lmbda=0 and seq_kd=False, or give "
            "prompt/completion or `messages` rows."
        )
    if fmt == PROMPT_ONLY:
        if evaluation:
            raise ValueError(
                f"{what} has prompts without completions, but evaluation scores the student against the teacher on "
                "the dataset's completions: give eval rows with completions (prompt + completion, or `messages`)."
            )
        if args.lmbda < 1:
            raise ValueError(
                f"{what} has prompts without completions, which only fully on-policy training can use (the "
                f"student's generations are its only targets): set lmbda=1 (it is {args.lmbda}), or add completions."
            )
        if "ce" in [name for _, name in parse_recipe(args.kd_loss)]:
            raise ValueError(
                f"{what} has prompts without completions, but kd_loss={args.kd_loss!r} has a 'ce' term, which "
                "trains on reference completions: remove it from the recipe, or add completions."
            )


def check_conversational(dataset: Any, what: str) -> None:
    """Cross-vocabulary runs re-render each conversation in the teacher's chat format: they need chat rows with an
    answer (`messages`, or message-list prompt/completion); read from the first row."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            check_conversational(part, f"{what}['{name}']")
        return
    row = first_rows(dataset, 1)[0]
    if data_format(row) not in (MESSAGES, PROMPT_COMPLETION) or not is_conversational(row):
        raise ValueError(
            f"{what} is not conversational (columns {sorted(row)}): a teacher with its own tokenizer re-renders "
            "each conversation in its chat format, so give `messages`, or prompt/completion as message lists."
        )


def _vocab_size(model: nn.Module | str, config_kwargs: dict[str, Any] | None = None) -> int:
    config = AutoConfig.from_pretrained(model, **(config_kwargs or {})) if isinstance(model, str) else model.config
    return config.get_text_config().vocab_size


def _bridge_hint() -> str:
    """``bridge='dskd'``: the registered bridges that distill across vocabularies, for error messages."""
    return " or ".join(f"bridge='{name}'" for name, cls in BRIDGE_REGISTRY.items() if cls.cross_vocabulary)


def check_vocabularies(
    student: nn.Module | str,
    teacher: nn.Module,
    tokenizer: Any,
    teacher_tokenizer: Any,
    bridge: str | None,
    student_config_kwargs: dict[str, Any] | None = None,
) -> bool:
    """True when the teacher has its own tokenizer (cross-vocabulary KD); errors where that needs a bridge.
    ``student_config_kwargs`` read a student given as a path (`hf_kd.model_loading.config_kwargs`).

    Heads of different sizes over one tokenizer are accepted (a family pads its heads differently, e.g. Qwen2.5
    151936 vs 152064 rows for 151665 tokens): the losses then compare the ``len(tokenizer)`` real tokens. hf_kd
    only knows that the tokenizer is shared when the teacher's is given and has the student's vocabulary.
    """
    cross = teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    s_vocab, t_vocab = _vocab_size(student, student_config_kwargs), _vocab_size(teacher)
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
    "eval_packing": (lambda a: a.eval_packing, "eval conversations are batched one per row, like training ones"),
    "truncation_mode": (
        lambda a: a.truncation_mode != "keep_start",
        "the collators keep the start of a conversation that is longer than `max_length`",
    ),
    "pad_token": (
        lambda a: a.pad_token is not None,
        "the collators pad with the tokenizer's own pad token: set `tokenizer.pad_token` instead (TRL deprecates "
        "this option for the same)",
    ),
    "dataset_num_proc": (
        lambda a: a.dataset_num_proc is not None,
        "no dataset is tokenized ahead of training (rows are rendered and tokenized as they are collated), so there "
        "is no preparation to spread over processes; use `dataloader_num_workers` to collate in parallel",
    ),
    "dataset_kwargs": (
        lambda a: (
            bool(set(a.dataset_kwargs or {}) - {"skip_prepare_dataset"})
            or (a.dataset_kwargs or {}).get("skip_prepare_dataset") is False
        ),
        "SFT's dataset preparation, which these keys configure, never runs: rows go to the chat collator as they are "
        "(as in GKDTrainer, which forces `skip_prepare_dataset=True`)",
    ),
    "chat_template_path": (
        lambda a: a.chat_template_path is not None and not str(a.chat_template_path).endswith((".jinja", ".j2")),
        "a model's template would be cloned with new tokens added to the student only, so the teacher no longer "
        "shares its vocabulary: give a .jinja file, or set `tokenizer.chat_template` on both tokenizers",
    ),
}


def check_inherited_options(args: Any, student_is_loaded: bool = False) -> None:
    """Refuse SFTConfig options that DistillationTrainer would otherwise silently ignore (see its docstring and
    docs/trl_compatibility.md); ``student_is_loaded``: the student came as a model, not a path to load."""
    for option, (is_set, reason) in _REPLACED_SFT_OPTIONS.items():
        if is_set(args):
            raise ValueError(
                f"`{option}={getattr(args, option)!r}` is not supported by DistillationTrainer: {reason}. "
                f"Leave `{option}` at its default."
            )
    if student_is_loaded and args.model_init_kwargs:
        raise ValueError(
            "`model_init_kwargs` is only used when `model` is a path or id string, but the student came loaded "
            "(SFTTrainer would ignore them with a warning). Pass the path instead, or load the model with them."
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
