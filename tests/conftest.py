"""Tiny models, a tiny chat tokenizer and a small fixed conversation set, built locally (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
WORDS = ["count", "from", "to", "please", "then", "stop", "and", "the", "numbers", "after", "."]
SPECIAL = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(extra_words=(), chat_template=CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + NUMBERS + WORDS + list(extra_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>")
    tok.chat_template = chat_template
    return tok


def make_model(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    config = LlamaConfig(
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
    return LlamaForCausalLM(config)


def make_conversations(n: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 8, (1,), generator=g))
        length = int(torch.randint(2, 5, (1,), generator=g))
        prompt = f"please count from {NUMBERS[start]}"
        answer = " ".join(NUMBERS[start : start + length + 1]) + " ."
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(autouse=True)
def torch_threads(request):
    """Tiny models run fastest on one thread (threading overhead dominates); real models get every core."""
    before = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def student(tokenizer):
    return make_model(len(tokenizer), hidden=32, layers=1, seed=1)


@pytest.fixture
def teacher(tokenizer):
    return make_model(len(tokenizer), hidden=64, layers=2, seed=2)


@pytest.fixture
def train_dataset():
    return Dataset.from_list(make_conversations(24, seed=0))


@pytest.fixture
def heldout_dataset():
    return Dataset.from_list(make_conversations(8, seed=1))
