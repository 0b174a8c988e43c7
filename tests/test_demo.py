import datasets

from hf_kd.demo import (
    BUNDLED_DATA,
    DROPPED_LOOPS_DATA,
    DemoSettings,
    _table,
    bundled_cache_folder,
    training_data,
    without_looping_answers,
)


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


def test_a_run_shorter_than_an_epoch_caches_only_the_conversations_it_trains_on():
    rows = [_conversation(f"Answer number {i}.") for i in range(30)] + [_conversation("again again again again")]
    bundled = datasets.Dataset.from_list(rows)
    short, name = training_data(bundled, DemoSettings(max_steps=5, batch_size=4, seed=3))
    assert len(short) == 20 and name == f"{DROPPED_LOOPS_DATA}-20"
    again, _ = training_data(bundled, DemoSettings(max_steps=5, batch_size=4, seed=7))
    assert short["messages"] == again["messages"]  # every seed trains on (and caches) the same conversations
    assert all("again" not in row[-1]["content"] for row in short["messages"])
    full, name = training_data(bundled, DemoSettings(max_steps=10, batch_size=4))
    assert len(full) == 30 and name == DROPPED_LOOPS_DATA
    everything, name = training_data(bundled, DemoSettings(max_steps=10, drop_looping_answers=False))
    assert len(everything) == 31 and name == BUNDLED_DATA


def test_results_table_has_a_row_per_held_out_set_and_model_with_the_length_columns():
    scores = {"rouge_l": 30.0, "exact_match": 10.0, "loop_rate": 5.0, "answer_words": 42.5, "short_answer_rate": 12.5}
    table = _table(
        {
            "heldout": {"teacher": scores, "student after": scores | {"kl": 0.5}},
            "heldout_general": {"teacher": scores | {"rouge_l": 25.0, "short_answer_rate": 2.5}},
        }
    )
    lines = table.splitlines()
    assert "| answer words (mean) | answers under 10 words (%) | held-out KL |" in lines[0]
    assert lines[2:] == [
        "| heldout | teacher | 30.00 | 10.0 | 5.0 | 42.5 | 12.5 | - |",
        "| heldout | student after | 30.00 | 10.0 | 5.0 | 42.5 | 12.5 | 0.500 |",
        "| heldout_general | teacher | 25.00 | 10.0 | 5.0 | 42.5 | 2.5 | - |",
    ]


def test_rebuilt_bundled_data_gets_a_teacher_cache_folder_of_its_own(tmp_path, monkeypatch):
    """A cache of the old rows would refuse the new ones (its fingerprint differs), so the folder names the file."""
    monkeypatch.setattr("hf_kd.data.BUNDLED_DATA_DIR", tmp_path)
    (tmp_path / "train.jsonl").write_text('{"messages": [], "source": "a"}\n')
    before = bundled_cache_folder("smollm2-135m-instruct", DROPPED_LOOPS_DATA, 64)
    assert before == bundled_cache_folder("smollm2-135m-instruct", DROPPED_LOOPS_DATA, 64)
    (tmp_path / "train.jsonl").write_text('{"messages": [], "source": "b"}\n')
    after = bundled_cache_folder("smollm2-135m-instruct", DROPPED_LOOPS_DATA, 64)
    assert after != before and after.parent == before.parent and after.name.endswith("-top64")
