"""Offline teacher: run the teacher once, store its top-k next-token distributions, distill without it.

``cache_teacher`` writes a cache, ``load_teacher_cache`` reads and checks one, and ``DistillationTrainer``
trains from it with ``teacher_model=None``. ``encoding.py`` documents the format and its reconstruction.
"""

from .dataset import TeacherCacheCollator, cache_manifest, load_teacher_cache
from .encoding import CacheEncoding, TopKReconstruction, reconstruction_kl
from .writer import cache_teacher

__all__ = [
    "CacheEncoding",
    "TeacherCacheCollator",
    "TopKReconstruction",
    "cache_manifest",
    "cache_teacher",
    "load_teacher_cache",
    "reconstruction_kl",
]
