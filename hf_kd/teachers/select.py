"""Which teacher source a run has, decided once from what the trainer was given."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM

from ..model_loading import config_kwargs, init_kwargs
from ..teacher_cache import cache_manifest
from ..validation import check_conversational, check_vocabularies
from .base import TeacherSource
from .bridge import BridgeTeacher
from .cache import TeacherCache
from .live import LiveTeacher
from .router import TeacherRouter
from .served import ServedTeacher
from .served_source import ServedTeacherSource, is_served_url


def load_teacher(teacher_model: nn.Module | str | None, args: Any) -> nn.Module:
    """The teacher as a model: loaded from a path/id with `teacher_model_init_kwargs` when given as a string."""
    if teacher_model is None:
        raise ValueError(
            "DistillationTrainer needs a `teacher_model` (a model or a path/Hub id), or a teacher cache as "
            "train_dataset (hf_kd.cache_teacher, then hf_kd.load_teacher_cache)."
        )
    if not isinstance(teacher_model, str):
        if args.teacher_model_init_kwargs:
            raise ValueError("`teacher_model_init_kwargs` is only used when `teacher_model` is a path or id string.")
        return teacher_model
    kwargs = init_kwargs(args.teacher_model_init_kwargs, "auto", args.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(teacher_model, **kwargs)


def served_source(
    teacher: ServedTeacher | str, args: Any, tokenizer: Any, teacher_tokenizer: Any, model_name: str | None
) -> ServedTeacherSource:
    """A served teacher (a URL with ``args.teacher_top_k``, or a configured client), checked against the student's
    tokenizer and, when ``model_name`` names a model rather than the URL, that model's name."""
    if args.teacher_model_init_kwargs or teacher_tokenizer is not None:
        raise ValueError(
            "A served teacher is loaded and tokenized by its server: drop `teacher_model_init_kwargs` and "
            "`teacher_processing_class` (it must share the student's tokenizer, which is checked)."
        )
    client = ServedTeacher(teacher, top_k=args.teacher_top_k) if isinstance(teacher, str) else teacher
    name = None if is_served_url(model_name) else model_name
    return ServedTeacherSource(client, args.teacher_cache_tail, tokenizer, name)


def make_teacher_source(
    teacher_model: nn.Module | ServedTeacher | str | dict[str, Any] | None,
    model: nn.Module | str,
    train_dataset: Any,
    eval_dataset: Any,
    args: Any,
    tokenizer: Any,
    teacher_tokenizer: Any = None,
) -> TeacherSource:
    """The run's teacher source: several teachers routed by a dataset column (a dict of any of the following,
    ``TeacherRouter``), a served teacher (an http(s) URL or a ``ServedTeacher``), a teacher cache
    (``teacher_model=None`` and a cache as ``train_dataset``), a bridge (``args.bridge``), or a live teacher
    (``teacher_model``, else GKDConfig's ``teacher_model_name_or_path``); its options checked against the run
    (``check_args``). The datasets come checked (``validation.check_dataset``).
    """
    if teacher_model is None and args.teacher_model_name_or_path is not None:  # GKDConfig's teacher field
        teacher_model = args.teacher_model_name_or_path
    if isinstance(teacher_model, dict):
        for name, teacher in teacher_model.items():
            if teacher is None or isinstance(teacher, dict):
                raise ValueError(
                    f"teacher_model[{name!r}] is {teacher!r}: give each name one teacher (a model, a path or Hub id, "
                    "a server URL or a ServedTeacher)."
                )
        parts = {
            str(name): one_source(teacher, model, train_dataset, eval_dataset, args, tokenizer, teacher_tokenizer)
            for name, teacher in teacher_model.items()
        }
        source: TeacherSource = TeacherRouter(parts, args.teacher_column)
        source.check_dataset(train_dataset, "train_dataset")
        source.check_dataset(eval_dataset, "eval_dataset")
    else:
        served_name = args.teacher_model_name_or_path
        source = one_source(
            teacher_model, model, train_dataset, eval_dataset, args, tokenizer, teacher_tokenizer, served_name
        )
    source.check_args(args)
    return source


def one_source(
    teacher_model: nn.Module | ServedTeacher | str | None,
    model: nn.Module | str,
    train_dataset: Any,
    eval_dataset: Any,
    args: Any,
    tokenizer: Any,
    teacher_tokenizer: Any = None,
    served_name: str | None = None,
) -> TeacherSource:
    """One teacher's source (see ``make_teacher_source``); ``served_name`` the model a server must serve."""
    manifest = cache_manifest(train_dataset) if teacher_model is None else None
    if is_served_url(teacher_model) or isinstance(teacher_model, ServedTeacher):
        return served_source(teacher_model, args, tokenizer, teacher_tokenizer, served_name)
    if manifest is not None:
        if eval_dataset is not None and cache_manifest(eval_dataset) is None:
            raise ValueError("Without a teacher, eval_dataset must be a teacher cache too (load_teacher_cache).")
        return TeacherCache(manifest, args.teacher_cache_tail)
    teacher = load_teacher(teacher_model, args)
    student_config = config_kwargs(args.model_init_kwargs, args.trust_remote_code)
    cross = check_vocabularies(model, teacher, tokenizer, teacher_tokenizer, args.bridge, student_config)
    if cross:  # the bridge's collator re-renders each conversation in the teacher's chat format
        check_conversational(train_dataset, "train_dataset")
        check_conversational(eval_dataset, "eval_dataset")
    if args.bridge is not None:
        return BridgeTeacher(teacher, args, teacher_tokenizer if cross else None)
    return LiveTeacher(teacher)
