"""Reading a teacher cache: ``load_teacher_cache`` (checks the manifest and every shard) and the collator.

The loaded ``datasets.Dataset`` carries its manifest in ``dataset.info.description`` (as JSON under
``MANIFEST_KEY``), so that the trainer can check the cache against the run without the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from .encoding import CacheEncoding, pack_rows
from .manifest import COLUMNS, MANIFEST_FILE, read_manifest, weights_sha256
from .shard_checks import checked_shards

MANIFEST_KEY = "hf_kd_teacher_cache"


def load_teacher_cache(
    folder: str | os.PathLike,
    *,
    teacher: nn.Module | str | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    verify: bool = True,
) -> datasets.Dataset:
    """The cache in ``folder`` as a Dataset, after checking it.

    Errors when the cache is incomplete, a shard is missing, truncated or altered (its sha256 differs from
    the manifest's; ``verify=False`` skips the sha256), when the manifest does not match its shards (see
    ``shard_checks``: rows, shard list, column types, encoding, token ids), or when the cache does not match what
    the caller expects: ``teacher`` (a model, compared by a hash of its weights, or a name/path, compared with the
    recorded one), ``top_k`` or ``temperature``.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise ValueError(
            f"The teacher cache in {folder} is incomplete ({len(manifest['shards'])} shards written): rerun "
            "cache_teacher with the same arguments and output_dir to finish it."
        )
    files = checked_shards(folder, manifest, verify=verify)
    _check_expectations(manifest, teacher, top_k, temperature, folder)
    dataset = datasets.load_dataset("parquet", data_files=[str(path) for path in files], split="train")
    dataset.info.description = json.dumps({MANIFEST_KEY: manifest})
    return dataset


def _check_expectations(manifest, teacher, top_k, temperature, folder) -> None:
    recorded = manifest["teacher"]
    if isinstance(teacher, nn.Module):
        if weights_sha256(teacher) != recorded["weights_sha256"]:
            raise ValueError(
                f"The teacher cache in {folder} was built with other teacher weights ({recorded['name_or_path']!r}, "
                "weights sha256 differs): rebuild the cache with this teacher."
            )
    elif teacher is not None and str(teacher) != recorded["name_or_path"]:
        raise ValueError(
            f"The teacher cache in {folder} was built with teacher {recorded['name_or_path']!r}, not {str(teacher)!r}."
        )
    cached_k = manifest["encoding"]["top_k"]
    if top_k is not None and top_k != cached_k:
        raise ValueError(f"The teacher cache in {folder} holds the top-{cached_k} entries, not top-{top_k}.")
    if temperature is not None and float(temperature) != manifest["temperature"]:
        raise ValueError(
            f"The teacher cache in {folder} stores the teacher at temperature {manifest['temperature']}, not "
            f"{temperature}: rebuild it with cache_teacher(..., temperature={temperature})."
        )


def cache_manifest(dataset: Any) -> dict[str, Any] | None:
    """The manifest of a Dataset loaded by ``load_teacher_cache``; None for a dataset that is not a cache.

    A dataset with the cache's columns but no manifest (read with plain ``load_dataset``) is an error, since
    it cannot be checked against the run.
    """
    if isinstance(dataset, (str, os.PathLike)) and (Path(dataset) / MANIFEST_FILE).is_file():
        raise TypeError(f"Load the teacher cache first: train_dataset=hf_kd.load_teacher_cache({str(dataset)!r}).")
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    if MANIFEST_KEY in description:
        return json.loads(description)[MANIFEST_KEY]
    columns = set(getattr(dataset, "column_names", None) or [])
    if {"teacher_ids", "teacher_log_tail"} <= columns:
        raise ValueError(
            "This dataset has teacher-cache columns but no manifest to check it against the run: load it with "
            "hf_kd.load_teacher_cache(<cache folder>) instead of datasets.load_dataset."
        )
    return None


class TeacherCacheCollator:
    """Pads cached examples (on the left, like the chat collator) and lays the teacher rows under the labels.

    Returns ``input_ids``, ``attention_mask``, ``labels`` [B, L] and ``teacher_rows`` [B, L - 1, 2k + 1]
    (see ``encoding.pack_rows``), where row t holds the teacher's entry for the prediction of labels[:, t + 1];
    rows of prompt and padding positions are zero and never read.
    """

    def __init__(self, manifest: dict[str, Any], pad_token_id: int):
        self.encoding = CacheEncoding.from_dict(manifest["encoding"])
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [c for c in COLUMNS if c not in examples[0]]
        if missing:
            raise ValueError(f"Teacher-cache examples lack the columns {missing}; was the dataset altered?")
        k = self.encoding.top_k
        length = max(len(e["input_ids"]) for e in examples)
        batch = len(examples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        teacher_rows = torch.zeros((batch, max(length - 1, 0), 2 * k + 1))
        for j, example in enumerate(examples):
            n = len(example["input_ids"])
            offset = length - n
            input_ids[j, offset:] = torch.as_tensor(example["input_ids"])
            attention_mask[j, offset:] = 1
            labels[j, offset:] = torch.as_tensor(example["labels"])
            positions = (labels[j, 1:] != -100).nonzero().squeeze(-1)
            log_tail = torch.as_tensor(np.asarray(example["teacher_log_tail"], dtype=np.float32))
            ids = np.asarray(example["teacher_ids"], dtype=np.int64)
            if log_tail.numel() != positions.numel() or ids.size != k * positions.numel():
                raise ValueError(
                    f"A teacher-cache example has {positions.numel()} response tokens but {log_tail.numel()} teacher "
                    f"rows ({ids.size} ids for top-{k}): the cache is corrupt or was altered; rebuild it."
                )
            values = self.encoding.decode_values(np.asarray(example["teacher_values"])).reshape(-1, k)
            teacher_rows[j, positions] = pack_rows(torch.as_tensor(ids).reshape(-1, k), values, log_tail)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "teacher_rows": teacher_rows,
        }
