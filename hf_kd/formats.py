"""TRL's dataset formats, read by one row normaliser in front of the chat collators, and the rows that cannot train.

A row may be conversational ``messages``, ``prompt``/``completion`` (two strings, or two message lists), plain
``text`` (SFT's language modelling; the column named by ``dataset_text_field``), a ``prompt`` alone (for fully
on-policy runs, ``lmbda=1``), or pre-tokenized ``input_ids``. :func:`normalise_row` turns each into what TRL's
``DataCollatorForChatML`` (and hf_kd's dual-tokenization collator around it) reads, with the labels TRL's
trainers give it:

* ``messages`` and message-list prompt/completion go through the chat template; the labels are the last
  (the completion's) assistant message.
* string prompt/completion is tokenized without a chat template, as TRL's SFT does (the tokenizer's own special
  tokens, EOS appended to the completion when missing); the labels are the completion's tokens.
* ``text`` is trained on every token (EOS appended when missing); it has no prompt to generate from.
* a ``prompt`` alone has no labels: the student's generations are the only targets.

:func:`row_problem` names what makes a row untrainable (a conversation that does not end with the assistant's
answer, text that is not valid UTF-8, a malformed turn); :func:`screen_rows` lists or drops those rows before
training (``DistillationConfig.invalid_rows``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import datasets
from trl.data_utils import common_prefix_length

logger = logging.getLogger(__name__)

MESSAGES, PROMPT_COMPLETION, PROMPT_ONLY, TEXT, TOKENIZED = (
    "messages",
    "prompt-completion",
    "prompt-only",
    "text",
    "tokenized",
)
FORMATS_HELP = (
    "`messages` (chat turns ending with the assistant's answer), `prompt` + `completion` (strings or message lists), "
    "`text` (the column named by `dataset_text_field`, trained on every token), `prompt` alone (fully on-policy "
    "runs, lmbda=1) or pre-tokenized `input_ids`"
)
STREAM_PEEK = 64
"""Rows of a stream (IterableDataset) checked before training; later rows are checked as they are collated."""
LISTED_ROWS = 5
"""Invalid rows named in an error message."""


def data_format(row: Mapping[str, Any], text_field: str = "text") -> str | None:
    """The format of a row, from its columns (``None`` for a row of no known format)."""
    if "input_ids" in row:
        return TOKENIZED
    if "messages" in row:
        return MESSAGES
    if "prompt" in row:
        return PROMPT_COMPLETION if "completion" in row else PROMPT_ONLY
    return TEXT if text_field in row else None


def is_conversational(row: Mapping[str, Any]) -> bool:
    """Whether a row's prompt (or messages) is a list of chat turns rather than plain text."""
    return data_format(row) == MESSAGES or isinstance(row.get("prompt"), list)


def uses_chat_template(dataset: Any) -> bool:
    """Whether a dataset (or any part of a dict of them) is conversational, read from its first row."""
    if isinstance(dataset, dict):
        return any(uses_chat_template(part) for part in dataset.values())
    rows = first_rows(dataset, 1) if dataset is not None else []
    return bool(rows) and data_format(rows[0]) != TOKENIZED and is_conversational(rows[0])


def _text_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} is {type(value).__name__}, not text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"{what} is not valid UTF-8 (character {error.start} is {value[error.start]!r}, a lone surrogate)"
    return None


def _turns_problem(turns: Any, what: str) -> str | None:
    if not isinstance(turns, list) or not turns:
        return f"{what} is not a non-empty list of {{'role', 'content'}} turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) or "content" not in turn:
            return f"{what}[{i}] is not a {{'role', 'content'}} turn"
        problem = _text_problem(turn["content"], f"{what}[{i}]['content']")
        if problem:
            return problem
    return None


def _answer_problem(turns: list, what: str) -> str | None:
    """A conversation must end with the assistant's answer, the text that is distilled."""
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        return f"{what} has no assistant turn (only {sorted(set(roles))}): there is no answer to distill"
    if roles[-1] != "assistant":
        return (
            f"{what} ends with a '{roles[-1]}' turn, not the assistant's answer: training would distill that "
            "text as if the assistant had written it"
        )
    return None


def row_problem(row: Mapping[str, Any], text_field: str = "text") -> str | None:
    """Why a row cannot be trained on, or None when it can (pre-tokenized rows are not inspected)."""
    fmt = data_format(row, text_field)
    if fmt is None:
        return f"no column of a known format (found {sorted(row)}); expected {FORMATS_HELP}"
    if fmt == MESSAGES:
        return _turns_problem(row["messages"], "messages") or _answer_problem(row["messages"], "messages")
    if fmt == TEXT:
        problem = _text_problem(row[text_field], text_field)
        return problem or (f"{text_field} is empty" if not row[text_field] else None)
    prompt = row["prompt"]
    if fmt == PROMPT_ONLY:
        return _turns_problem(prompt, "prompt") if isinstance(prompt, list) else _text_problem(prompt, "prompt")
    completion = row["completion"]
    if isinstance(prompt, list) != isinstance(completion, list):
        return "prompt and completion must both be text or both be message lists"
    if isinstance(prompt, str):
        return _text_problem(prompt, "prompt") or _text_problem(completion, "completion")
    problem = _turns_problem(prompt, "prompt") or _turns_problem(completion, "completion")
    if problem:
        return problem
    if [turn["role"] for turn in completion] != ["assistant"]:
        return (
            f"completion has the turns {[turn['role'] for turn in completion]}, not one assistant message: hf_kd "
            "distills one answer per row (move earlier turns into the prompt)"
        )
    return None


def _tokenized(ids: list[int], prompt_length: int, prompt: str, max_length: int | None) -> dict[str, Any]:
    """A pre-tokenized row as the chat collator reads it: the completion marked, the oldest tokens dropped past
    ``max_length`` (as the collator does for chat rows). ``prompt`` is only there because the collator reads it."""
    mask = [0] * prompt_length + [1] * (len(ids) - prompt_length)
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[-max_length:], mask[-max_length:]
    return {"input_ids": ids, "completion_mask": mask, "prompt": prompt}


def _with_eos(text: str, tokenizer: Any) -> str:
    eos = tokenizer.eos_token
    return text if not eos or text.endswith(eos) else text + eos


def normalise_row(row: Mapping[str, Any], tokenizer: Any, max_length: int | None, text_field: str = "text") -> dict:
    """The row in the form the chat collator reads (see the module docstring); a ValueError names an invalid row."""
    problem = row_problem(row, text_field)
    if problem:
        raise ValueError(
            f"A row cannot be trained on: {problem}. Fix or drop it, or set DistillationConfig(invalid_rows='skip') "
            "to drop such rows (map-style datasets are screened before training)."
        )
    fmt = data_format(row, text_field)
    if fmt == TOKENIZED:
        return dict(row)
    if fmt == MESSAGES:
        return {"messages": row["messages"]}
    if fmt == TEXT:
        ids = tokenizer(_with_eos(row[text_field], tokenizer))["input_ids"]
        # every token is a label; the first has no context to be predicted from, so it serves as the prompt
        return _tokenized(ids, 1, "", max_length)
    prompt = row["prompt"]
    if fmt == PROMPT_ONLY:
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        return _tokenized(ids, len(ids), "", max_length)
    if isinstance(prompt, list):
        return {"messages": [*prompt, *row["completion"]]}
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + _with_eos(row["completion"], tokenizer))["input_ids"]
    return _tokenized(ids, common_prefix_length(prompt_ids, ids), prompt, max_length)


class FormatCollator:
    """Normalises each row (:func:`normalise_row`), then collates with ``collator`` (TRL's chat collator or
    hf_kd's dual-tokenization one), whose ``max_length`` it truncates pre-tokenized rows to."""

    def __init__(self, collator: Any, tokenizer: Any, text_field: str = "text"):
        self.collator = collator
        self.tokenizer = tokenizer
        self.text_field = text_field

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        max_length = self.collator.max_length
        return self.collator([normalise_row(ex, self.tokenizer, max_length, self.text_field) for ex in examples])


def is_stream(dataset: Any) -> bool:
    """A dataset without a length (an IterableDataset or another iterable): checked on its first rows only."""
    return not hasattr(dataset, "__len__")


def first_rows(dataset: Any, count: int = STREAM_PEEK) -> list[Mapping[str, Any]]:
    """The first ``count`` rows of a map-style dataset or a stream (a stream is read from its start)."""
    if is_stream(dataset):
        return list(itertools.islice(iter(dataset), count))
    return [dataset[i] for i in range(min(count, len(dataset)))]


def screen_rows(dataset: Any, what: str, text_field: str = "text", invalid_rows: str = "error") -> Any:
    """``dataset`` after checking its rows with :func:`row_problem`: every row of a map-style dataset, the first
    :data:`STREAM_PEEK` of a stream. With ``invalid_rows="error"`` invalid rows are an error naming the first few
    and why; with ``"skip"`` they are dropped (and counted in a warning). A dict is screened part by part;
    pre-tokenized data (e.g. a teacher cache) is not inspected."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {
            name: screen_rows(part, f"{what}['{name}']", text_field, invalid_rows) for name, part in dataset.items()
        }
    stream = is_stream(dataset)
    rows = first_rows(dataset) if stream else dataset
    if not rows or data_format(rows[0], text_field) == TOKENIZED:
        return dataset
    if isinstance(rows, datasets.Dataset):  # read only the columns the check reads
        rows = rows.select_columns(
            [c for c in ("messages", "prompt", "completion", text_field) if c in rows.column_names]
        )
    problems = [(i, p) for i, row in enumerate(rows) if (p := row_problem(row, text_field)) is not None]
    if stream:
        logger.warning(
            f"{what} is a stream: only its first {len(rows)} rows were checked before training; a later invalid "
            f"row is {'dropped' if invalid_rows == 'skip' else 'an error when it is collated'}."
        )
    if not problems:
        return dataset
    listed = "; ".join(f"row {i}: {p}" for i, p in problems[:LISTED_ROWS])
    more = f" (and {len(problems) - LISTED_ROWS} more)" if len(problems) > LISTED_ROWS else ""
    checked = f"the first {len(rows)}" if stream else f"{len(rows)}"
    if invalid_rows != "skip":
        raise ValueError(
            f"{what} has {len(problems)} invalid rows of {checked} checked: {listed}{more}. Fix or remove them, or "
            "set DistillationConfig(invalid_rows='skip') to train without them."
        )
    logger.warning(f"{what}: dropping {len(problems)} invalid rows of {checked} checked: {listed}{more}.")
    if stream:
        if not isinstance(dataset, datasets.IterableDataset):
            raise ValueError(
                f"invalid_rows='skip' drops rows of a stream with datasets.IterableDataset.filter; {what} "
                f"is a {type(dataset).__name__}: filter it yourself, or pass a datasets.IterableDataset."
            )
        return dataset.filter(lambda row: row_problem(row, text_field) is None)
    bad = {i for i, _ in problems}
    kept = [i for i in range(len(dataset)) if i not in bad]
    if not kept:
        raise ValueError(f"{what}: every row is invalid ({listed}{more}); nothing is left to train on.")
    return dataset.select(kept) if isinstance(dataset, datasets.Dataset) else [dataset[i] for i in kept]
