"""One real vLLM server (CPU build, .venv-vllm) serving SmolLM2-135M-Instruct for every vllm test of the session.

A start costs about 45 s (more on a loaded machine), so the server is session-scoped and stopped by its pid at the
end. A test that kills it asks for ``server_to_kill`` instead of ``server``: such tests run after all others.
"""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_kd.assets import load_real_model
from hf_kd.vllm_server import VLLMServer

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
MAX_LOGPROBS = 64


def pytest_collection_modifyitems(items):
    """Tests that kill the shared server run last (a stable sort keeps the others' order)."""
    items.sort(key=lambda item: "server_to_kill" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def teacher_path() -> Path:
    return load_real_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def teacher_tokenizer(teacher_path):
    return AutoTokenizer.from_pretrained(teacher_path)


@pytest.fixture(scope="session")
def max_logprobs() -> int:
    """The server's --max-logprobs: the largest top_k a client may ask for."""
    return MAX_LOGPROBS


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of vLLM's environment; skips the test when vLLM is not installed."""
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed: bash scripts/setup_vllm.sh creates .venv-vllm")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def new_server(teacher_path):
    """Makes a server like the session's (a context manager: started on entry, stopped by its pid on exit); skips
    the test when vLLM is not installed."""
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed: bash scripts/setup_vllm.sh creates .venv-vllm")
    return lambda: VLLMServer(teacher_path, VLLM_PYTHON, max_logprobs=MAX_LOGPROBS, startup_timeout=600)


@pytest.fixture(scope="session")
def server(new_server):
    with new_server() as running:
        yield running


@pytest.fixture
def server_to_kill(server):
    """The shared server, for a test that kills it (ordered last by ``pytest_collection_modifyitems``)."""
    return server
