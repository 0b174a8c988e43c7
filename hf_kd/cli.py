"""The `hf-kd` command: `distill` (a YAML recipe and/or flags), `evaluate`, and `demo`.

hf-kd demo                                    # SmolLM2-135M-Instruct -> a 10-layer SmolLM2 student, offline
hf-kd demo --bridge dskd                      # the same with Gemma-3-270m as a cross-vocabulary teacher
hf-kd distill --config examples/recipes/akl.yaml --student <path> --teacher <path> --dataset bundled
hf-kd evaluate --model <path> --teacher <path> --dataset bundled
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class ModelArguments:
    """What `hf-kd distill` trains: the models, the data and an optional LoRA adapter."""

    student: str = field(metadata={"help": "Student model path or Hub id, or a real model name (see hf_kd.assets)."})
    teacher: str = field(metadata={"help": "Teacher model path or Hub id, or a real model name."})
    dataset: str = field(
        default="bundled",
        metadata={"help": "'bundled' (hf_kd's offline data), a local .json/.jsonl file, or a Hub dataset id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full student."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA target module names; default: all linear layers."}
    )


def resolve_model(name: str) -> str:
    """A real model name (from a PyPI package, converted once) becomes its cached folder; anything else is kept."""
    from .assets import REAL_MODELS, load_real_model

    return str(load_real_model(name)) if name in REAL_MODELS else name


def load_conversations(spec: str, split: str = "train"):
    """The training conversations named by `spec`, mapped to a `messages` column."""
    import datasets

    from .data import load_bundled_dataset, map_to_messages

    if spec in ("bundled", "bundled:train", "bundled:heldout"):
        return load_bundled_dataset("heldout" if spec.endswith("heldout") else split)
    if Path(spec).is_file():
        return map_to_messages(datasets.load_dataset("json", data_files=spec, split="train"))
    return map_to_messages(datasets.load_dataset(spec, split=split))


def distill(argv: list[str]) -> None:
    """Parse a YAML recipe (`--config`) and flags into DistillationConfig + ModelArguments, then train and save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import TrlParser

    from . import DistillationConfig, DistillationTrainer

    parser = TrlParser((ModelArguments, DistillationConfig))
    model_args, config = parser.parse_args_and_config(argv)
    student_path, teacher_path = resolve_model(model_args.student), resolve_model(model_args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path) if config.bridge == "dskd" else None
    peft_config = None
    if model_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_path),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path),
        args=config,
        train_dataset=load_conversations(model_args.dataset, model_args.dataset_split),
        processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()
    if config.push_to_hub:
        trainer.push_to_hub()
    print(f"Saved the student to {config.output_dir}")


def evaluate(argv: list[str]) -> None:
    """Rouge-L, first-sentence exact match and held-out KL of a model on held-out conversations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate_student

    parser = argparse.ArgumentParser(prog="hf-kd evaluate")
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", default=None, help="Same-tokenizer teacher for the held-out KL.")
    parser.add_argument("--dataset", default="bundled:heldout")
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model(args.teacher)) if args.teacher else None
    results = evaluate_student(
        model,
        AutoTokenizer.from_pretrained(path),
        load_conversations(args.dataset),
        teacher=teacher,
        max_new_tokens=args.max_new_tokens,
        max_samples=args.max_samples,
    )
    print(json.dumps(results, indent=2))


def demo(argv: list[str]) -> None:
    """Distill SmolLM2-135M-Instruct into a layer-pruned student on the bundled data, offline, with a
    before/after table (Rouge-L, first-sentence exact match, held-out KL) and a model card."""
    from .demo import DemoSettings, run_demo

    parser = argparse.ArgumentParser(prog="hf-kd demo", description=demo.__doc__)
    defaults = DemoSettings()
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=value)
    run_demo(DemoSettings(**vars(parser.parse_args(argv))))


COMMANDS = {"distill": distill, "evaluate": evaluate, "demo": demo}


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    start = time.perf_counter()
    COMMANDS[argv[0]](argv[1:])
    print(f"hf-kd {argv[0]} finished in {time.perf_counter() - start:.0f} s")
    return 0
