"""Tiny stand-ins for a distillation run, built locally in a second: a word-level chat tokenizer, random Llama
teacher and student, and a generated counting dataset. `hf-kd distill --smoke` (and examples/distill.py, the same
script) uses them so that every recipe can be exercised end to end (collate, rollout, both forwards, loss, save)
without downloads or a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
WORDS = ["count", "from", "to", "please", "then", "stop", "and", "the", "numbers", "after", "."]
SPECIAL = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
TEACHER_EXTRA_WORDS = ["<|teacher|>", "hmm", "well", "so"]
"""Extra entries that give the smoke teacher's tokenizer a different vocabulary (cross-vocabulary recipes)."""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_chat_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with a chat template, a pad token and `<|end|>` as end of turn."""
    vocab = {word: i for i, word in enumerate(SPECIAL + NUMBERS + WORDS + list(extra_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given width and depth over the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def make_conversations(n: int, seed: int = 0) -> Dataset:
    """`n` chat conversations "please count from X" -> "X ... Y .", deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 8, (1,), generator=generator))
        length = int(torch.randint(2, 5, (1,), generator=generator))
        prompt = f"please count from {NUMBERS[start]}"
        answer = " ".join(NUMBERS[start : start + length + 1]) + " ."
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


@dataclass
class SmokeSetup:
    """Everything a smoke run trains with."""

    student: LlamaForCausalLM
    teacher: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    teacher_tokenizer: PreTrainedTokenizerFast | None
    """Set only for cross-vocabulary runs: the teacher then has its own, larger vocabulary."""
    train_dataset: Dataset


def build_smoke_setup(cross_vocabulary: bool = False, num_examples: int = 64, seed: int = 0) -> SmokeSetup:
    """A 1-layer student (d=32) and a 2-layer teacher (d=64); with `cross_vocabulary` the teacher has its own
    vocabulary."""
    tokenizer = make_chat_tokenizer()
    teacher_tokenizer = make_chat_tokenizer(TEACHER_EXTRA_WORDS) if cross_vocabulary else None
    return SmokeSetup(
        student=make_tiny_model(tokenizer, hidden=32, layers=1, seed=seed + 1),
        teacher=make_tiny_model(teacher_tokenizer or tokenizer, hidden=64, layers=2, seed=seed + 2),
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        train_dataset=make_conversations(num_examples, seed=seed),
    )
