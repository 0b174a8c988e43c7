"""Chat-message mapping of common data layouts, and the bundled conversations."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, load_dataset

from hf_kd.data import load_bundled_dataset, map_to_messages, near_duplicate_prompts, to_messages
from hf_kd.evaluation import has_repetition_loop


def write_json(path, rows) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def load_json(tmp_path, name, rows) -> Dataset:
    files = write_json(tmp_path / f"{name}.jsonl", rows)
    return load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))


def turns(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_dolly_layout(tmp_path):
    rows = [
        {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "qa"},
        {"instruction": "Summarize.", "context": "The cat sat.", "response": "A cat sat.", "category": "sum"},
    ]
    mapped = map_to_messages(load_json(tmp_path, "dolly", rows))
    assert sorted(mapped.column_names) == ["category", "messages"]
    assert mapped[0]["messages"] == turns("Who wrote Hamlet?", "Shakespeare.")
    assert mapped[1]["messages"] == turns("Summarize.\n\nThe cat sat.", "A cat sat.")
    assert mapped["category"] == ["qa", "sum"]


def test_alpaca_layout(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    mapped = map_to_messages(load_json(tmp_path, "alpaca", rows))
    assert mapped.column_names == ["messages"]
    assert mapped["messages"] == [turns("Add the numbers.\n\n2 and 3", "5"), turns("Name a colour.", "Blue.")]


def test_prompt_completion_layouts():
    assert to_messages({"prompt": "Hi?", "completion": "Hello."}) == {"messages": turns("Hi?", "Hello.")}
    conversational = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "completion": [{"role": "assistant", "content": "Hello."}],
    }
    assert to_messages(conversational)["messages"] == [{"role": "system", "content": "Be brief."}] + turns(
        "Hi?", "Hello."
    )


def test_messages_layout_is_kept_as_is():
    data = Dataset.from_list([{"messages": turns("a", "b"), "source": "x"}])
    assert map_to_messages(data) is data
    assert to_messages({"messages": turns("a", "b")}) == {"messages": turns("a", "b")}
    with pytest.raises(ValueError, match="role"):
        to_messages({"messages": [{"content": "no role"}]})


def test_unknown_layout_names_found_and_expected_columns(tmp_path):
    data = load_json(tmp_path, "unknown", [{"question": "Why?", "answer": "Because."}])
    with pytest.raises(ValueError) as error:
        map_to_messages(data)
    message = str(error.value)
    assert "['answer', 'question']" in message
    for expected in ("messages", "instruction, response", "instruction, output", "prompt, completion"):
        assert expected in message


@pytest.fixture(scope="module")
def bundled():
    return {split: load_bundled_dataset(split) for split in ("train", "heldout", "heldout_general")}


def test_bundled_data_sizes_and_shape(bundled):
    assert len(bundled["train"]) >= 450 and len(bundled["heldout"]) >= 100 and len(bundled["heldout_general"]) >= 80
    legacy = {"humaneval", "writingbench", "shakespeare", "templates"}
    assert set(bundled["train"]["source"]) == legacy | {"assistant"}
    assert set(bundled["heldout"]["source"]) == legacy
    assert set(bundled["heldout_general"]["source"]) == {
        "freshqa", "evals_math", "evals_proofreader", "evals_jokes", "written"
    }  # fmt: skip
    for data in bundled.values():
        assert data.column_names == ["messages", "source"]
        for messages in data["messages"]:
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert all(m["content"].strip() for m in messages)


def test_training_is_mostly_assistant_use_without_looping_answers(bundled):
    sources = bundled["train"]["source"]
    assert sources.count("shakespeare") + sources.count("humaneval") < len(sources) / 4
    assert not [m[-1]["content"] for m in bundled["train"]["messages"] if has_repetition_loop(m[-1]["content"])]


def test_bundled_splits_share_no_prompt(bundled):
    prompts = {split: [m[0]["content"] for m in data["messages"]] for split, data in bundled.items()}
    assert len(set(prompts["train"])) == len(bundled["train"]), "prompts within a split are unique"
    for split in ("heldout", "heldout_general"):
        assert not near_duplicate_prompts(prompts["train"], prompts[split]), f"train and {split} share prompts"


def test_near_duplicates_are_the_same_text_or_nearly_the_same_words():
    prompts = ["Explain, in two sentences: why is the sky BLUE?", "What is the capital of France?"]
    others = [
        "explain in two sentences why is the sky blue",  # same words, other case and punctuation
        "What is the capital of Germany?",  # one word of seven differs: another question
        "Write a Python function that returns the sum of the even numbers in a given list of integers.",
    ]
    assert near_duplicate_prompts(prompts, others) == [(prompts[0], others[0])]
    edited = "Write a Python function that returns the sum of the odd numbers in a given list of integers."
    assert near_duplicate_prompts([edited], others) == [(edited, others[2])]  # one word of 16 edited
    assert near_duplicate_prompts(["Capital of Germany?"], others, threshold=0.5) == [
        ("Capital of Germany?", others[1])
    ]


def test_unknown_split():
    with pytest.raises(ValueError, match="heldout"):
        load_bundled_dataset("validation")
