"""hf_kd: knowledge distillation of LLMs on the Hugging Face stack.

`DistillationTrainer`/`DistillationConfig` extend TRL's GKD trainer with AKL, BiLD, MGSR and DSKD;
`hf_kd.losses.build_loss` serves the losses to users who bring their own loop.
"""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .config import DistillationConfig  # noqa: E402
from .losses import build_loss  # noqa: E402
from .rollout import GeneratedBatch, GenerationCallback, GenerationContext  # noqa: E402
from .trainer import DistillationTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "GeneratedBatch",
    "GenerationCallback",
    "GenerationContext",
    "build_loss",
]
