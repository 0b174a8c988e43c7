"""Sentence spans over response tokens, for MGSR's span-level loss (arXiv 2407.10068, Sec. 3.3).

The paper chunks the text with an off-the-shelf tool (it cites Punkt, Kiss & Strunk 2006). Here the
default is pysbd, a rule-based sentence boundary detector that needs no data download; ``"punct"`` is
a plain rule (a sentence ends after ``.``, ``!`` or ``?``, optionally followed by closing quotes or
brackets, and whitespace; a newline also ends one); any callable ``text -> list of sentence start
offsets`` may be passed instead.

Mapping sentences back to tokens does not re-tokenize the decoded text (a re-tokenization need not
reproduce the same tokens, so offset mappings of a fresh encoding are not used): the response is
decoded once, token by token, with the fast tokenizer's streaming decoder (``tokenizers``'
``DecodeStream``, linear in the length), and token i covers the characters it adds. A token that ends
inside a multi-byte character (byte-level BPE) adds nothing; the character goes to the token that
completes it. When no streaming decoder exists (slow tokenizers), or its text differs from the plain
decode, each prefix is decoded instead (quadratic) and token i covers the characters between the
decoded lengths of prefixes i-1 and i (only their common prefix with the full text counts), which
gives the same offsets.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tokenizers.decoders import DecodeStream

from .core import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PUNCT_END = re.compile(r"[.!?]+[\"')\]]*\s+|\n+")

Segmenter = str | Callable[[str], list[int]]


@functools.lru_cache(maxsize=4)
def _pysbd(language: str):
    import pysbd

    return pysbd.Segmenter(language=language, clean=False, char_span=True)


def sentence_starts(text: str, segmenter: Segmenter = "pysbd", language: str = "en") -> list[int]:
    """Character offsets where sentences of ``text`` begin (always starting with 0)."""
    if callable(segmenter):
        starts = list(segmenter(text))
    elif segmenter == "pysbd":
        starts = [span.start for span in _pysbd(language).segment(text)] if text.strip() else []
    elif segmenter == "punct":
        starts = [m.end() for m in _PUNCT_END.finditer(text) if m.end() < len(text)]
    else:
        raise ValueError(f"Unknown segmenter '{segmenter}': use 'pysbd', 'punct' or a callable text -> starts.")
    return sorted({0, *starts})


def _streamed_char_ends(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]] | None:
    """(text, end offsets) from one streaming decode; None when the tokenizer has no streaming decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    stream = DecodeStream(skip_special_tokens=True)
    pieces, ends, length = [], [], 0
    for token in ids:
        piece = stream.step(backend, token) or ""
        pieces.append(piece)
        length += len(piece)
        ends.append(length)
    return "".join(pieces), ends


def _prefix_char_ends(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
    """(text, end offsets) by decoding every prefix: quadratic, for tokenizers without a streaming decoder."""
    prefixes = tokenizer.batch_decode(
        [ids[: i + 1] for i in range(len(ids))], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    text = prefixes[-1] if prefixes else ""
    ends, last = [], 0
    for prefix in prefixes:
        last = max(last, len(os.path.commonprefix([prefix, text])))
        ends.append(last)
    return text, ends


def token_char_ends(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
    """(decoded text, end offset of each token in it); special tokens have zero width."""
    streamed = _streamed_char_ends(ids, tokenizer)
    if streamed is not None:
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if streamed[0] == text:
            return streamed
    return _prefix_char_ends(ids, tokenizer)


def _runs(positions: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for pos in positions:
        if runs and pos == runs[-1][-1] + 1:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    return runs


def _token_sentences(text: str, ends: list[int], starts: list[int]) -> list[int]:
    """Sentence index of each token: the sentence of its first non-space character; a token with none
    (whitespace, special token) joins the previous token's sentence (the next one's at the start)."""
    found: list[int | None] = []
    begin = 0
    for end in ends:
        piece = text[begin:end]
        stripped = len(piece) - len(piece.lstrip())
        found.append(bisect.bisect_right(starts, begin + stripped) - 1 if stripped < len(piece) else None)
        begin = end
    first = next((s for s in found if s is not None), 0)
    out, current = [], first
    for s in found:
        current = s if s is not None else current
        out.append(current)
    return out


def span_ids_for_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    segmenter: Segmenter = "pysbd",
    language: str = "en",
) -> torch.Tensor:
    """Sentence span id of every response token ([B, T] long; -1 where ``labels == -100``).

    ``input_ids`` and ``labels`` are aligned (labels equal input ids on response tokens, TRL's
    convention); shift the result together with the labels. Each run of consecutive response tokens is
    decoded and segmented on its own, and ids are unique per (sequence, span) across the batch.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have one shape.")
    out = torch.full(labels.shape, -1, dtype=torch.long)
    next_id = 0
    for b in range(labels.shape[0]):
        positions = (labels[b] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
        for run in _runs(positions):
            ids = input_ids[b, run].tolist()
            text, ends = token_char_ends(ids, tokenizer)
            starts = sentence_starts(text, segmenter, language)
            sentences = _token_sentences(text, ends, starts)
            out[b, run] = torch.tensor(sentences, dtype=torch.long) + next_id
            next_id += len(starts)
    return out.to(labels.device)


__all__ = ["sentence_starts", "span_ids_for_batch", "token_char_ends"]
