"""A generated micro-batch on its way to the loss, carrying its own normaliser and the batch it replaced."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class RolloutStep:
    """What ``compute_loss`` needs of a generated (on-policy, seq-kd, SCRG-corrected) micro-batch.

    ``inputs``: the generated batch (input_ids, attention_mask, labels, and whatever the teacher source adds).
    ``num_items``: its normaliser, the generated tokens of this micro-batch times the accumulation steps; counted on
    this process only, so never multiplied by the process count as a gathered count is. Under
    ``on_policy_normalization="gkd"`` it is instead the replaced batch's count of labels, as GKDTrainer divides by, and
    ``gathered`` is True: summed over processes like the Trainer's ``num_items_in_batch``.
    ``reference``, ``reference_num_items``: the dataset batch it replaced and that batch's (gathered) normaliser, when
    the recipe's ``ce`` term trains on the reference answers; None otherwise.

    It reads like its batch (``step["labels"]``, ``len(step)``, ``step.items()``, ``step.get(key)``): what the
    Trainer's ``training_step`` asks of a batch before handing it to ``compute_loss``, and what an overriding
    ``compute_loss`` reads of one. It is no ``Mapping`` subclass, which the Trainer's ``_prepare_inputs`` would
    rebuild as one from its items.
    """

    inputs: dict[str, Any]
    num_items: Any
    reference: dict[str, Any] | None = None
    reference_num_items: Any = None
    gathered: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.inputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    __contains__, keys, items, values, get = (
        Mapping.__contains__,
        Mapping.keys,
        Mapping.items,
        Mapping.values,
        Mapping.get,
    )
