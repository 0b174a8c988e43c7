"""ServedTeacher against a local HTTP server that replays a recorded vLLM answer, intact or broken.

The recording (tests/data/vllm_prompt_logprobs.json) is a real answer of vLLM 0.32 (CPU build) serving
SmolLM2-135M-Instruct to ``POST /v1/completions`` with ``prompt_logprobs=5``; tests/integration/test_served_teacher.py
checks the client against a running server.
"""

import copy
import math

import pytest
import torch
from served_fake import RECORDING, FakeServer

from hf_kd.teacher_cache import TopKReconstruction
from hf_kd.teachers import ServedTeacher, ServedTeacherError

PROMPTS = RECORDING["request"]["prompt"]
K = RECORDING["request"]["prompt_logprobs"]


@pytest.fixture
def fake():
    with FakeServer() as server:
        yield server


def client(url: str, **kwargs) -> ServedTeacher:
    return ServedTeacher(url, top_k=K, model="teacher", retries=2, backoff=0.0, **kwargs)


def expected_top_k(positions: list) -> tuple[list[list[int]], list[list[float]]]:
    """The recorded top-k per position (rank <= k, most likely first), read independently of the client."""
    ids, values = [], []
    for entries in positions[1:]:
        top = sorted(((v["rank"], int(t), v["logprob"]) for t, v in entries.items() if v["rank"] <= K))
        ids.append([t for _, t, _ in top])
        values.append([lp for _, _, lp in top])
    return ids, values


def test_recorded_answer_becomes_the_cache_layout_in_one_request(fake):
    scores = client(fake.url).score(PROMPTS)
    length = max(map(len, PROMPTS))
    assert scores.ids.shape == (2, length - 1, K) and scores.log_tail.shape == (2, length - 1)
    assert len(fake.requests) == 1
    path, payload = fake.requests[0]
    assert path == "/v1/completions" and payload["prompt"] == PROMPTS and payload["prompt_logprobs"] == K
    assert payload["max_tokens"] == 1 and payload["add_special_tokens"] is False
    for j, choice in enumerate(RECORDING["response"]["choices"]):
        n = len(PROMPTS[j])
        ids, values = expected_top_k(choice["prompt_logprobs"])
        assert scores.ids[j, : n - 1].tolist() == ids
        torch.testing.assert_close(scores.logprobs[j, : n - 1], torch.tensor(values), rtol=0, atol=1e-6)
        assert scores.scored[j].tolist() == [True] * (n - 1) + [False] * (length - n)
        # top-k mass + tail mass = 1
        total = torch.logsumexp(torch.cat([scores.logprobs[j, : n - 1], scores.log_tail[j, : n - 1, None]], -1), -1)
        torch.testing.assert_close(total, torch.zeros(n - 1), rtol=0, atol=1e-5)
    # The cache's reconstruction reads the rows: the top-k come back as they were sent.
    n = len(PROMPTS[0]) - 1
    dense = TopKReconstruction(vocab_size=49152, top_k=K)(scores.packed_rows()[0, :n])
    torch.testing.assert_close(dense.gather(-1, scores.ids[0, :n]), scores.logprobs[0, :n])


def test_left_padded_batch_rows_line_up_with_the_student_logits(fake):
    length = max(map(len, PROMPTS)) + 2
    input_ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for j, prompt in enumerate(PROMPTS):
        input_ids[j, length - len(prompt) :] = torch.tensor(prompt)
        mask[j, length - len(prompt) :] = 1
    scores = client(fake.url).score(input_ids, mask)
    assert fake.requests[0][1]["prompt"] == PROMPTS  # padding is not sent
    for j, choice in enumerate(RECORDING["response"]["choices"]):
        ids, _ = expected_top_k(choice["prompt_logprobs"])
        start = length - len(PROMPTS[j])  # row t predicts token t + 1: the first scored row is the first token's
        assert scores.ids[j, start:].tolist() == ids
        assert not scores.scored[j, :start].any() and scores.scored[j, start:].all()


def broken(change) -> dict:
    response = copy.deepcopy(RECORDING["response"])
    change(response)
    return response


def first_entries(response) -> dict:
    """Position 1 of sequence 0: the top-5 plus the prompt token, which is outside them (rank 2923)."""
    return response["choices"][0]["prompt_logprobs"][1]


def drop_most_likely(entries: dict) -> None:
    entries.pop(next(token for token, value in entries.items() if value["rank"] == 1))


MALFORMED = {
    "a position missing": (lambda r: r["choices"][1]["prompt_logprobs"].pop(), "prompt log-prob positions"),
    "a top-k entry missing": (lambda r: drop_most_likely(first_entries(r)), f"only {K - 1} entries of rank <= {K}"),
    "fewer than k entries": (
        lambda r: drop_most_likely(r["choices"][0]["prompt_logprobs"][2]),  # the prompt token is among the top-k
        f"returned {K - 1} entries at sequence 0, position 2",
    ),
    "a NaN log-prob": (lambda r: next(iter(first_entries(r).values())).update(logprob=math.nan), "invalid entries"),
    "a positive log-prob": (lambda r: next(iter(first_entries(r).values())).update(logprob=0.5), "invalid entries"),
    "ranks beyond k": (
        lambda r: [v.update(rank=K + 1) for v in list(first_entries(r).values())[:2]],
        f"of rank <= {K}",
    ),
    "top-k summing over 1": (
        lambda r: [v.update(logprob=-0.1) for v in first_entries(r).values()],
        "summing to",
    ),
    "a choice missing": (lambda r: r["choices"].pop(), "1 choices for 2 sequences"),
    "no prompt_logprobs": (lambda r: r["choices"][0].pop("prompt_logprobs"), "no prompt log-prob positions"),
    "no choices": (lambda r: r.clear(), "no choices"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_answer_is_an_error_naming_the_server(fake, name):
    change, message = MALFORMED[name]
    fake.answers = [(200, broken(change))]
    with pytest.raises(ServedTeacherError, match=message) as error:
        client(fake.url).score(PROMPTS)
    assert fake.url in str(error.value)


def test_answer_that_is_not_json_is_an_error(fake):
    fake.answers = [(200, b'{"choices": [')]
    with pytest.raises(ServedTeacherError, match="not JSON"):
        client(fake.url).score(PROMPTS)


def test_server_errors_are_retried_then_succeed(fake):
    fake.answers = [(503, {"error": "busy"}), (500, {"error": "oops"}), (200, RECORDING["response"])]
    scores = client(fake.url).score(PROMPTS)
    assert len(fake.requests) == 3 and scores.scored.any()


def test_server_errors_past_the_retries_name_the_url_and_the_last_answer(fake):
    fake.answers = [(503, {"error": "overloaded"})]
    with pytest.raises(ServedTeacherError, match="after 3 attempts.*HTTP 503.*overloaded") as error:
        client(fake.url).score(PROMPTS)
    assert fake.url in str(error.value) and len(fake.requests) == 3


def test_refusal_is_not_retried_and_shows_the_server_message(fake):
    fake.answers = [(400, {"error": {"message": "Requested prompt logprobs of 99, which is greater than max 64"}})]
    with pytest.raises(ServedTeacherError, match="HTTP 400.*greater than max 64"):
        client(fake.url).score(PROMPTS)
    assert len(fake.requests) == 1


def test_nobody_listening_is_an_error_naming_the_url():
    with FakeServer() as gone:
        url = gone.url
    with pytest.raises(ServedTeacherError, match="did not answer /v1/completions after 3 attempts") as error:
        client(url).score(PROMPTS)
    assert url in str(error.value)


def test_check_refuses_another_model(fake):
    fake.answers = [(200, {"data": [{"id": "other-model", "root": "/models/other-model"}]})]
    with pytest.raises(ServedTeacherError, match="serves 'other-model'.*not 'my-teacher'"):
        ServedTeacher(fake.url, top_k=K).check(tokenizer=None, model_name="my-teacher")


def test_bad_batches_are_refused_before_any_request(fake):
    teacher = client(fake.url)
    with pytest.raises(ValueError, match="at least one token"):
        teacher.score([[1, 2], []])
    with pytest.raises(ValueError, match="has gaps"):
        teacher.score(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]))
    assert not fake.requests
