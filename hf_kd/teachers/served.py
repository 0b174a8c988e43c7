"""A teacher served by vLLM's OpenAI-compatible server: top-k prompt log-probabilities over HTTP.

``ServedTeacher(url, top_k)`` asks the server for the teacher's top-k next-token log-probabilities on the exact
token ids the student trains on (one ``POST /v1/completions`` per batch, ``prompt_logprobs=top_k``) and returns
them in the teacher cache's layout (``hf_kd.teacher_cache.encoding``): ids, log-probabilities and the log of the
remaining mass per position, aligned with the student's logits, so that ``TopKReconstruction`` rebuilds the
teacher row exactly as it does for a cache. ``check`` verifies before training that the server serves the named
model with the student's tokenizer. A short or malformed answer is an error naming the server and what was wrong;
connection errors and 5xx answers are retried with exponential backoff. Only the standard library talks HTTP.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..http_json import JsonServerClient
from ..teacher_cache.encoding import pack_rows

PROBE_TEXT = (
    "Knowledge distillation, step 1234567: the teacher's top-k (k = 64) log-probabilities.\n"
    "\tdef f(x):\n        return x ** 2  # naïve café, Straße, 東京, Привет, مرحبا, 🙂\n\n"
)
"""Tokenized by the server and by the student's tokenizer: digits, code, whitespace runs, accents, several scripts."""

SUM_TOLERANCE = 1e-4
"""How far above 0 the log of the summed top-k probabilities may be (float32 rounding) before the answer is refused."""
MIN_LOG_TAIL = math.log(torch.finfo(torch.float32).tiny)
"""The log tail mass when the top-k probabilities sum to 1 within rounding: the smallest normal float32."""


class ServedTeacherError(RuntimeError):
    """The teacher server could not be reached, refused a request, or answered something unusable."""


@dataclass(frozen=True)
class ServedScores:
    """The teacher's top-k for a batch [B, L]: row t of each tensor is its distribution for token t + 1.

    ``ids`` [B, L - 1, k] (descending log-probability), ``logprobs`` [B, L - 1, k] float32, ``log_tail``
    [B, L - 1] float32 (log of the mass outside the top-k), ``scored`` [B, L - 1] bool: rows that hold a
    distribution (padding rows and the row before a sequence's first token are zero, as in a teacher cache).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    scored: torch.Tensor

    def packed_rows(self) -> torch.Tensor:
        """[B, L - 1, 2k + 1] rows in the teacher cache's layout, for ``TopKReconstruction``."""
        return pack_rows(self.ids, self.logprobs, self.log_tail)


class ServedTeacher(JsonServerClient):
    """Client of a vLLM OpenAI-compatible server that scores token ids with the teacher it serves.

    ``url`` is the server's address with or without the ``/v1`` suffix (``http://127.0.0.1:8000/v1``). ``top_k``
    must not exceed the server's ``--max-logprobs``. Each request waits ``timeout`` seconds; connection errors,
    timeouts and 5xx answers are retried ``retries`` times, after 0.5, 1, 2, ... s (``backoff`` doubles).
    ``model`` is the served model name sent with each request (None: the only model the server serves).
    ``vocab_size`` (optional) bounds the token ids the server may return.
    """

    server_name = "teacher server"
    error = ServedTeacherError

    def __init__(
        self,
        url: str,
        top_k: int = 64,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        model: str | None = None,
        vocab_size: int | None = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        super().__init__(url, timeout=timeout, retries=retries, backoff=backoff)
        self.top_k = top_k
        self.model = model
        self.vocab_size = vocab_size
        self.tokens_scored = 0  # tokens of the sequences sent to score (with bytes_received: traffic per token)

    def _served_model(self) -> dict[str, Any]:
        """The entry of ``GET /v1/models`` for ``self.model`` (setting it when None and only one model is served)."""
        answer = self.request("/v1/models")
        models = answer.get("data") if isinstance(answer, dict) else None
        if not models:
            raise ServedTeacherError(f"The teacher server at {self.url} lists no model at /v1/models: {answer!r:.300}")
        if self.model is None:
            if len(models) != 1:
                names = [m.get("id") for m in models]
                raise ServedTeacherError(f"The teacher server at {self.url} serves {names}: pass model=<one of them>.")
            self.model = models[0]["id"]
        for entry in models:
            if entry.get("id") == self.model:
                return entry
        names = [m.get("id") for m in models]
        raise ServedTeacherError(f"The teacher server at {self.url} does not serve {self.model!r}, only {names}.")

    # ------------------------------------------------------------------ checks
    def check(self, tokenizer: Any, model_name: str | None = None) -> None:
        """Refuse a server that serves another model than ``model_name`` (a served name or the path it was started
        with; None: any), tokenizes differently from ``tokenizer`` (the student's), or cannot give ``top_k``."""
        entry = self._served_model()
        if model_name is not None and not _same_model(model_name, entry):
            raise ServedTeacherError(
                f"The teacher server at {self.url} serves {entry.get('id')!r} (from {entry.get('root')!r}), not "
                f"{model_name!r}: start it with --model {model_name}, or name the model it serves."
            )
        probe = PROBE_TEXT + " ".join(tokenizer.all_special_tokens)
        served = self.request("/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False})
        served_ids = served.get("tokens") if isinstance(served, dict) else None
        student_ids = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        if served_ids != student_ids:
            raise ServedTeacherError(
                f"The teacher server at {self.url} ({self.model!r}) tokenizes a probe text differently from the "
                f"student's tokenizer ({_first_difference(served_ids, student_ids)}): a served teacher must share the "
                "student's vocabulary. Serve a teacher with the student's tokenizer, or distill across vocabularies "
                "from a live teacher with bridge='dskd'."
            )
        self.score([student_ids])  # top_k within the server's --max-logprobs, answers well formed

    # ------------------------------------------------------------------ scoring
    def score(
        self, input_ids: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None = None
    ) -> ServedScores:
        """The teacher's top-k for each sequence of a batch, in one request.

        ``input_ids`` is a list of id lists (rows of ``ServedScores`` follow each list from its start) or a padded
        [B, L] tensor with ``attention_mask`` (left or right padding; each row's tokens must be contiguous).
        """
        sequences, offsets, length = _sequences(input_ids, attention_mask)
        if self.model is None:
            self._served_model()
        self.tokens_scored += sum(len(sequence) for sequence in sequences)
        answer = self.request(
            "/v1/completions",
            {
                "model": self.model,
                "prompt": sequences,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": self.top_k,
                "add_special_tokens": False,
            },
        )
        k, rows = self.top_k, max(length - 1, 0)
        ids = np.zeros((len(sequences), rows, k), dtype=np.int64)
        logprobs = np.zeros((len(sequences), rows, k), dtype=np.float64)
        scored = np.zeros((len(sequences), rows), dtype=bool)
        for j, positions in enumerate(self._prompt_logprobs(answer, sequences)):
            for t, entries in enumerate(positions[1:], start=1):
                row = offsets[j] + t - 1
                ids[j, row], logprobs[j, row] = self._top_k(entries, f"sequence {j}, position {t}")
                scored[j, row] = True
        log_tail = self._log_tail(logprobs, scored)
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise ServedTeacherError(
                f"The teacher server at {self.url} returned token id {int(ids.max())}, outside the student's "
                f"vocabulary of {self.vocab_size}: the server's model has a larger vocabulary."
            )
        return ServedScores(
            torch.from_numpy(ids),
            torch.from_numpy(logprobs).float(),
            torch.from_numpy(log_tail).float(),
            torch.from_numpy(scored),
        )

    def _prompt_logprobs(self, answer: Any, sequences: list[list[int]]) -> list[list]:
        """The ``prompt_logprobs`` list of each sequence, in request order, checked for length."""
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            count = len(choices) if isinstance(choices, list) else "no"
            raise ServedTeacherError(
                f"The teacher server at {self.url} answered {count} choices for {len(sequences)} sequences."
            )
        result = []
        for j, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0))):
            positions = choice.get("prompt_logprobs")
            if not isinstance(positions, list) or len(positions) != len(sequences[j]):
                count = len(positions) if isinstance(positions, list) else "no"
                raise ServedTeacherError(
                    f"The teacher server at {self.url} returned {count} prompt log-prob positions for sequence {j} "
                    f"of {len(sequences[j])} tokens (does it support prompt_logprobs up to {self.top_k}?)."
                )
            result.append(positions)
        return result

    def _top_k(self, entries: Any, where: str) -> tuple[list[int], list[float]]:
        """The k most likely (id, log-prob) pairs of one position, most likely first.

        vLLM adds the actual prompt token when it is not among the top-k (rank > k): at most k + 1 entries.
        """
        k = self.top_k
        if not isinstance(entries, dict) or not k <= len(entries) <= k + 1:
            count = len(entries) if isinstance(entries, dict) else type(entries).__name__
            raise ServedTeacherError(
                f"The teacher server at {self.url} returned {count} entries at {where}, expected top-{k} "
                f"(plus the prompt token when it is outside them)."
            )
        try:
            pairs = [(int(token), float(value["logprob"]), int(value["rank"])) for token, value in entries.items()]
        except (KeyError, TypeError, ValueError):
            raise ServedTeacherError(
                f"The teacher server at {self.url} returned a malformed entry at {where}: {entries!r:.300}"
            ) from None
        bad = [p for p in pairs if not math.isfinite(p[1]) or p[1] > SUM_TOLERANCE or p[0] < 0]
        if bad:
            raise ServedTeacherError(f"The teacher server at {self.url} returned invalid entries {bad} at {where}.")
        pairs = sorted((p for p in pairs if p[2] <= k), key=lambda p: -p[1])[:k]
        if len(pairs) < k:
            raise ServedTeacherError(
                f"The teacher server at {self.url} returned only {len(pairs)} entries of rank <= {k} at {where}."
            )
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _log_tail(self, logprobs: np.ndarray, scored: np.ndarray) -> np.ndarray:
        """log(1 - sum of the top-k probabilities) per row, floored at the smallest normal float32."""
        top = np.logaddexp.reduce(logprobs, axis=-1) if logprobs.size else np.zeros(scored.shape)
        over = scored & (top > SUM_TOLERANCE)
        if over.any():
            j, row = np.argwhere(over)[0]
            raise ServedTeacherError(
                f"The teacher server at {self.url} returned top-{self.top_k} probabilities summing to "
                f"{math.exp(top[j, row]):.6f} > 1 at sequence {j}, row {row}."
            )
        with np.errstate(divide="ignore"):
            log_tail = np.maximum(np.log(np.maximum(-np.expm1(np.minimum(top, 0.0)), 0.0)), MIN_LOG_TAIL)
        return np.where(scored, log_tail, 0.0)


def _sequences(
    input_ids: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None
) -> tuple[list[list[int]], list[int], int]:
    """(the id lists to send, the padded position of each list's first token, the padded length)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}.")
        sequences, offsets = [], []
        for j, (row, keep) in enumerate(zip(input_ids.tolist(), mask.bool().tolist())):
            where = [i for i, on in enumerate(keep) if on]
            if where and where[-1] - where[0] + 1 != len(where):
                raise ValueError(f"attention_mask row {j} has gaps: pad on one side only.")
            sequences.append([row[i] for i in where])
            offsets.append(where[0] if where else 0)
        length = input_ids.shape[1]
    else:
        sequences, offsets = [list(map(int, s)) for s in input_ids], [0] * len(input_ids)
        length = max((len(s) for s in sequences), default=0)
    if not sequences or any(not s for s in sequences):
        raise ValueError("Every sequence to score needs at least one token (and the batch at least one sequence).")
    return sequences, offsets, length


def _same_model(name: str, entry: dict[str, Any]) -> bool:
    """Whether ``name`` is the served model: its served name, or the path it was loaded from."""
    served = [str(entry.get(key)) for key in ("id", "root") if entry.get(key)]
    return name in served or any(os.path.realpath(name) == os.path.realpath(s) for s in served if os.path.exists(s))


def _first_difference(a: list[int] | None, b: list[int]) -> str:
    if a is None:
        return "the server returned no tokens"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} tokens, first difference at token {i}: server {a[i : i + 4]}, student {b[i : i + 4]}"
