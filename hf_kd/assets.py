"""Where ``load_real_model`` and ``make_layer_pruned_student`` were first imported from: ``from hf_kd.assets import
...`` in existing code keeps working. Their homes are ``hf_kd.real_models`` (GGUF packages converted to plain
folders) and ``hf_kd.layer_pruning`` (students cut from a teacher's layers); new code imports from there or from
``hf_kd``."""

from .layer_pruning import (
    block_influence,
    calibration_conversations,
    evenly_spaced_layers,
    influential_layers,
    make_layer_pruned_student,
    prune_layers,
    student_layers,
)
from .real_models import MARKER_FILE, PLAIN_CHAT_TEMPLATE, REAL_MODELS, RealModelSpec, cache_root, load_real_model

__all__ = [
    "MARKER_FILE",
    "PLAIN_CHAT_TEMPLATE",
    "REAL_MODELS",
    "RealModelSpec",
    "block_influence",
    "calibration_conversations",
    "cache_root",
    "evenly_spaced_layers",
    "influential_layers",
    "load_real_model",
    "make_layer_pruned_student",
    "prune_layers",
    "student_layers",
]
