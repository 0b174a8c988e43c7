"""Teacher sources: where the teacher's signal for a batch comes from, one protocol (``base.TeacherSource``) with
one file per source. ``DistillationTrainer`` picks one (``make_teacher_source``) and calls it once per batch.

* ``live.py``: a model in this process over the student's vocabulary (fused heads);
* ``topk.py``: top-k + tail rows rebuilt for the loss, the piece shared by ``cache.py`` (the offline teacher cache)
  and any source that delivers top-k log-probabilities;
* ``bridge.py``: a live teacher through a bridge (DSKD, same or different vocabulary), which computes the loss;
* ``served.py``: a client of a vLLM server that scores the student's token ids and returns the teacher's top-k
  in the teacher cache's layout (``ServedTeacher``);
* ``served_source.py``: that client as a source (``ServedTeacherSource``): the cache's loss on each batch's served
  top-k, and generated sequences scored too (on-policy, SCRG);
* ``router.py``: several teachers, each row routed to the one its dataset column names (``TeacherRouter``).

A new source is one file here and one branch in ``select.make_teacher_source``.
"""

from .base import LogitSpaceSource, TeacherLogits, TeacherSource, terms_fed_by
from .bridge import BridgeTeacher
from .cache import TeacherCache
from .live import LiveTeacher
from .router import TeacherRouter
from .select import load_teacher, make_teacher_source
from .served import ServedScores, ServedTeacher, ServedTeacherError
from .served_source import ServedTeacherSource
from .topk import TopKTeacher

__all__ = [
    "BridgeTeacher",
    "LiveTeacher",
    "LogitSpaceSource",
    "ServedScores",
    "ServedTeacher",
    "ServedTeacherError",
    "ServedTeacherSource",
    "TeacherCache",
    "TeacherLogits",
    "TeacherRouter",
    "TeacherSource",
    "TopKTeacher",
    "load_teacher",
    "make_teacher_source",
    "terms_fed_by",
]
