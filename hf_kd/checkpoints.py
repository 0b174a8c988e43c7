"""Which checkpoint a run resumes from: the newest complete one.

A kill during a save leaves a half-written ``checkpoint-N`` folder; Trainer's ``resume_from_checkpoint=True`` takes the
highest N regardless and fails deep inside with a bare ``FileNotFoundError``. The Trainer writes ``trainer_state.json``
last, after the weights, the optimizer and hf_kd's helper files, so a folder is complete when that file reads as JSON
and the weights and helper files are there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from transformers.trainer import FSDP_MODEL_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

logger = logging.get_logger(__name__)

WEIGHT_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)
"""A full model or a LoRA adapter, as ``save_pretrained`` writes them."""
SHARDED_WEIGHT_PREFIXES = (FSDP_MODEL_NAME, "global_step")
"""Weights of a sharded run: FSDP's ``pytorch_model_fsdp*`` and DeepSpeed's ``global_step*`` entries."""
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(folder: str | os.PathLike, required_files: Sequence[str] = ()) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is complete: ``trainer_state.json`` reads as JSON, the
    student's weights (or adapter) are there, and so is every name in ``required_files`` (hf_kd's helper files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"it has no {TRAINER_STATE_NAME}, the file the Trainer writes last"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"its {TRAINER_STATE_NAME} cannot be read ({err})"
    names = {entry.name for entry in folder.iterdir()}
    if not names & set(WEIGHT_FILES) and not any(name.startswith(SHARDED_WEIGHT_PREFIXES) for name in names):
        return f"it holds no model weights or adapter (none of {', '.join(WEIGHT_FILES)})"
    missing = [name for name in required_files if name not in names]
    if missing:
        return f"it lacks this run's distillation helper files ({', '.join(missing)})"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike, required_files: Sequence[str] = ()) -> str:
    """The ``checkpoint-N`` folder of ``output_dir`` with the highest N that is complete (``checkpoint_problem``).

    Each newer folder that is skipped is logged with the reason; a ``ValueError`` names every folder and its problem
    when none is complete.
    """
    root = Path(output_dir)
    steps = {}
    if root.is_dir():
        steps = {entry: int(m.group(1)) for entry in root.iterdir() if (m := _CHECKPOINT.match(entry.name))}
    skipped = []
    for folder in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(folder, required_files)
        if problem is None:
            return str(folder)
        logger.warning(
            f"Not resuming from {folder}: {problem}. Its save was probably cut short (a crash or kill during the "
            "save); trying the checkpoint before it."
        )
        skipped.append(f"{folder.name}: {problem}")
    if not skipped:
        raise ValueError(
            f"resume_from_checkpoint=True, but {root} has no {PREFIX_CHECKPOINT_DIR}-* folder: train without "
            "resume_from_checkpoint, or pass the path of a checkpoint folder."
        )
    raise ValueError(
        f"resume_from_checkpoint=True, but no checkpoint in {root} is complete ({'; '.join(skipped)}). Train "
        "without resume_from_checkpoint to start over, or pass the path of a complete checkpoint folder."
    )


def mark_rewrite(run_dir: str | os.PathLike, step: int) -> None:
    """Before the Trainer saves step ``step`` into ``run_dir``, drop the ``trainer_state.json`` an earlier save left in
    that ``checkpoint-N`` folder (a run resumed from an older checkpoint rewrites the newer ones in place): the folder
    reads as incomplete until the new state is written, so a kill mid-rewrite never leaves new and old files under a
    valid state."""
    (Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / TRAINER_STATE_NAME).unlink(missing_ok=True)


def check_checkpoint(folder: str | os.PathLike, required_files: Sequence[str] = ()) -> None:
    """Refuse a checkpoint folder given by path that cannot be resumed from, naming the reason and the fix."""
    problem = checkpoint_problem(folder, required_files)
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {folder}: {problem}. Its save was probably cut short; resume from an earlier "
            "checkpoint, or pass resume_from_checkpoint=True to take the newest complete one."
        )
