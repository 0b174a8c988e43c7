"""A real vLLM server (CPU build, .venv-vllm) serving SmolLM2-135M-Instruct, scored by ServedTeacher.

The server is the session's (conftest.py); test_served_trainer.py kills it last. Skipped when vLLM is not installed
(``bash scripts/setup_vllm.sh``).
"""

import pytest
import torch
from tiny import make_tokenizer
from transformers import AutoModelForCausalLM

from hf_kd.data import load_bundled_dataset
from hf_kd.teacher_cache import CacheEncoding
from hf_kd.teachers import ServedTeacher, ServedTeacherError

TOLERANCE = 2e-4  # fp32 vLLM vs fp32 transformers log-probabilities

pytestmark = pytest.mark.vllm


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


def test_check_accepts_the_served_model_and_its_tokenizer(server, teacher_path, teacher_tokenizer, max_logprobs):
    teacher = ServedTeacher(server.url, top_k=max_logprobs)
    teacher.check(teacher_tokenizer, model_name=str(teacher_path))
    assert teacher.model == str(teacher_path)


def test_check_refuses_another_tokenizer(server):
    with pytest.raises(ServedTeacherError, match="tokenizes a probe text differently") as error:
        ServedTeacher(server.url, top_k=8).check(make_tokenizer())
    assert server.url in str(error.value)


def test_check_refuses_another_model_name(server, teacher_tokenizer):
    with pytest.raises(ServedTeacherError, match="not 'HuggingFaceTB/SmolLM2-1.7B-Instruct'"):
        ServedTeacher(server.url, top_k=8).check(teacher_tokenizer, model_name="HuggingFaceTB/SmolLM2-1.7B-Instruct")


def test_top_k_beyond_the_servers_max_logprobs_is_refused_with_its_reason(server, teacher_tokenizer, max_logprobs):
    with pytest.raises(ServedTeacherError, match=r"refused /v1/completions \(HTTP 400\).*logprobs"):
        ServedTeacher(server.url, top_k=max_logprobs + 1).check(teacher_tokenizer)
