"""One distillation run from a YAML recipe and/or flags: parse, load models and data, train, save, push.

`hf-kd distill` calls `parse_args` + `run_distillation`; examples/distill.py composes the same steps
(`load_models_and_data`, `build_trainer`, `train_and_save`) around its smoke and shard-recording switches, so both
accept the same recipes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402
from trl import TrlParser  # noqa: E402

from .config import DistillationConfig  # noqa: E402
from .data import load_bundled_dataset, map_to_messages  # noqa: E402
from .trainer import DistillationTrainer  # noqa: E402

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger("hf_kd.distill")

BUNDLED_PREFIX = "bundled"
"""`dataset: bundled` is hf_kd's bundled data (split `dataset_split`); `bundled:<split>` names the split."""


@dataclass
class DistillArguments:
    """What to distil: teacher, student, data and an optional LoRA adapter (the recipe fields beside
    `DistillationConfig`)."""

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
        default=BUNDLED_PREFIX,
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


def parse_args(
    argv: Sequence[str] | None = None, arguments_type: type[DistillArguments] = DistillArguments
) -> tuple[DistillArguments, DistillationConfig]:
    """Recipe (`--config`) values as defaults, then the command line, into `arguments_type` + `DistillationConfig`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((arguments_type, DistillationConfig))
    arguments, config, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    if unknown:
        raise ValueError(
            f"Unknown recipe fields or flags {unknown}: a recipe and the command line take the fields of "
            f"{arguments_type.__name__} and DistillationConfig (list them with --help). Remove or rename them; "
            "`smoke` and `record_shards` are switches of examples/distill.py only."
        )
    return arguments, config


def resolve_model_path(name: str) -> str:
    """A model folder or Hub id; a name of `hf_kd.assets.REAL_MODELS` (also written `hf_kd:<name>`) is converted
    once from its package and cached."""
    from .assets import REAL_MODELS, load_real_model

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
    """The tokenizer at `path`, padding with its end-of-sequence token when it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        logger.warning(f"The {what} tokenizer has no pad token: padding with its end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Models:
    """The models and tokenizers one run trains with."""

    student: PreTrainedModel
    teacher: PreTrainedModel
    tokenizer: Any
    teacher_tokenizer: Any | None


def load_models(arguments: DistillArguments, config: DistillationConfig) -> Models:
    """Teacher, student and tokenizers from the arguments; the config's init kwargs choose dtypes."""
    if arguments.teacher is None:
        raise ValueError(
            "No teacher given: set `teacher:` in the recipe or pass --teacher <folder | Hub id | real-model name>."
        )
    if (arguments.student is None) == (arguments.student_layers is None):
        raise ValueError(
            "Give exactly one of `student` (a model to load) and `student_layers` (a student cut from the teacher)."
        )
    teacher_path = resolve_model_path(arguments.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_path, **_init_kwargs(config.teacher_model_init_kwargs, default_dtype="auto")
    )
    student_kwargs = _init_kwargs(config.model_init_kwargs, default_dtype="float32")
    if arguments.student_layers is not None:
        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "student_layers cannot cut a student from a ZeRO-3-partitioned teacher. Save the student once with "
                "hf_kd.assets.make_layer_pruned_student(teacher, n, folder) and pass --student <folder>."
            )
        from .assets import prune_layers

        student = prune_layers(teacher, arguments.student_layers)
        if student_kwargs["dtype"] != "auto":
            student = student.to(student_kwargs["dtype"])
        tokenizer = load_tokenizer(teacher_path, "teacher's (shared with the student)")
    else:
        student_path = resolve_model_path(arguments.student)
        student = AutoModelForCausalLM.from_pretrained(student_path, **student_kwargs)
        tokenizer = load_tokenizer(student_path, "student's")
    teacher_tokenizer = None
    if arguments.teacher_tokenizer is not None:
        teacher_tokenizer = load_tokenizer(resolve_model_path(arguments.teacher_tokenizer), "teacher's")
    return Models(student, teacher, tokenizer, teacher_tokenizer)


def load_conversations(
    spec: str, split: str = "train", config_name: str | None = None, max_samples: int | None = None
) -> datasets.Dataset:
    """Conversations as a `messages` column from `bundled` / `bundled:<split>`, a local JSON/JSONL file or a Hub
    dataset; Dolly, Alpaca and prompt/completion layouts are converted. `max_samples` keeps the first N."""
    if spec == BUNDLED_PREFIX or spec.startswith(BUNDLED_PREFIX + ":"):
        dataset = load_bundled_dataset(spec.partition(":")[2] or split)
    elif Path(spec).is_file():
        dataset = datasets.load_dataset("json", data_files=spec, split="train")
    elif spec.endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"Dataset file {spec} does not exist: check the `dataset` path.")
    else:
        dataset = datasets.load_dataset(spec, name=config_name, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return map_to_messages(dataset)


def load_train_dataset(arguments: DistillArguments) -> datasets.Dataset:
    """The training conversations the arguments name."""
    return load_conversations(
        arguments.dataset, arguments.dataset_split, arguments.dataset_config, arguments.max_train_samples
    )


def load_models_and_data(arguments: DistillArguments, config: DistillationConfig) -> tuple[Models, datasets.Dataset]:
    """Models and training data, on the main process first (real models are converted only once)."""
    with config.main_process_first(desc="loading models and data"):
        return load_models(arguments, config), load_train_dataset(arguments)


def lora_config(arguments: DistillArguments) -> LoraConfig | None:
    """The LoRA adapter to train, or None to train the full student."""
    if not arguments.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=arguments.lora_r,
        lora_alpha=arguments.lora_alpha,
        lora_dropout=arguments.lora_dropout,
        target_modules=arguments.lora_target_modules or "all-linear",
    )


def build_trainer(
    arguments: DistillArguments, config: DistillationConfig, models: Models, train_dataset: datasets.Dataset
) -> DistillationTrainer:
    """A DistillationTrainer over loaded models; the config's init kwargs are spent (the trainer only reads them
    for model names) and cleared."""
    config.model_init_kwargs = config.teacher_model_init_kwargs = None
    return DistillationTrainer(
        model=models.student,
        teacher_model=models.teacher,
        args=config,
        train_dataset=train_dataset,
        processing_class=models.tokenizer,
        teacher_processing_class=models.teacher_tokenizer,
        peft_config=lora_config(arguments),
    )


def train_and_save(trainer: DistillationTrainer, dataset_name: str | None) -> TrainOutput:
    """Train (resuming when the config says so), save the student with its model card, and push when asked."""
    args = trainer.args
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.create_model_card(dataset_name=dataset_name)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    return result


def summarize(trainer: DistillationTrainer, result: TrainOutput) -> dict[str, Any]:
    """The training loss, the step count, the process count and where the student was saved."""
    return {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "output_dir": trainer.args.output_dir,
        "world_size": trainer.accelerator.num_processes,
    }


def configure_logging(config: DistillationConfig) -> None:
    """Timestamped log lines at the config's level for this process."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=config.get_process_log_level())


def run_distillation(arguments: DistillArguments, config: DistillationConfig) -> dict[str, Any]:
    """Load, train, save (and push); returns `summarize`'s dict."""
    configure_logging(config)
    models, train_dataset = load_models_and_data(arguments, config)
    trainer = build_trainer(arguments, config, models, train_dataset)
    return summarize(trainer, train_and_save(trainer, arguments.dataset))
