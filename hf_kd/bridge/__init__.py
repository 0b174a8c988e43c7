"""Bridges between teacher and student hidden spaces: DSKD (arXiv 2406.17328) and its cross-model attention.

Every module of this package is imported here, which registers its bridges (``BRIDGE_REGISTRY``).
"""

import importlib
import pkgutil

from .cma import CrossModelAttention
from .dskd import DSKD_DEFAULT_TEMPERATURE, DSKDBridge
from .registry import BRIDGE_REGISTRY, bridge_class, register_bridge
from .tokenization import PLAIN_CHAT_TEMPLATE, DualTokenizationCollator

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BRIDGE_REGISTRY",
    "DSKD_DEFAULT_TEMPERATURE",
    "PLAIN_CHAT_TEMPLATE",
    "CrossModelAttention",
    "DSKDBridge",
    "DualTokenizationCollator",
    "bridge_class",
    "register_bridge",
]
