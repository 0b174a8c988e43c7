"""A real vLLM server (CPU build, .venv-vllm) serving SmolLM2-135M-Instruct, scored by ServedTeacher.

One server is started for the module (about 30 s, more on a loaded machine) and stopped by its pid; the last test
kills it and checks that the client's error names the server. Skipped when vLLM is not installed
(``bash scripts/setup_vllm.sh``).
"""

import os
import signal
from pathlib import Path

import pytest
import torch
from tiny import make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.assets import load_real_model
from hf_kd.data import load_bundled_dataset
from hf_kd.teacher_cache import CacheEncoding
from hf_kd.teachers import ServedTeacher, ServedTeacherError
from hf_kd.vllm_server import VLLMServer

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
MAX_LOGPROBS = 64
TOLERANCE = 2e-4  # fp32 vLLM vs fp32 transformers log-probabilities

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason="vLLM is not installed: bash scripts/setup_vllm.sh creates .venv-vllm"
    ),
]


@pytest.fixture(scope="module")
def teacher_path() -> Path:
    return load_real_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def teacher_tokenizer(teacher_path):
    return AutoTokenizer.from_pretrained(teacher_path)


@pytest.fixture(scope="module")
def server(teacher_path):
    with VLLMServer(teacher_path, VLLM_PYTHON, max_logprobs=MAX_LOGPROBS, startup_timeout=600) as running:
        yield running


@pytest.fixture(scope="module")
def sequences(teacher_tokenizer) -> list[list[int]]:
    """Four real conversations through the chat template, 40 to 200 tokens each."""
    rows = load_bundled_dataset("train").select(range(4))
    return [
        teacher_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)[:200] for row in rows
    ]


def test_served_top_k_equals_the_live_teacher_in_the_cache_layout(server, teacher_path, teacher_tokenizer, sequences):
    k = 20
    length = max(map(len, sequences))
    input_ids = torch.full((len(sequences), length), teacher_tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for j, ids in enumerate(sequences):  # left padding, as the chat collator pads
        input_ids[j, length - len(ids) :], mask[j, length - len(ids) :] = torch.tensor(ids), 1
    teacher = ServedTeacher(server.url, top_k=k, vocab_size=len(teacher_tokenizer))
    served = teacher.score(input_ids, mask)
    requests_bytes = teacher.bytes_received

    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    encoding = CacheEncoding(k, model.config.vocab_size, "float32")
    agree = total = 0
    for j, ids in enumerate(sequences):
        with torch.inference_mode():
            live = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        live_ids, live_values, live_tail = (torch.as_tensor(a) for a in encoding.encode(live))
        rows = slice(length - len(ids), length - 1)  # row t: the distribution of token t + 1
        served_ids, served_values = served.ids[j, rows], served.logprobs[j, rows]
        assert served.scored[j, rows].all() and not served.scored[j, : rows.start].any()
        # Same log-probabilities for the tokens the server picked, and those are the live top-k up to near-ties.
        torch.testing.assert_close(served_values, live.gather(-1, served_ids), rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(served_values, live_values, rtol=0, atol=TOLERANCE)
        agree += int((served_ids == live_ids.long()).sum())
        total += served_ids.numel()
        # Tail mass (1 - top-k mass), as the cache stores it from the full row.
        torch.testing.assert_close(served.log_tail[j, rows].exp(), live_tail.exp(), rtol=0, atol=TOLERANCE)
    assert agree / total > 0.99, f"only {agree} of {total} top-{k} ids agree"
    assert requests_bytes > 0


def test_check_accepts_the_served_model_and_its_tokenizer(server, teacher_path, teacher_tokenizer):
    teacher = ServedTeacher(server.url, top_k=MAX_LOGPROBS)
    teacher.check(teacher_tokenizer, model_name=str(teacher_path))
    assert teacher.model == str(teacher_path)


def test_check_refuses_another_tokenizer(server):
    with pytest.raises(ServedTeacherError, match="tokenizes a probe text differently") as error:
        ServedTeacher(server.url, top_k=8).check(make_tokenizer())
    assert server.url in str(error.value)


def test_check_refuses_another_model_name(server, teacher_tokenizer):
    with pytest.raises(ServedTeacherError, match="not 'HuggingFaceTB/SmolLM2-1.7B-Instruct'"):
        ServedTeacher(server.url, top_k=8).check(teacher_tokenizer, model_name="HuggingFaceTB/SmolLM2-1.7B-Instruct")


def test_top_k_beyond_the_servers_max_logprobs_is_refused_with_its_reason(server, teacher_tokenizer):
    with pytest.raises(ServedTeacherError, match=r"refused /v1/completions \(HTTP 400\).*logprobs"):
        ServedTeacher(server.url, top_k=MAX_LOGPROBS + 1).check(teacher_tokenizer)


def test_killed_server_is_an_error_naming_its_url(server, sequences):
    """Runs last: the server dies (SIGKILL to its process group) and the next batch fails after the retries."""
    teacher = ServedTeacher(server.url, top_k=8, timeout=10, retries=2, backoff=0.1)
    teacher.score(sequences[:1])
    os.killpg(server.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    with pytest.raises(ServedTeacherError, match="did not answer /v1/completions after 3 attempts") as error:
        teacher.score(sequences[:1])
    assert server.url in str(error.value)
