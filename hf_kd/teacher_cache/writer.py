"""``cache_teacher``: run a teacher once over a chat dataset and store its top-k next-token distributions.

Layout of the output folder: ``teacher_cache.json`` (the manifest, see ``manifest.py``) and
``data/train-NNNNN.parquet`` shards, one row per example with the student-side ``input_ids`` and ``labels``
(exactly what the trainer's chat collator produces) and, for each response token in order, the teacher's
top-k ids, their stored log-probabilities and the log of the remaining mass (see ``encoding.py``).
``datasets.load_dataset("parquet", data_dir=<folder>/data)`` reads it; ``hf_kd.load_teacher_cache`` reads
it with its manifest and checks. An interrupted run resumes: shards already written (and listed in the
manifest with their checksum) are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from trl.experimental.utils import DataCollatorForChatML

from ..finiteness import LIKELY_CAUSES, valid_rows
from .encoding import CacheEncoding
from .manifest import (
    FORMAT,
    MANIFEST_FILE,
    SHARD_ENCODING_KEY,
    file_sha256,
    read_manifest,
    shard_path,
    teacher_identity,
    tokenizer_identity,
    write_manifest,
)

ENCODE_ROWS = 1024  # rows of [rows, V] float32 log-probs encoded at once


def _dataset_fingerprint(dataset: Any) -> str:
    """A sha256 of the rows themselves. Not ``datasets``' own fingerprint: that one follows the code of the
    transforms that made the dataset (a refactored filter would orphan a cache of the same rows) and is random when
    a transform cannot be hashed."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _load_teacher(teacher_model: nn.Module | str, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    if isinstance(teacher_model, (str, os.PathLike)):
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=dtype)
    elif dtype is not None:
        teacher_model = teacher_model.to(dtype)
    return teacher_model.to(device).eval()


def _text_length(example: dict[str, Any]) -> int:
    """Characters in an example's messages: the sort key that groups examples of similar token length."""
    return sum(len(str(message.get("content", ""))) for message in example["messages"])


def _list_column(flat: np.ndarray, counts: list[int], dtype: str) -> pa.Array:
    """One list per example, ``counts[i]`` items each, from the concatenated ``flat`` values (as ``dtype``)."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = pa.array(flat.astype(dtype), type=pa.from_numpy_dtype(dtype))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


class _ShardWriter:
    """Collects encoded examples (in any order) and writes them, in dataset order, as one Parquet shard (to a
    temporary name, then renamed)."""

    NAMES = ("input_ids", "labels", "ids", "values", "tail")

    def __init__(self, encoding: CacheEncoding):
        self.encoding = encoding
        self.examples: dict[int, tuple[np.ndarray, ...]] = {}

    def add(self, index: int, input_ids, labels, ids, values, tail) -> None:
        self.examples[index] = (input_ids, labels, ids, values, tail)

    def write(self, path: Path) -> dict[str, Any]:
        enc = self.encoding
        rows = [self.examples[i] for i in sorted(self.examples)]
        columns = {name: [row[j] for row in rows] for j, name in enumerate(self.NAMES)}
        counts = [len(x) for x in columns["input_ids"]]
        tokens = [len(x) for x in columns["tail"]]
        flat = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}
        dtypes = enc.column_dtypes
        table = pa.table(
            {
                "input_ids": _list_column(flat["input_ids"], counts, dtypes["input_ids"]),
                "labels": _list_column(flat["labels"], counts, dtypes["labels"]),
                "teacher_ids": _list_column(flat["ids"], [n * enc.top_k for n in tokens], dtypes["teacher_ids"]),
                "teacher_values": _list_column(
                    flat["values"], [n * enc.top_k for n in tokens], dtypes["teacher_values"]
                ),
                "teacher_log_tail": _list_column(flat["tail"], tokens, dtypes["teacher_log_tail"]),
            },
            # Each shard names its own encoding: float16 and bfloat16 values share one stored type.
            metadata={SHARD_ENCODING_KEY: json.dumps(enc.to_dict())},
        )
        partial = path.with_name(path.name + ".partial")
        pq.write_table(table, partial)
        os.replace(partial, path)
        return {
            "file": str(path.relative_to(path.parents[1])),
            "rows": len(counts),
            "tokens": int(sum(tokens)),
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }


@torch.inference_mode()
def _encode_batch(
    teacher, indices: list[int], batch, encoding: CacheEncoding, temperature: float, device, writer: _ShardWriter
) -> None:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    selected = (labels[:, 1:] != -100).to(device)
    _refuse_non_finite(logits, selected, indices)
    rows = logits[selected]
    parts = [[], [], []]
    for start in range(0, rows.shape[0], ENCODE_ROWS):
        logprobs = torch.log_softmax(rows[start : start + ENCODE_ROWS].float() / temperature, dim=-1)
        for part, array in zip(parts, encoding.encode(logprobs)):
            part.append(array)
    top_ids, values, tail = (np.concatenate(p) if p else np.zeros(0) for p in parts)
    counts = selected.sum(-1).tolist()
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for j in range(len(counts)):
        keep = mask[j].bool()  # the collator pads on the left; drop the padding
        a, b = bounds[j], bounds[j + 1]
        writer.add(
            indices[j],
            ids[j][keep].numpy(),
            labels[j][keep].numpy(),
            top_ids[a:b].reshape(-1),
            values[a:b].reshape(-1),
            tail[a:b],
        )


def _refuse_non_finite(logits: torch.Tensor, selected: torch.Tensor, indices: list[int]) -> None:
    """Raise, naming the dataset rows, when the teacher's logits at a response token hold NaN or +inf: the cache
    would store them as a confident, valid-looking distribution with a NaN tail and train every student on NaN."""
    bad = (~valid_rows(logits) & selected).any(-1)
    if bad.any():
        rows = [indices[j] for j in bad.nonzero().flatten().tolist()]
        raise FloatingPointError(
            f"The teacher's logits are NaN or inf at response tokens of dataset row(s) {rows}: refusing to cache "
            "them. The shards written so far are kept and the cache stays marked incomplete (a rerun resumes "
            f"there). Likely causes: {LIKELY_CAUSES}."
        )


def cache_teacher(
    teacher_model: nn.Module | str,
    processing_class: Any,
    dataset: Any,
    output_dir: str | os.PathLike,
    top_k: int = 64,
    *,
    value_dtype: str = "uint8",
    temperature: float = 1.0,
    max_length: int = 1024,
    batch_size: int = 8,
    shard_size: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Run ``teacher_model`` once over ``dataset`` (chat ``messages``) and write a teacher cache to ``output_dir``.

    ``processing_class`` is the tokenizer the student will be trained with (it must be the teacher's: a cache
    holds distributions over one vocabulary). ``top_k`` entries per response token are kept with values in
    ``value_dtype`` (see ``hf_kd.teacher_cache.encoding``; benchmarks/teacher_cache.py measures the trade-off).
    ``temperature`` is the temperature of the stored distribution (1.0 keeps the teacher's own). Teacher
    forwards run ``batch_size`` examples at a time on ``device`` (CUDA when present, in bf16/fp16 there when
    the teacher is given as a path or ``dtype`` says so). Returns the output folder.
    """
    _check_request(dataset, temperature, batch_size, shard_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = _load_teacher(teacher_model, device, dtype)
    encoding = CacheEncoding(top_k, _vocab_size(teacher, processing_class), value_dtype)
    identity = _identity(teacher, processing_class, dataset, encoding, temperature, max_length, shard_size)
    folder = Path(output_dir)
    num_shards = -(-len(dataset) // shard_size)
    shards = _resume(folder, identity)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    # Written before the first shard too, so that a run stopped inside it resumes instead of finding a foreign folder.
    write_manifest(folder, {**identity, "shards": shards, "complete": len(shards) == num_shards})
    collator = DataCollatorForChatML(tokenizer=processing_class, max_length=max_length)
    bar = tqdm(total=len(dataset), desc="Caching the teacher", unit="ex", disable=not progress)
    bar.update(min(len(shards) * shard_size, len(dataset)))
    for index in range(len(shards), num_shards):
        rows = range(index * shard_size, min((index + 1) * shard_size, len(dataset)))
        writer = _ShardWriter(encoding)
        for indices, batch in _batches_by_length(dataset, rows, batch_size, collator):
            _encode_batch(teacher, indices, batch, encoding, temperature, device, writer)
            bar.update(len(indices))
        shards.append(writer.write(folder / "data" / f"train-{index:05d}.parquet"))
        write_manifest(folder, {**identity, "shards": shards, "complete": index + 1 == num_shards})
    bar.close()
    return folder


def _check_request(dataset: Any, temperature: float, batch_size: int, shard_size: int) -> None:
    """Refuse settings no cache can be built with, before the teacher is loaded."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: nothing to cache.")


def _vocab_size(teacher: nn.Module, processing_class: Any) -> int:
    """The teacher's vocabulary size, which the tokenizer's tokens must fit in (a cache holds one vocabulary)."""
    vocab_size = teacher.config.get_text_config().vocab_size
    if len(processing_class) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(processing_class)} tokens but the teacher's vocabulary only {vocab_size}: "
            "a cache stores distributions over the teacher's vocabulary, so pass the teacher's own tokenizer."
        )
    return vocab_size


def _identity(
    teacher: nn.Module,
    processing_class: Any,
    dataset: Any,
    encoding: CacheEncoding,
    temperature: float,
    max_length: int,
    shard_size: int,
) -> dict[str, Any]:
    """What makes a cache this cache (recorded in its manifest; resuming requires the same)."""
    return {
        "format": FORMAT,
        "teacher": teacher_identity(teacher),
        "tokenizer": tokenizer_identity(processing_class),
        "temperature": float(temperature),
        "encoding": encoding.to_dict(),
        "data": {
            "fingerprint": _dataset_fingerprint(dataset),
            "num_examples": len(dataset),
            "max_length": max_length,
            "shard_size": shard_size,
        },
    }


def _batches_by_length(
    dataset: Any, rows: range, batch_size: int, collator: Any
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(dataset indices, collated batch) over ``rows``. Batches of similar length pad less (about a third fewer
    teacher tokens on chat data); the shard keeps dataset order."""
    order = sorted(rows, key=lambda i: _text_length(dataset[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, collator([dataset[i] for i in indices])


def _comparable(key: str, value: Any) -> Any:
    """What must match for a folder to be the same cache: the tokenizer by its vocabulary (a copy of it saved in
    another folder is the same tokenizer), everything else as recorded."""
    if key == "tokenizer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name_or_path"}
    return value


def _resume(folder: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Shards already written by an interrupted run with the same identity; an error for another cache's folder."""
    if not (folder / MANIFEST_FILE).is_file():
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and is not empty: pick a new output_dir for the teacher cache.")
        return []
    manifest = read_manifest(folder)
    differing = sorted(
        key for key in identity if _comparable(key, manifest.get(key)) != _comparable(key, identity[key])
    )
    if differing:
        raise ValueError(
            f"{folder} holds a teacher cache built with other settings ({', '.join(differing)} differ): pick a "
            "new output_dir, or delete that folder to rebuild it."
        )
    kept = []
    for shard in manifest["shards"]:
        path = shard_path(folder, shard)
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            break  # this shard and the ones after it are rewritten
        kept.append(shard)
    return kept
