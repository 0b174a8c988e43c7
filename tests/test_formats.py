"""The data a TRL user passes: streams, TRL's dataset formats and their labels, invalid rows, remote-code models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset, IterableDataset
from tiny import make_args, make_conversations, make_model, make_tokenizer, train_losses
from trl.experimental.utils import DataCollatorForChatML

from hf_kd import DistillationTrainer

SENTENCE = "please count from two to five"
ANSWER = "two three four five ."


def trainer_for(tmp_path, tokenizer, student, teacher, train_dataset, eval_dataset=None, **args):
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2, per_device_eval_batch_size=4, **args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def trains(trainer) -> None:
    """Two optimizer steps with finite losses."""
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answers(batch) -> list[list[int]]:
    """Each row's trained tokens (labels other than -100)."""
    return [[t for t in row if t != -100] for row in batch["labels"].tolist()]


# ---------------------------------------------------------------- streams


def test_streaming_datasets_construct_train_and_evaluate(tmp_path, tokenizer, student, teacher, train_dataset):
    stream = train_dataset.to_iterable_dataset()
    heldout = Dataset.from_list(make_conversations(8, seed=1)).to_iterable_dataset()
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, stream, {"a": heldout, "b": heldout})
    trains(trainer)
    metrics = trainer.evaluate(heldout)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_empty_stream_is_refused(tmp_path, tokenizer, student, teacher):
    empty = Dataset.from_list(make_conversations(2)).to_iterable_dataset().filter(lambda row: False)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        trainer_for(tmp_path, tokenizer, student, teacher, empty)


# ---------------------------------------------------------------- TRL's formats and their labels


def test_string_prompt_completion_trains_on_the_completion_without_chat_template(
    tmp_path, tokenizer, student, teacher
):
    rows = Dataset.from_list([{"prompt": SENTENCE + " ", "completion": ANSWER}] * 8)
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, rows)
    batch = trainer.data_collator([rows[0]])
    assert batch["input_ids"][0].tolist() == ids(tokenizer, f"{SENTENCE} {ANSWER}") + [tokenizer.eos_token_id]
    assert answers(batch) == [ids(tokenizer, ANSWER) + [tokenizer.eos_token_id]]  # EOS added, as TRL's SFT does
    assert batch["prompts"][0].tolist() == ids(tokenizer, SENTENCE)
    trains(trainer)


def test_message_prompt_completion_goes_through_the_chat_template(tmp_path, tokenizer, student, teacher):
    conversations = make_conversations(8)
    rows = Dataset.from_list([{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in conversations])
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, rows)
    got = trainer.data_collator(list(rows))
    expected = DataCollatorForChatML(tokenizer=tokenizer)(conversations)
    for key in ("input_ids", "labels", "prompts"):
        assert torch.equal(got[key], expected[key])
    trains(trainer)


def test_text_trains_on_every_token_and_refuses_generation(tmp_path, tokenizer, student, teacher):
    rows = Dataset.from_list([{"text": f"{SENTENCE} {ANSWER}"}] * 8)
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, rows)
    batch = trainer.data_collator([rows[0]])
    tokens = ids(tokenizer, f"{SENTENCE} {ANSWER}") + [tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == tokens
    # every token is a label: the first has nothing before it to be predicted from (the loss shifts it out)
    assert batch["labels"][0].tolist() == [-100, *tokens[1:]]
    trains(trainer)
    for generated in ({"lmbda": 0.5}, {"seq_kd": True}):
        with pytest.raises(ValueError, match="no prompt"):
            trainer_for(tmp_path, tokenizer, student, teacher, rows, **generated)


@pytest.mark.parametrize("row", [{"text": f"{SENTENCE} {ANSWER}"}, {"prompt": SENTENCE, "completion": ANSWER}])
def test_plain_text_formats_need_no_chat_template(tmp_path, student, teacher, row):
    base = make_tokenizer(chat_template=None)  # a base model's tokenizer
    trains(trainer_for(tmp_path, base, student, teacher, Dataset.from_list([row] * 8)))


def test_dataset_text_field_names_the_text_column(tmp_path, tokenizer, student, teacher):
    rows = Dataset.from_list([{"body": f"{SENTENCE} {ANSWER}"}] * 8)
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, rows, dataset_text_field="body")
    assert answers(trainer.data_collator([rows[0]])) == [ids(tokenizer, f"{SENTENCE} {ANSWER}")[1:] + [4]]


def test_prompt_only_trains_fully_on_policy_and_is_refused_otherwise(tmp_path, tokenizer, student, teacher):
    conversations = make_conversations(8)
    rows = Dataset.from_list([{"prompt": c["messages"][:-1]} for c in conversations])
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, rows, lmbda=1.0)
    batch = trainer.data_collator(list(rows))
    expected = DataCollatorForChatML(tokenizer=tokenizer)(conversations)
    assert torch.equal(batch["prompts"], expected["prompts"])
    assert (batch["labels"] == -100).all()
    trains(trainer)
    assert all(entry.get("loss", 1.0) > 0 for entry in trainer.state.log_history)  # generated tokens were trained on
    with pytest.raises(ValueError, match="set lmbda=1"):
        trainer_for(tmp_path, tokenizer, student, teacher, rows, lmbda=0.5)
    with pytest.raises(ValueError, match="'ce' term"):
        trainer_for(tmp_path, tokenizer, student, teacher, rows, lmbda=1.0, kd_loss="0.5*ce+0.5*fkl")
    with pytest.raises(ValueError, match="evaluation scores"):
        trainer_for(tmp_path, tokenizer, student, teacher, rows, rows, lmbda=1.0)


def test_messages_beat_a_prompt_column_beside_them(tmp_path, tokenizer, student, teacher):
    """Hub chat sets often keep the raw `prompt` beside `messages`; TRL's collator took that text for the rendered
    prompt and masked the wrong tokens."""
    conversations = make_conversations(8)
    rows = Dataset.from_list([{**c, "prompt": c["messages"][0]["content"]} for c in conversations])
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, rows)
    expected = DataCollatorForChatML(tokenizer=tokenizer)(conversations)
    assert torch.equal(trainer.data_collator(list(rows))["labels"], expected["labels"])


def test_unknown_columns_name_the_accepted_formats(tmp_path, tokenizer, student, teacher):
    rows = Dataset.from_list([{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"found: \['answer', 'question'\].*`prompt` \+ `completion`"):
        trainer_for(tmp_path, tokenizer, student, teacher, rows)


# ---------------------------------------------------------------- rows that are not what they seem


def bad_rows(surrogate: bool = False) -> list[dict]:
    """Four good conversations and, at rows 1 and 3, one ending with the user's turn and one with the user's alone;
    with ``surrogate``, at row 5 one whose text is not UTF-8 (a lone surrogate: Arrow refuses to store it, so it comes
    in a stream built from a generator)."""
    good = make_conversations(4)
    user_last = good[0]["messages"] + [{"role": "user", "content": "count again"}]
    rows = [good[0], {"messages": user_last}, good[1], {"messages": [{"role": "user", "content": "please count"}]}]
    if surrogate:
        rows += [good[2], {"messages": [{"role": "user", "content": "count \ud800"}, good[1]["messages"][-1]]}]
    return [*rows, good[3]] if surrogate else [*rows, good[2], good[3]]


def stream_of(rows: list[dict]) -> IterableDataset:
    return IterableDataset.from_generator(lambda: iter(rows))


def test_invalid_rows_are_listed_with_their_reason(tmp_path, tokenizer, student, teacher):
    with pytest.raises(ValueError) as error:
        trainer_for(tmp_path, tokenizer, student, teacher, Dataset.from_list(bad_rows()))
    message = str(error.value)
    assert "2 invalid rows of 6 checked" in message and "invalid_rows='skip'" in message
    assert "row 1: messages ends with a 'user' turn" in message
    assert "row 3: messages has no assistant turn" in message


def test_invalid_rows_skip_drops_them_and_trains(tmp_path, tokenizer, student, teacher, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(
            tmp_path, tokenizer, student, teacher, Dataset.from_list(bad_rows()), invalid_rows="skip"
        )
    assert "dropping 2 invalid rows" in caplog.text
    assert trainer.train_dataset["messages"] == [bad_rows()[i]["messages"] for i in (0, 2, 4, 5)]
    trains(trainer)


def test_invalid_rows_of_a_stream(tmp_path, tokenizer, student, teacher):
    rows = bad_rows(surrogate=True)
    with pytest.raises(ValueError) as error:
        trainer_for(tmp_path, tokenizer, student, teacher, stream_of(rows))
    assert "3 invalid rows of the first 7 checked" in str(error.value)
    assert "row 5: messages[0]['content'] is not valid UTF-8" in str(error.value)
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, stream_of(rows), invalid_rows="skip")
    assert [row["messages"] for row in trainer.train_dataset] == [rows[i]["messages"] for i in (0, 2, 4, 6)]
    trains(trainer)


@pytest.mark.parametrize("row, reason", [(1, "ends with a 'user' turn"), (3, "no assistant turn"), (5, "UTF-8")])
def test_an_invalid_row_met_while_collating_names_its_reason(tmp_path, tokenizer, student, teacher, row, reason):
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, Dataset.from_list(make_conversations(4)))
    with pytest.raises(ValueError, match=reason):
        trainer.data_collator([bad_rows(surrogate=True)[row]])


def test_invalid_rows_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match="invalid_rows must be 'error' or 'skip'"):
        make_args(tmp_path, invalid_rows="drop")


# ---------------------------------------------------------------- trust_remote_code

CONFIG_CODE = (
    "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n"
)
MODEL_CODE = (
    "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny_custom import TinyCustomConfig\n\n\n"
    "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
)


def remote_code_model(folder, vocab_size: int, **kwargs) -> str:
    """A tiny Llama saved as a model whose config and class come with the checkpoint's own Python code."""
    make_model(vocab_size, **kwargs).save_pretrained(folder)
    (folder / "configuration_tiny_custom.py").write_text(CONFIG_CODE)
    (folder / "modeling_tiny_custom.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny_custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_trust_remote_code_loads_a_custom_code_teacher_and_student(tmp_path, tokenizer, train_dataset):
    student = remote_code_model(tmp_path / "student", len(tokenizer), hidden=32, layers=1, seed=1)
    teacher = remote_code_model(tmp_path / "teacher", len(tokenizer), hidden=64, layers=2, seed=2)
    with pytest.raises(ValueError, match="trust_remote_code"):
        trainer_for(tmp_path, tokenizer, student, teacher, train_dataset)
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, train_dataset, trust_remote_code=True)
    assert type(trainer.teacher_model).__name__ == "TinyCustomForCausalLM"
    assert type(trainer.model).__name__ == "TinyCustomForCausalLM"
    trains(trainer)
