"""Where training sequences come from: on-policy/teacher generation and the callbacks that revise it."""

from .callbacks import GeneratedBatch, GenerationCallback, GenerationContext
from .step import RolloutStep

__all__ = ["GeneratedBatch", "GenerationCallback", "GenerationContext", "RolloutStep"]
