"""Tiny, fully local models and tokenizer for fast tests: a word-level tokenizer with a ChatML template and
randomly initialised Llama models over its vocabulary."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "user assistant system the a cat dog sat on mat is what capital of france paris city big small red blue "
    "and or not it was in to a an sun moon sky sea tree run jump eat . , ? !"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace split) with ChatML special tokens, padding with ``<pad>``."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL_TOKENS + WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, num_layers: int = 2, **overrides) -> LlamaConfig:
    """A Llama config small enough to run in milliseconds on CPU."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(vocab_size: int, seed: int = 0, num_layers: int = 2, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama in eval mode; the seed fixes its weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, num_layers, **overrides)).eval()
