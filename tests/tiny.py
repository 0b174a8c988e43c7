"""The one source of tiny test objects, built locally in milliseconds (no downloads): word-level tokenizers with a
chat template, randomly initialised Llama models over their vocabularies, small conversation sets, random logits,
and the configuration of short training runs. conftest.py turns the common ones into fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_kd import smoke
from hf_kd.smoke import CHAT_TEMPLATE, NUMBERS, SPECIAL, WORDS  # the counting chat, defined once

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- tokenizers

COUNTING_VOCAB = (*SPECIAL, *NUMBERS, *WORDS)
"""The counting chat vocabulary: "please count from X" -> "X ... Y ." (ids 0 to 4 are the special tokens)."""
CHATML_VOCAB = (
    "<pad> <unk> <|im_start|> <|im_end|> "
    "user assistant system the a cat dog sat on mat is what capital of france paris city big small red blue "
    "and or not it was in to an sun moon sky sea tree run jump eat . , ? !"
).split()
"""A small English vocabulary with ChatML special tokens (ids 0 to 3: pad, unk, bos ``<|im_start|>``, eos)."""
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(
    extra_words=(),
    chat_template: str | None = CHAT_TEMPLATE,
    *,
    vocab=COUNTING_VOCAB,
    bos_token: str | None = None,
    eos_token: str = "<|end|>",
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``vocab`` + ``extra_words`` (ids in that order, repeats dropped),
    padding with ``<pad>``; by default the counting chat tokenizer with ``<|end|>`` as end of turn."""
    ids = {token: i for i, token in enumerate(dict.fromkeys([*vocab, *extra_words]))}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": bos_token} if bos_token is not None else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token=eos_token, **special
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """The ChatML variant of `make_tokenizer`: English words, ``<|im_start|>``/``<|im_end|>`` as bos/eos."""
    return make_tokenizer(
        chat_template=CHATML_TEMPLATE, vocab=CHATML_VOCAB, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )


# ---------------------------------------------------------------- models


def make_model(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    tie: bool = False,
    *,
    origin: str | None = None,
    **config_overrides,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (the seed fixes its weights) of the given width and depth; the defaults suit
    the counting tokenizer (pad 0, eos 4). ``origin`` names the checkpoint it claims to come from;
    ``config_overrides`` replace any `LlamaConfig` field."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=4,
        bos_token_id=None,
    )
    values.update(config_overrides)
    model = LlamaForCausalLM(LlamaConfig(**values))
    if origin is not None:
        model.config._name_or_path = origin
        model.name_or_path = origin
    return model


def make_pair(vocab_size: int, teacher_vocab_size: int | None = None, teacher_hidden: int = 48):
    """The usual (student, teacher): a 1-layer student (d=32, seed 1) and a 2-layer teacher (seed 2), the teacher
    over its own vocabulary when ``teacher_vocab_size`` is given."""
    student = make_model(vocab_size, hidden=32, layers=1, seed=1)
    teacher = make_model(teacher_vocab_size or vocab_size, hidden=teacher_hidden, layers=2, seed=2)
    return student, teacher


FAMILY_OVERRIDES = {
    "llama": {},
    "granite": {"logits_scaling": 8.0},
    "cohere": {"logit_scale": 0.25},
    "gemma2": {"final_logit_softcapping": 2.0, "head_dim": 8},
    "gemma3_text": {"final_logit_softcapping": 2.0, "head_dim": 8},
    "minicpm3": {
        "dim_model_base": 8,
        "num_key_value_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
    },
    "hyperclovax": {"logits_scaling": 0.5},
    "falcon_h1": {
        "lm_head_multiplier": 0.3,
        "mamba_d_ssm": 32,
        "mamba_n_heads": 4,
        "mamba_d_head": 8,
        "mamba_d_state": 8,
        "mamba_n_groups": 1,
        "mamba_chunk_size": 8,
    },
}
"""Tiny causal LMs of families that transform logits around their head (Llama as the plain reference)."""


def make_family_model(model_type: str, vocab_size: int, seed: int = 0, hidden: int = 32, **config_overrides):
    """A randomly initialised one-layer causal LM of a transformers family (a key of ``FAMILY_OVERRIDES``), with
    a wide initialisation so that its logits, and anything done to them, are far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=4,
        bos_token_id=None,
    )
    values.update(FAMILY_OVERRIDES[model_type])
    values.update(config_overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))


def chatml_llama(vocab_size: int, seed: int = 0, num_layers: int = 2, **config_overrides) -> LlamaForCausalLM:
    """A `make_model` for `chatml_tokenizer` (bos 2, eos 3, 256 positions), in eval mode."""
    return make_model(
        vocab_size,
        layers=num_layers,
        seed=seed,
        **{"max_position_embeddings": 256, "bos_token_id": 2, "eos_token_id": 3, **config_overrides},
    ).eval()


# ---------------------------------------------------------------- data


def make_conversations(n: int = 24, seed: int = 0) -> list[dict]:
    """``n`` chat conversations "please count from X" -> "X ... Y .", as rows (``hf_kd.smoke`` builds them)."""
    return smoke.make_conversations(n, seed).to_list()


def random_logits(seed: int, length: int, vocab_size: int):
    """Student and teacher logits (float64, batch of 2, scale 2) and labels; the first row's first two positions
    (a prompt) and the second row's last position (padding) are ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, length, vocab_size, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, length, vocab_size, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab_size, (2, length), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return s, t, labels


# ---------------------------------------------------------------- training configuration


def make_args(tmp_path: Path, **overrides):
    """A `DistillationConfig` for a short, seeded, off-policy CPU run writing under ``tmp_path``."""
    from hf_kd import DistillationConfig

    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=20,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_new_tokens=8,
        lmbda=0.0,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def bridge_args(loss_chunk_size: int | None, **overrides) -> SimpleNamespace:
    """The arguments a DSKD bridge reads from the trainer's configuration (FKL, kd_rate 0.5)."""
    return SimpleNamespace(
        **{"kd_loss": "fkl", "kd_temperature": None, "kd_rate": 0.5, "loss_chunk_size": loss_chunk_size, **overrides}
    )


def train_bridge(bridge, student, teacher, batch, steps: int):
    """``steps`` AdamW steps on one batch through a DSKD bridge (student lr 3e-3, projectors 1e-2): the loss of
    every step and the last step's logged values."""
    opt = torch.optim.AdamW(
        [{"params": student.parameters(), "lr": 3e-3}, {"params": bridge.parameters(), "lr": 1e-2}]
    )
    losses = []
    for _ in range(steps):
        loss, values = bridge.compute_loss(student, teacher, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, values


def train_losses(trainer) -> list[float]:
    """The training loss of every logged step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------- scripts


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (e.g. ``benchmarks/quality.py``) imported as a module named after its file."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
