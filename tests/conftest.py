"""Fixtures over the tiny builders of tiny.py: a chat tokenizer, a student and a teacher, small conversation sets."""

import os
import runpy
from pathlib import Path

# hf_kd's offline defaults, loaded by path: importing hf_kd would let huggingface_hub read the environment first.
_ENVIRONMENT = runpy.run_path(str(Path(__file__).resolve().parents[1] / "hf_kd" / "environment.py"))
_ENVIRONMENT["apply_defaults"](_ENVIRONMENT["OFFLINE_DEFAULTS"])

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny import make_conversations, make_model, make_tokenizer  # noqa: E402


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
