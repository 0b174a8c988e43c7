"""The manifest of a teacher cache: what produced it, how it is encoded, and a checksum of every shard.

A cache is only valid for the teacher, tokenizer, data and encoding it was built with; the manifest records
each, so that a run can refuse a cache that does not match it instead of training on wrong targets.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

MANIFEST_FILE = "teacher_cache.json"
FORMAT = "hf_kd.teacher_cache/1"
COLUMNS = ("input_ids", "labels", "teacher_ids", "teacher_values", "teacher_log_tail")
SHARD_ENCODING_KEY = "hf_kd.encoding"
"""Key of the Parquet metadata in which each shard records its encoding (``CacheEncoding.to_dict``, as JSON)."""


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Name, size and a sha256 of the token -> id map (what decides whether cached ids mean the same tokens)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"name_or_path": getattr(tokenizer, "name_or_path", ""), "size": len(vocab), "vocab_sha256": digest}


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a model's state dict (identifies the teacher's weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def teacher_identity(model: nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", ""),
        "revision": getattr(config, "_commit_hash", None),
        "model_type": getattr(config, "model_type", None),
        "weights_sha256": weights_sha256(model),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a teacher cache: it has no {MANIFEST_FILE}. Build one with hf_kd.cache_teacher(...) "
            "or `hf-kd cache-teacher`."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}; this version of hf_kd reads {FORMAT!r}.")
    return manifest


def shard_path(folder: Path, shard: dict[str, Any]) -> Path:
    """Where a shard listed in the manifest lies: a relative path inside ``folder``, never outside it (a manifest
    naming an absolute path or one through ``..`` would make the reader open files that are not the cache's)."""
    relative = Path(shard["file"])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(
            f"The teacher cache manifest {folder / MANIFEST_FILE} names the shard {shard['file']!r}, a path outside "
            "the cache folder (shards are relative paths inside it, such as data/train-00000.parquet): the manifest "
            "was edited. Rebuild the cache with cache_teacher into a new output_dir."
        )
    return folder / relative


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write atomically (a crash never leaves half a manifest)."""
    partial = folder / f"{MANIFEST_FILE}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, folder / MANIFEST_FILE)
