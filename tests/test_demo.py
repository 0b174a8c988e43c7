import datasets

from hf_kd.demo import without_looping_answers


def _conversation(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "Write a line."}, {"role": "assistant", "content": answer}]}


def test_looping_answers_are_left_out_and_the_rest_kept_in_order():
    rows = [
        _conversation("The sea is calm tonight."),
        _conversation("A moment of stillness, a moment of stillness, a moment of stillness."),
        _conversation("Stillness comes; the moment passes; stillness returns, and a moment later it is gone."),
        _conversation("the the the the"),
    ]
    kept = without_looping_answers(datasets.Dataset.from_list(rows))
    assert [row["messages"][-1]["content"] for row in kept] == [
        "The sea is calm tonight.",
        "Stillness comes; the moment passes; stillness returns, and a moment later it is gone.",
    ]


def test_only_the_answer_decides_not_the_prompt():
    row = _conversation("A fine answer.")
    row["messages"][0]["content"] = "again again again again"
    assert len(without_looping_answers(datasets.Dataset.from_list([row]))) == 1
