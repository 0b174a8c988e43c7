"""Environment variables hf_kd sets by default, defined once.

This module imports nothing but ``os``, so that a script or test runner can load it by path and apply the defaults
before transformers and huggingface_hub read the environment (they read it once, when first imported).
"""

from __future__ import annotations

import os

LIBRARY_DEFAULTS = {"TRL_EXPERIMENTAL_SILENCE": "1"}
"""Set on ``import hf_kd``: the trainer builds on ``trl.experimental.gkd``, whose import-time notice is noise."""
OFFLINE_DEFAULTS = {
    **LIBRARY_DEFAULTS,
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
"""For the test suite and the benchmarks: no Hub calls, no telemetry, no tracker, no tokenizer threads."""


def apply_defaults(defaults: dict[str, str] = LIBRARY_DEFAULTS) -> None:
    """Set each variable of ``defaults`` that the environment does not set already."""
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
