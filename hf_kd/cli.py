"""The `hf-kd` command: `distill` (a YAML recipe and/or flags), `evaluate`, and `demo`.

hf-kd demo                                    # SmolLM2-135M-Instruct -> a 10-layer SmolLM2 student, offline
hf-kd demo --bridge dskd                      # the same with Gemma-3-270m as a cross-vocabulary teacher
hf-kd distill --config examples/recipes/akl.yaml    # any recipe; flags override it (--teacher <path>)
hf-kd evaluate --model <path> --teacher <path> --dataset bundled
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def distill(argv: list[str]) -> None:
    """Parse a YAML recipe (`--config`) and flags into DistillArguments + DistillationConfig, then train and save
    (hf_kd.distill, shared with examples/distill.py)."""
    from .distill import parse_args, run_distillation

    summary = run_distillation(*parse_args(argv))
    print(f"Saved the student to {summary['output_dir']}")


def evaluate(argv: list[str]) -> None:
    """Rouge-L, first-sentence exact match and held-out KL of a model on held-out conversations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distill import load_conversations, resolve_model_path
    from .evaluation import evaluate_student

    parser = argparse.ArgumentParser(prog="hf-kd evaluate")
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", default=None, help="Same-tokenizer teacher for the held-out KL.")
    parser.add_argument("--dataset", default="bundled:heldout")
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.teacher)) if args.teacher else None
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
