"""hf_kd: knowledge distillation of LLMs on the Hugging Face stack.

`DistillationTrainer`/`DistillationConfig` extend TRL's GKD trainer with AKL, BiLD, MGSR and DSKD;
`hf_kd.losses.build_loss` serves the losses to users who bring their own loop.
"""

from importlib import metadata

from .environment import apply_defaults

apply_defaults()

from .config import DistillationConfig  # noqa: E402
from .data import load_bundled_dataset, map_to_messages  # noqa: E402
from .evaluation import EvaluationCallback, evaluate_student  # noqa: E402
from .layer_pruning import make_layer_pruned_student  # noqa: E402
from .losses import build_loss  # noqa: E402
from .real_models import load_real_model  # noqa: E402
from .rollout import GeneratedBatch, GenerationCallback, GenerationContext  # noqa: E402
from .teacher_cache import cache_teacher, load_teacher_cache  # noqa: E402
from .trainer import DistillationTrainer  # noqa: E402

__version__ = metadata.version("hf_kd")  # the one version, pyproject.toml's

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "EvaluationCallback",
    "GeneratedBatch",
    "GenerationCallback",
    "GenerationContext",
    "build_loss",
    "cache_teacher",
    "evaluate_student",
    "load_bundled_dataset",
    "load_real_model",
    "load_teacher_cache",
    "make_layer_pruned_student",
    "map_to_messages",
]
