"""The `hf-kd` command. Every verb parses dataclass fields into `--field_name value` flags (TRL's TrlParser, an
HfArgumentParser), each with its help text: `hf-kd <verb> --help` lists them.

hf-kd demo                                            # SmolLM2-135M-Instruct -> a 20-layer student, offline
hf-kd demo --bridge dskd                              # the same with Gemma-3-270m as a cross-vocabulary teacher
hf-kd distill --config examples/recipes/akl.yaml      # any recipe; flags override it (--teacher <path>)
hf-kd evaluate --model <path> --teacher <path> --dataset bundled:heldout
hf-kd cache-teacher --teacher <path> --output_dir <dir>  # then train with teacher_model=None (README)

A bad command line, recipe or model path ends with one `hf-kd <verb>: error: ...` line and exit status 1.
Recipes are code: a recipe can switch on trust_remote_code for both models and set environment variables (`env:`);
a run that does either logs a warning naming the keys (`hf-kd distill --help`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trl import TrlParser

from .demo import DemoSettings
from .distill import DATACLASS_TYPES, CommandLineError


@dataclass
class EvaluateArguments:
    """What `hf-kd evaluate` scores, and on what."""

    model: str = field(metadata={"help": "The model to score: a local folder, a Hub id or a real-model name."})
    teacher: str | None = field(
        default=None, metadata={"help": "Same-tokenizer teacher for the held-out KL (folder, Hub id or real model)."}
    )
    dataset: str = field(
        default="bundled:heldout",
        metadata={"help": "Held-out conversations: 'bundled:<split>', a local .json/.jsonl file or a Hub dataset."},
    )
    max_samples: int = field(default=100, metadata={"help": "Score at most this many conversations."})
    max_new_tokens: int = field(default=96, metadata={"help": "Greedy tokens generated per answer."})


@dataclass
class CacheTeacherArguments:
    """What `hf-kd cache-teacher` runs (hf_kd.cache_teacher), on what, and where it writes."""

    teacher: str = field(metadata={"help": "The teacher: a local folder, a Hub id or a real-model name."})
    output_dir: str = field(metadata={"help": "Cache folder; an interrupted run resumes in it."})
    dataset: str = field(
        default="bundled:train",
        metadata={"help": "Chat conversations: 'bundled:<split>', a local .json/.jsonl file or a Hub dataset."},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Cache at most this many conversations."})
    top_k: int = field(default=64, metadata={"help": "Teacher entries kept per response token."})
    value_dtype: str = field(
        default="uint8",
        metadata={"help": "Stored log-probabilities: uint8 (1/8-nat steps), float16, bfloat16, float32."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the stored teacher distribution."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per conversation (the oldest are dropped)."})
    batch_size: int = field(default=8, metadata={"help": "Conversations per teacher forward."})
    shard_size: int = field(default=1024, metadata={"help": "Conversations per Parquet shard."})


def distill(argv: list[str], prog: str) -> None:
    """Train a student from a YAML recipe (`--config`) and/or flags (the script of examples/distill.py)."""
    from .distill import main, parse_args

    main(*parse_args(argv, prog=prog))  # the same parser as COMMANDS["distill"].parser, plus recipes and --smoke


def evaluate(argv: list[str], prog: str) -> None:
    """Rouge-L, first-sentence exact match and held-out KL of a model on held-out conversations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distill import load_conversations, resolve_model_path
    from .evaluation import evaluate_student

    (args,) = COMMANDS["evaluate"].parser(prog).parse_args_into_dataclasses(argv)
    path = resolve_model_path(args.model)
    teacher_path = resolve_model_path(args.teacher) if args.teacher else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path) if teacher_path else None
    results = evaluate_student(
        model,
        AutoTokenizer.from_pretrained(path),
        load_conversations(args.dataset),
        teacher=teacher,
        max_new_tokens=args.max_new_tokens,
        max_samples=args.max_samples,
    )
    print(json.dumps(results, indent=2))


def demo(argv: list[str], prog: str) -> None:
    """Distill SmolLM2-135M-Instruct into a layer-pruned copy of itself, offline, in minutes on a CPU.

    Trains on the bundled data and prints a before/after table (Rouge-L, first-sentence exact match, held-out KL);
    saves the student with its model card."""
    from .demo import run_demo

    (settings,) = COMMANDS["demo"].parser(prog).parse_args_into_dataclasses(argv)
    run_demo(settings)


@dataclass(frozen=True)
class Command:
    """One verb: the function that runs it (its docstring's first line is the summary) and the dataclasses whose
    fields are its flags."""

    run: Callable[[list[str], str], None]
    dataclass_types: tuple[type, ...]

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0]

    def parser(self, prog: str) -> TrlParser:
        """The verb's parser: one `--field_name` flag per dataclass field, with the field's help text."""
        return TrlParser(self.dataclass_types, prog=prog, description=self.run.__doc__)


def cache_teacher(argv: list[str], prog: str) -> None:
    """Run a teacher once over chat data and store its top-k next-token distributions for offline distillation."""
    from transformers import AutoTokenizer

    from .distill import load_conversations, resolve_model_path
    from .teacher_cache import cache_teacher as write_cache

    (args,) = COMMANDS["cache-teacher"].parser(prog).parse_args_into_dataclasses(argv)
    teacher = resolve_model_path(args.teacher)
    folder = write_cache(
        teacher,
        AutoTokenizer.from_pretrained(teacher),
        load_conversations(args.dataset, max_samples=args.max_samples),
        args.output_dir,
        top_k=args.top_k,
        value_dtype=args.value_dtype,
        temperature=args.temperature,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
    )
    print(f"Wrote the teacher cache to {folder}")


COMMANDS: dict[str, Command] = {
    "distill": Command(distill, DATACLASS_TYPES),
    "evaluate": Command(evaluate, (EvaluateArguments,)),
    "demo": Command(demo, (DemoSettings,)),
    "cache-teacher": Command(cache_teacher, (CacheTeacherArguments,)),
}
"""The verbs of `hf-kd`; a new verb is one function `(argv, prog) -> None`, its dataclasses, and one entry here."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    verbs = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    return f"usage: hf-kd <command> [--help] [flags]\n\ncommands:\n{verbs}\n\n{__doc__}"


def main(argv: list[str] | None = None) -> Any:
    """Run one verb; returns the exit status (0, or 1 after a one-line error, 2 for an unknown verb)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(usage())
        unknown = bool(argv) and argv[0] not in ("-h", "--help")
        if unknown:
            print(f"hf-kd: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2 if unknown else 0
    verb, start = argv[0], time.perf_counter()
    try:
        COMMANDS[verb].run(argv[1:], f"hf-kd {verb}")
    except (CommandLineError, OSError) as err:  # user input the command could not use: one line, no traceback
        print(f"hf-kd {verb}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"hf-kd {verb} finished in {time.perf_counter() - start:.0f} s")
    return 0
