"""A served teacher's scores requested when a batch is collated, so the server scores the next batch while the student
trains on this one.

The Trainer's data loader collates a batch ahead of the one it yields (and all the micro-batches of an optimizer
step at once), so a request sent from the collator runs on the server during the current step's forward and
backward. The scores travel in the batch with the token ids they are for; the source uses them only for exactly
those ids (a generated batch, or a router's share of the rows, is scored when it is needed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import get_worker_info

PREFETCHED = "prefetched_teacher_scores"  # batch key: a PrefetchedScores


class PrefetchedScores:
    """The scores of ``input_ids``, pending (a Future) or done (a ``ServedScores``, as a data-loader worker sends
    them); ``rows_for(ids)`` gives them for those ids, else None."""

    def __init__(self, input_ids: torch.Tensor, scores: Future | Any):
        self.input_ids, self.scores = input_ids, scores

    def rows_for(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The packed top-k rows when ``input_ids`` are the ids scored (waiting for the answer), else None."""
        if input_ids.shape != self.input_ids.shape or not torch.equal(input_ids.cpu(), self.input_ids):
            return None
        scores = self.scores.result() if isinstance(self.scores, Future) else self.scores
        return scores.packed_rows()


class PrefetchingCollator:
    """``collator``'s batch plus its scores requested from ``score(input_ids, attention_mask)`` in a background thread
    (one per process; in a data-loader worker process the request runs in the worker, which is already apart from
    training)."""

    def __init__(self, collator: Callable, score: Callable):
        self.collator, self.score = collator, score
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collator(examples)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        batch[PREFETCHED] = PrefetchedScores(ids, self._submit(ids, mask))
        return batch

    def _submit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Future | Any:
        if get_worker_info() is not None:  # the batch is pickled to the main process: no Future, the scores
            return self.score(input_ids, attention_mask)
        if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive a fork
            self._pool, self._pool_pid = ThreadPoolExecutor(1, thread_name_prefix="teacher-prefetch"), os.getpid()
        return self._pool.submit(self.score, input_ids, attention_mask)

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawned data-loader workers (the pool stays behind)
        return {**self.__dict__, "_pool": None, "_pool_pid": None}
