"""Dual tokenization: one conversation in the student's and in the teacher's tokenization and chat format.

Cross-vocabulary DSKD (DSKD-CMA, arXiv 2406.17328) feeds each model the same text in its own tokens. The student
side is exactly what TRL's ``DataCollatorForChatML`` returns; the teacher side is the same conversation rendered
with the teacher's chat template (a base model without one gets ``hf_kd.real_models.PLAIN_CHAT_TEMPLATE``,
``<bos>User: ...\\nAssistant: ...<eos>\\n``) and laid out the same way: left padding, labels -100 on prompt and
padding, prompts left-padded. Student generations are moved to the teacher's tokenization by decoding the
generated text and re-rendering the conversation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl.experimental.utils import DataCollatorForChatML
from trl.trainer.utils import pad

from ..losses import IGNORE_INDEX
from ..real_models import PLAIN_CHAT_TEMPLATE  # (for teachers without a chat template)

Messages = list[dict[str, str]]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool) -> str:
    """The conversation as text in the tokenizer's chat template, or :data:`PLAIN_CHAT_TEMPLATE` if it has none."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=tokenizer.chat_template or PLAIN_CHAT_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    prompt_messages: Messages,
    response: str,
    complete: bool = True,
    max_length: int | None = None,
    require_prompt: bool = True,
) -> tuple[list[int], int]:
    """Token ids of prompt + assistant ``response`` and the number of prompt tokens among them.

    ``complete=False`` (a generation cut before its end of turn) drops what the template appends after the
    response. Like TRL's collator, the whole text is tokenized at once and, past ``max_length``, the oldest tokens
    are dropped; ``require_prompt`` makes it an error when that leaves no prompt token (as TRL's collator does).
    """
    prompt_text = render_chat(tokenizer, prompt_messages, add_generation_prompt=True)
    full_text = render_chat(tokenizer, [*prompt_messages, {"role": "assistant", "content": response}], False)
    if not complete:
        end = full_text.rfind(response) + len(response) if response else len(prompt_text)
        full_text = full_text[: max(end, len(prompt_text))]
    if full_text.startswith(prompt_text) and tokenizer.is_fast:
        enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        n_prompt = next(
            (i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(prompt_text)), len(ids)
        )
    else:
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        n_prompt = min(len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]), len(ids))
    if max_length is not None and len(ids) > max_length:
        n_prompt = max(0, n_prompt - (len(ids) - max_length))
        ids = ids[-max_length:]
    if n_prompt == 0 and require_prompt:
        raise ValueError(
            f"A conversation has no prompt tokens left after truncation to max_length={max_length} in the "
            "teacher's tokenization; increase max_length."
        )
    return ids, n_prompt


def teacher_batch(
    encoded: list[tuple[list[int], int]], pad_token_id: int, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded teacher_input_ids / teacher_attention_mask / teacher_labels / teacher_prompts /
    teacher_prompt_attention_mask from (ids, prompt length) pairs, laid out as ``DataCollatorForChatML`` does."""

    def left(rows: list[list[int]], value: int) -> torch.Tensor:
        return pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value, padding_side="left").to(
            device
        )

    ids = [e[0] for e in encoded]
    prompts = [e[0][: e[1]] for e in encoded]
    labels = [[IGNORE_INDEX] * n + e[n:] for e, n in encoded]
    return {
        "teacher_input_ids": left(ids, pad_token_id),
        "teacher_attention_mask": left([[1] * len(r) for r in ids], 0),
        "teacher_labels": left(labels, IGNORE_INDEX),
        "teacher_prompts": left(prompts, pad_token_id),
        "teacher_prompt_attention_mask": left([[1] * len(r) for r in prompts], 0),
    }


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The teacher tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token.")
    return pad_id


class DualTokenizationCollator:
    """Collate ``messages`` conversations for a student and a teacher with different tokenizers.

    Returns what ``DataCollatorForChatML`` returns for the student (input_ids, attention_mask, labels, prompts,
    prompt_attention_mask, ...) plus the teacher's tokenization (see :func:`teacher_batch`) and
    ``prompt_messages`` (the prompt turns of each conversation, used to re-tokenize generations for the teacher).
    The last message of each conversation must be the assistant's answer.
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        messages_key: str = "messages",
    ):
        self.student = DataCollatorForChatML(
            tokenizer=student_tokenizer, max_length=max_length, messages_key=messages_key
        )
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_pad_id = _pad_id(teacher_tokenizer)
        self.max_length = self.student.max_length
        self.messages_key = messages_key

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        conversations = []
        for example in examples:
            messages = example.get(self.messages_key)
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(
                    f"DualTokenizationCollator needs a '{self.messages_key}' list ending with the assistant's answer "
                    "in every example (the teacher re-renders the conversation in its own chat format)."
                )
            conversations.append(messages)
        out = self.student(examples)
        encoded = [
            encode_conversation(self.teacher_tokenizer, m[:-1], m[-1]["content"], True, self.max_length)
            for m in conversations
        ]
        out.update(teacher_batch(encoded, self.teacher_pad_id))
        out["prompt_messages"] = [m[:-1] for m in conversations]
        return out


def generated_teacher_inputs(
    batch: Any,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    prompt_messages: list[Messages],
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher tokenization of a generated batch (``GeneratedBatch``: generated tokens are where labels != -100).

    Each completion is decoded with the student's tokenizer (special tokens dropped) and the conversation
    ``prompt_messages[i] + [assistant: completion]`` is re-encoded for the teacher. A completion that ends with a
    special token (EOS / end of turn) is complete and gets the teacher's end of turn; one cut by the length limit
    does not.
    """
    if len(prompt_messages) != batch.labels.shape[0]:
        raise ValueError(
            f"Got {len(prompt_messages)} prompt conversations for a generated batch of {batch.labels.shape[0]} rows."
        )
    special = set(student_tokenizer.all_special_ids)
    encoded = []
    for row, prompt in zip(batch.labels.tolist(), prompt_messages):
        completion = [t for t in row if t != IGNORE_INDEX]
        text = student_tokenizer.decode(completion, skip_special_tokens=True)
        complete = bool(completion) and completion[-1] in special
        # a long generation may push the whole prompt out of max_length: train on what is left, do not fail
        encoded.append(
            encode_conversation(teacher_tokenizer, prompt, text, complete, max_length, require_prompt=False)
        )
    return teacher_batch(encoded, _pad_id(teacher_tokenizer), device=batch.labels.device)


__all__ = [
    "PLAIN_CHAT_TEMPLATE",
    "DualTokenizationCollator",
    "encode_conversation",
    "generated_teacher_inputs",
    "render_chat",
    "teacher_batch",
]
