"""Checks that a teacher cache's shards are what its manifest says, before a run trusts either.

The manifest is a JSON file anyone can edit, so it is checked against the shards as much as they are against it:
every shard is listed once, lies inside the cache folder and has the size and sha256 recorded; the shards' rows add
up to the examples the cache was built from, and no shard on disk is left out; each shard's column types and the
encoding it recorded when written match the manifest's; every token id lies inside the vocabulary. A mismatch is an
error naming the shard (and row) and the fix, instead of training on part of the data, on misread values, or an
index error inside torch at the first batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .encoding import CacheEncoding
from .manifest import MANIFEST_FILE, SHARD_ENCODING_KEY, file_sha256, shard_path

REBUILD = "Rebuild the cache with cache_teacher into a new output_dir."
IGNORED_LABEL = -100  # labels of prompt and padding positions


def checked_shards(folder: Path, manifest: dict[str, Any], verify: bool = True) -> list[Path]:
    """The shard files of a complete cache, in manifest order, after every check (``verify=False`` skips the
    sha256 of each file, the slowest check)."""
    paths = _listed_shards(folder, manifest)
    encoding = CacheEncoding.from_dict(manifest["encoding"])
    for path, shard in zip(paths, manifest["shards"]):
        _check_file(path, shard, verify)
        _check_contents(path, shard, encoding)
    return paths


def _listed_shards(folder: Path, manifest: dict[str, Any]) -> list[Path]:
    """The listed shard paths: each inside the folder and listed once, their rows adding up to the examples cached,
    and no Parquet file in the folder's data/ left out."""
    paths = [shard_path(folder, shard) for shard in manifest["shards"]]
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            raise ValueError(
                f"The teacher cache manifest {folder / MANIFEST_FILE} lists the shard {path.relative_to(folder)} "
                f"twice, so its rows would be trained on twice: the manifest was edited. {REBUILD}"
            )
        seen.add(path)
    rows = sum(int(shard["rows"]) for shard in manifest["shards"])
    examples = manifest["data"]["num_examples"]
    if rows != examples:
        raise ValueError(
            f"The teacher cache in {folder} lists {len(paths)} shards holding {rows} rows, but it was built from "
            f"{examples} examples: its manifest ({MANIFEST_FILE}) was edited. {REBUILD}"
        )
    unlisted = sorted(set((folder / "data").glob("*.parquet")) - seen)
    if unlisted:
        names = ", ".join(str(path.relative_to(folder)) for path in unlisted)
        raise ValueError(
            f"The teacher cache in {folder} has the shard files {names}, which are not listed in its manifest "
            f"({MANIFEST_FILE}): the manifest was edited, or files were added. Delete the files that are not the "
            "cache's, or rebuild the cache with cache_teacher into a new output_dir."
        )
    return paths


def _check_file(path: Path, shard: dict[str, Any], verify: bool) -> None:
    """The file is there, with the size and (when ``verify``) the sha256 the manifest recorded."""
    problem = None
    if not path.is_file():
        problem = "is missing"
    elif path.stat().st_size != shard["bytes"]:
        problem = f"has {path.stat().st_size} bytes instead of {shard['bytes']} (truncated or altered)"
    elif verify and file_sha256(path) != shard["sha256"]:
        problem = "does not match its sha256 in the manifest (corrupt or altered)"
    if problem:
        raise ValueError(
            f"Teacher cache shard {path} {problem}: delete it and rerun cache_teacher with the same arguments "
            f"and output_dir to rewrite it (the other shards are kept)."
        )


def _check_contents(path: Path, shard: dict[str, Any], encoding: CacheEncoding) -> None:
    """The shard holds the rows, column types and encoding the manifest says, and ids inside the vocabulary."""
    parquet = pq.ParquetFile(path)
    if parquet.metadata.num_rows != shard["rows"]:
        raise ValueError(
            f"Teacher cache shard {path} holds {parquet.metadata.num_rows} rows, its manifest says {shard['rows']}: "
            f"the manifest was edited. {REBUILD}"
        )
    schema = parquet.schema_arrow
    for name, dtype in encoding.column_dtypes.items():
        stored = schema.field(name).type if name in schema.names else None
        if stored is None or not pa.types.is_list(stored) or stored.value_type != pa.from_numpy_dtype(dtype):
            held = "lacks it" if stored is None else f"is stored as {getattr(stored, 'value_type', stored)}"
            raise ValueError(
                f"Teacher cache shard {path}: the column {name} {held}, but the manifest's encoding "
                f"({encoding.value_dtype} values over {encoding.vocab_size} tokens) says {dtype}: the manifest was "
                f"edited or the shard is another cache's, and its values would be misread. {REBUILD}"
            )
    recorded = (schema.metadata or {}).get(SHARD_ENCODING_KEY.encode())
    if recorded is not None and json.loads(recorded) != encoding.to_dict():
        recorded = json.loads(recorded)
        expected = encoding.to_dict()
        differing = ", ".join(f"{key}={value!r}" for key, value in expected.items() if recorded.get(key) != value)
        raise ValueError(
            f"Teacher cache shard {path} was written with the encoding {recorded}, but its manifest says "
            f"{differing}: the manifest was edited, and the values would be misread. {REBUILD}"
        )
    table = parquet.read(columns=["input_ids", "labels", "teacher_ids"])
    for name in table.column_names:
        allowed = IGNORED_LABEL if name == "labels" else None
        outside = _first_id_outside(table.column(name), encoding.vocab_size, allowed)
        if outside is not None:
            row, value = outside
            raise ValueError(
                f"Teacher cache shard {path} row {row}: {name} holds the token id {value}, outside the vocabulary of "
                f"{encoding.vocab_size} tokens the cache was built for: the shard is corrupt or was written for "
                f"another tokenizer. {REBUILD}"
            )


def _first_id_outside(column: pa.ChunkedArray, size: int, allowed: int | None) -> tuple[int, int] | None:
    """(row, id) of the first id of a list column outside [0, size) (``allowed`` excepted), or None."""
    lists = column.combine_chunks()
    ids = pc.list_flatten(lists)
    outside = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, size))
    if allowed is not None:
        outside = pc.and_(outside, pc.not_equal(ids, allowed))
    first = pc.index(outside, True).as_py()
    if first < 0:
        return None
    return pc.list_parent_indices(lists)[first].as_py(), ids[first].as_py()
