"""Several teachers at once: each row of the data distilled from the teacher its routing column names.

``teacher_model={"code": ..., "chat": ...}`` (each a model, a path/id or a vLLM server's URL) with a dataset column
(``DistillationConfig.teacher_column``) naming one of the keys per row. The router is a teacher source like any
other: its collator carries each row's teacher as ``teacher_index``, and its loss runs each teacher's source on its
rows. Every part is divided by the whole batch's normaliser (the Trainer's ``num_items_in_batch`` and position
counts), so the sum over teachers is the loss of the batch as one teacher would give it: gradient accumulation and
rank invariance hold as for one teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..formats import first_rows, is_stream
from ..losses import IGNORE_INDEX, DistillationLoss, TokenLoss
from .base import POSITION_COUNTS, TeacherSource, position_counts

TEACHER_INDEX = "teacher_index"  # batch key: [B] position of each row's teacher in the router's names


class RoutingCollator:
    """The inner collator's batch plus ``teacher_index``, from each row's ``column`` (unknown names refused)."""

    def __init__(self, collator: Callable, column: str, names: list[str]):
        self.collator, self.column, self.names = collator, column, names

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        index = [self.names.index(name) for name in (_teacher_of(ex, self.column, self.names) for ex in examples)]
        batch = self.collator([{k: v for k, v in ex.items() if k != self.column} for ex in examples])
        batch[TEACHER_INDEX] = torch.tensor(index, dtype=torch.long)
        return batch


def _teacher_of(row: Mapping[str, Any], column: str, names: list[str]) -> str:
    """The teacher ``row`` names in ``column``; a ValueError naming the row's value and the known teachers."""
    name = row.get(column)
    if name not in names:
        found = f"names {name!r}" if column in row else "has no such column"
        raise ValueError(
            f"A row's teacher column '{column}' {found}; the teachers are {names}. Give every row one of them (or "
            "name the routing column with teacher_column=...)."
        )
    return name


def rows_of(inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The batch's rows ``index``: every per-row tensor sliced, everything else (e.g. position counts) kept."""
    size = len(inputs["input_ids"])
    return {
        key: value[index] if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == size else value
        for key, value in inputs.items()
    }


class TeacherRouter(TeacherSource):
    """Teacher sources by name, each fed the rows whose ``column`` names it (see the module docstring).

    It feeds the loss terms every teacher feeds, scores generated sequences (on-policy) when every teacher does, and
    refuses what needs one teacher for a whole sequence: seq_kd (who would generate?), SCRG's corrections and the
    bridges. Logs per teacher ``loss/<term>/<teacher>`` (its part of the batch's term) and ``teacher_tokens/<teacher>``
    (its share of the batch's response tokens).
    """

    generates = False

    def __init__(self, sources: dict[str, TeacherSource], column: str):
        if not sources:
            raise ValueError("teacher_model is an empty dict: name at least one teacher, e.g. {'chat': model}.")
        self.sources, self.column, self.names = sources, column, list(sources)
        self.description = f"the teachers {self.names} routed by the column '{column}'"
        self.refusal = f"With several teachers ({', '.join(self.names)}), each row has its own teacher, but {{needs}}."
        self.scores_generated = all(source.scores_generated for source in sources.values())
        self.teacher_name = ", ".join(f"{name}: {s.teacher_name or 'unknown'}" for name, s in sources.items())
        self._token_shares: dict[str, float] = {}  # of the batch ``loss`` last saw, for ``batch_metrics``

    def check_args(self, args: Any) -> None:
        needs = []
        if args.seq_kd:
            needs.append("seq_kd generates each sequence with one teacher; set seq_kd=False")
        if args.scrg_corrections > 0:
            needs.append(f"SCRG (scrg_corrections={args.scrg_corrections}) corrects with one teacher; set it to 0")
        if args.bridge is not None:
            needs.append(f"the {args.bridge} bridge is built for one teacher; set bridge=None")
        if needs:
            raise ValueError(self.refusal.format(needs="; ".join(needs)))
        for source in self.sources.values():
            source.check_args(args)

    def check_dataset(self, dataset: Any, what: str) -> None:
        """Refuse, before training, a dataset whose rows name no teacher or an unknown one: every row of a map-style
        dataset (its routing column only), the first rows of a stream (later rows are checked as they are
        collated). A dict of datasets is checked part by part; None passes."""
        if dataset is None:
            return
        if isinstance(dataset, dict):
            for name, part in dataset.items():
                self.check_dataset(part, f"{what}['{name}']")
            return
        columns = getattr(dataset, "column_names", None)
        if columns is not None and self.column not in columns:
            raise ValueError(
                f"{what} has no column '{self.column}' naming each row's teacher (one of {self.names}); its columns "
                f"are {columns}. Add it, or name the routing column with teacher_column=..."
            )
        values = [row.get(self.column) for row in first_rows(dataset)] if is_stream(dataset) else dataset[self.column]
        unknown = [(i, v) for i, v in enumerate(values) if v not in self.names]
        if unknown:
            listed = ", ".join(f"row {i}: {v!r}" for i, v in unknown[:5])
            raise ValueError(
                f"{what} has {len(unknown)} rows whose '{self.column}' names no teacher ({listed}); the teachers "
                f"are {self.names}. Fix the column or add those teachers to teacher_model."
            )

    def check_terms(self, terms: list[TokenLoss]) -> None:
        for source in self.sources.values():
            source.check_terms(terms)

    def collator(self, tokenizer: Any, args: Any) -> Callable:
        kinds = {type(source).chat_collator for source in self.sources.values()}
        if len(kinds) > 1:  # a source that needs more in a batch than TRL's chat rows
            raise ValueError(f"The teachers {self.names} need different batches; route teachers of one kind.")
        first = next(iter(self.sources.values()))  # its chat collator, without a served teacher's prefetching
        return RoutingCollator(TeacherSource.collator(first, tokenizer, args), self.column, self.names)

    def prepare(self, trainer: Any) -> None:
        for source in self.sources.values():
            source.prepare(trainer)
        self.tokenizer, self.args = trainer.processing_class, trainer.args
        sizes = [source.vocab_size for source in self.sources.values() if source.vocab_size is not None]
        self.vocab_size = min(sizes) if sizes else None

    def modules(self) -> dict[str, nn.Module]:
        return {}  # bridges, the only sources with trainable modules, are refused (check_args)

    def inputs_for_generated(self, batch: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        extra: dict[str, torch.Tensor] = {}
        for source in self.sources.values():
            extra |= source.inputs_for_generated(batch, inputs)
        return extra

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        loss_fn: DistillationLoss | None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, torch.Tensor | None]:
        """Each teacher's source on its rows, every part over the whole batch's normalisers; the student's outputs
        are None (the trainer runs one forward of the whole batch when it needs them)."""
        answered = inputs["labels"][:, 1:] != IGNORE_INDEX
        responses = answered.sum(-1)
        answered_total = responses.sum()
        if num_items_in_batch is None:  # evaluation: the batch's own count, as one teacher would divide by
            num_items_in_batch = answered_total
        if POSITION_COUNTS not in inputs:
            inputs = {**inputs, POSITION_COUNTS: position_counts(loss_fn, [inputs], self.tokenizer, self.args)}
        valid = torch.ones(answered.shape, dtype=torch.bool, device=answered.device)
        total, values, self._token_shares = 0, {}, {}
        for i, (name, source) in enumerate(self.sources.items()):
            index = (inputs[TEACHER_INDEX] == i).nonzero().flatten()
            share = responses[index].sum() / answered_total.clamp_min(1)
            self._token_shares[f"teacher_tokens/{name}"] = float(share)
            if len(index) == 0:
                continue
            part, part_values, _, part_valid = source.loss(model, rows_of(inputs, index), num_items_in_batch, loss_fn)
            total = total + part
            for term, value in part_values.items():
                values[term] = values.get(term, 0) + value
                values[f"{term}/{name}"] = value
            if part_valid is not None:
                valid[index] = part_valid
        return total, values, None, valid

    def batch_metrics(self) -> dict[str, float]:
        return dict(self._token_shares)

    def record(self) -> dict[str, Any]:
        return {"column": self.column, "teachers": {name: s.teacher_name for name, s in self.sources.items()}}

    def rows_name(self, fused: bool) -> str:
        names = {source.rows_name(fused) for source in self.sources.values()}
        return names.pop() if len(names) == 1 else "rows"
