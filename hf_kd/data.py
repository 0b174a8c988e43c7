"""Chat ``messages`` from common instruction-data layouts, and the conversations bundled with hf_kd.

``DistillationTrainer`` reads TRL's formats as they are (``messages``, prompt/completion, ``text``, prompt-only; see
``hf_kd.formats``). :func:`map_to_messages` converts the other usual Hub layouts (Dolly, Alpaca) to a ``messages``
column (``{"role", "content"}`` turns ending with the assistant's answer); :func:`load_bundled_dataset`
returns the small teacher-generated corpus shipped in ``hf_kd/data/`` (built by ``scripts/make_data.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_SPLITS = ("train", "heldout", "heldout_general")


def _user_assistant(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _with_context(instruction: str, context: str | None) -> str:
    """The instruction, followed by its context/input block when there is one (Dolly and Alpaca style)."""
    context = (context or "").strip()
    return f"{instruction.strip()}\n\n{context}" if context else instruction.strip()


def _as_turns(value: Any, role: str) -> list[dict[str, str]]:
    """A prompt/completion field: plain text (one turn of ``role``) or already a list of turns."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [dict(turn) for turn in value]


def _from_messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = [dict(turn) for turn in example["messages"]]
    if not messages or any("role" not in turn or "content" not in turn for turn in messages):
        raise ValueError(f"`messages` must be a non-empty list of {{'role', 'content'}} turns, got {messages!r}")
    return messages


@dataclass(frozen=True)
class _Layout:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], list[dict[str, str]]]

    def describe(self) -> str:
        optional = f" (+{', '.join(self.optional)})" if self.optional else ""
        return f"{self.name}: {', '.join(self.required)}{optional}"


LAYOUTS: tuple[_Layout, ...] = (
    _Layout("chat", ("messages",), (), _from_messages),
    _Layout(
        "dolly",
        ("instruction", "response"),
        ("context",),
        lambda ex: _user_assistant(_with_context(ex["instruction"], ex.get("context")), ex["response"]),
    ),
    _Layout(
        "alpaca",
        ("instruction", "output"),
        ("input",),
        lambda ex: _user_assistant(_with_context(ex["instruction"], ex.get("input")), ex["output"]),
    ),
    _Layout(
        "prompt-completion",
        ("prompt", "completion"),
        (),
        lambda ex: _as_turns(ex["prompt"], "user") + _as_turns(ex["completion"], "assistant"),
    ),
)
"""Known layouts, tried in this order; the first whose required columns are all present is used."""


def detect_layout(columns: list[str] | tuple[str, ...] | set[str]) -> _Layout:
    """The layout of data with these column names, or a ValueError naming the columns found and expected."""
    present = set(columns)
    for layout in LAYOUTS:
        if set(layout.required) <= present:
            return layout
    expected = "; ".join(layout.describe() for layout in LAYOUTS)
    raise ValueError(
        f"Cannot build chat messages from columns {sorted(present)}. Expected one of the layouts [{expected}]. "
        "Rename your columns to one of these (e.g. `dataset.rename_column(...)`)."
    )


def to_messages(example: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
    """``{"messages": [...]}`` for one example in any layout of :data:`LAYOUTS`."""
    return {"messages": detect_layout(list(example.keys())).convert(example)}


def map_to_messages(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset with a ``messages`` column; the source layout's columns are removed, others are kept."""
    layout = detect_layout(dataset.column_names)
    if layout.name == "chat":
        return dataset
    consumed = [c for c in layout.required + layout.optional if c in dataset.column_names]
    return dataset.map(lambda ex: {"messages": layout.convert(ex)}, remove_columns=consumed)


def _bundled_path(split: str) -> Path:
    """The file of bundled split ``split``; an unknown split or a missing file is an error that says what to do."""
    if split not in BUNDLED_SPLITS:
        raise ValueError(f"Unknown split {split!r}; the bundled data has splits {BUNDLED_SPLITS}")
    path = BUNDLED_DATA_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/make_data.py`")
    return path


def bundled_split_digest(split: str) -> str:
    """The SHA-256 (hex) of a bundled split's file: what caches and results made from it record, so that rebuilt data
    is never mixed with what was made from the old."""
    return hashlib.sha256(_bundled_path(split).read_bytes()).hexdigest()


def load_bundled_dataset(split: str = "train") -> datasets.Dataset:
    """The bundled conversations (``messages`` + ``source`` columns) of split ``"train"``, ``"heldout"`` or
    ``"heldout_general"``.

    ``train`` and ``heldout`` draw prompts from HumanEval, WritingBench, Shakespeare's plays and instruction
    templates (a hash split); ``train`` adds everyday assistant templates. ``heldout_general`` holds assistant
    questions from sources training never uses (FreshQA, OpenAI evals, prompts written for it). Answers were generated
    greedily by SmolLM2-135M-Instruct (sequence-level distillation data). No prompt is in two splits.
    """
    with _bundled_path(split).open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.Dataset.from_list(rows)


_WORD = re.compile(r"[a-z0-9]+")


def normalized_prompt(text: str) -> str:
    """A prompt's lower-cased alphanumeric words joined by spaces: the same text up to case and punctuation."""
    return " ".join(_WORD.findall(text.lower()))


def near_duplicate_prompts(prompts: list[str], others: list[str], threshold: float = 0.8) -> list[tuple[str, str]]:
    """Pairs (prompt, other) that are the same text up to case and punctuation (:func:`normalized_prompt`), or whose
    word sets overlap by at least ``threshold`` (Jaccard: shared words over all words). Keeps evaluation prompts
    out of training data."""
    normalized = [(other, normalized_prompt(other)) for other in others]
    other_words = [(other, text, frozenset(text.split())) for other, text in normalized]
    pairs = []
    for prompt in prompts:
        text = normalized_prompt(prompt)
        words = frozenset(text.split())
        for other, other_text, owords in other_words:
            union = len(words | owords)
            if text == other_text or (union and len(words & owords) / union >= threshold):
                pairs.append((prompt, other))
    return pairs


def with_token_lengths(dataset: Any, tokenizer: Any, column: str = "length") -> Any:
    """``dataset`` with a ``column`` of each conversation's token count under ``tokenizer``'s chat template, the
    lengths transformers' ``group_by_length`` sampler reads (it can only infer them from an ``input_ids`` column).
    Datasets that already have the column, or no ``messages``, are returned as they are."""
    columns = getattr(dataset, "column_names", None) or []
    if not isinstance(dataset, datasets.Dataset) or column in columns or "messages" not in columns:
        return dataset

    def count(example: Mapping[str, Any]) -> dict[str, int]:
        text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
        return {column: len(tokenizer(text, add_special_tokens=False)["input_ids"])}

    return dataset.map(count, desc="Counting tokens for group_by_length")
