"""Bridges between teacher and student hidden spaces: DSKD (arXiv 2406.17328) and its cross-model attention."""

from .cma import CrossModelAttention
from .dskd import DSKD_DEFAULT_TEMPERATURE, DSKDBridge
from .tokenization import PLAIN_CHAT_TEMPLATE, DualTokenizationCollator

__all__ = [
    "DSKD_DEFAULT_TEMPERATURE",
    "PLAIN_CHAT_TEMPLATE",
    "CrossModelAttention",
    "DSKDBridge",
    "DualTokenizationCollator",
]
