"""Randomly initialised models of real shapes for the speed and memory benchmarks, and a tokenizer covering any
vocabulary size (so every id decodes: the span loss needs text)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelShape:
    """A Llama-architecture model shape (tied input/output embeddings, like SmolLM2)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SMOLLM2_135M = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536)


SMOLLM2_360M = ModelShape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560)


def build_tokenizer(vocab: int):
    """A word-level tokenizer covering the whole model vocabulary, so any id decodes (the span loss needs text).

    Ids 0 and 1 are <pad> and <eos>; every 16th id is a sentence-ending word, so random text has sentences.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [f"Tok{i}." if i % 16 == 0 else f"Tok{i}" for i in range(2, vocab)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def build_model(shape: ModelShape, vocab: int, seq: int, seed: int):
    """A randomly initialised Llama causal LM of ``shape`` with tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, seq),
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
