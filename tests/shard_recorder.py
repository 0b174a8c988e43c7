"""The distillation script with test instrumentation, for `accelerate launch` in tests/test_distributed.py.

It parses and trains exactly as `hf-kd distill` does (hf_kd.distill), with a collator that notes the id of every
example collated on this process; each process then writes `<output_dir>/shards/rank<N>.json` with its rank, world
size, backend, device, those ids and a digest of the student it ended with (full parameters: DDP or one device).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from hf_kd.distill import build_trainer, configure_logging, load_models_and_data, parse_args, train_and_save

EXAMPLE_ID_COLUMN = "example_id"
SHARDS_DIR = "shards"


class ShardRecorder:
    """A collator wrapper that notes the `example_id` of every example collated on this process, and each batch's
    token counts when the trainer added them (the `length` column of length-grouped sampling)."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.example_ids: list[int] = []
        self.batch_lengths: list[list[int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.example_ids.extend(int(feature[EXAMPLE_ID_COLUMN]) for feature in features)
        self.batch_lengths.append([int(feature["length"]) for feature in features if "length" in feature])
        return self.collator([{k: v for k, v in f.items() if k != EXAMPLE_ID_COLUMN} for f in features])


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when data-parallel training kept them in sync."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    script_args, config, model_args = parse_args()
    if config.dataloader_num_workers > 0:
        raise ValueError("The shard recorder needs --dataloader_num_workers 0 (it records in the main process).")
    configure_logging(config)
    models, train_dataset = load_models_and_data(script_args, config, model_args)
    train_dataset = train_dataset.add_column(EXAMPLE_ID_COLUMN, list(range(len(train_dataset))))
    trainer = build_trainer(config, model_args, models, train_dataset)
    recorder = trainer.data_collator = ShardRecorder(trainer.data_collator)
    result = train_and_save(trainer, dataset_name=None)

    state = trainer.accelerator.state
    columns = trainer.train_dataset.column_names
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "backend": state.backend,
        "device": str(trainer.args.device),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "example_ids": recorder.example_ids,
        "batch_lengths": recorder.batch_lengths,
        "dataset_lengths": list(trainer.train_dataset["length"]) if "length" in columns else [],
        "student_digest": parameter_digest(trainer.accelerator.unwrap_model(trainer.model)),
    }
    path = Path(trainer.args.output_dir) / SHARDS_DIR / f"rank{state.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
