"""Teacher sources: where the teacher's signal for a batch comes from (here: a teacher served over HTTP)."""

from .served import ServedScores, ServedTeacher, ServedTeacherError

__all__ = ["ServedScores", "ServedTeacher", "ServedTeacherError"]
