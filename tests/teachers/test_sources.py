"""Teacher sources (hf_kd.teachers): which one a run gets, what each can feed, and that a cache's capabilities come
from what the loss terms declare rather than from a list."""

import pytest
import torch
from datasets import Dataset
from tiny import make_args, make_conversations, make_model, make_tokenizer
from trl.experimental.utils import DataCollatorForChatML

from hf_kd import DistillationTrainer, cache_teacher, load_teacher_cache
from hf_kd.bridge import DualTokenizationCollator
from hf_kd.formats import FormatCollator
from hf_kd.losses import LOSS_REGISTRY, TeacherSignal, TokenLoss
from hf_kd.teacher_cache import TeacherCacheCollator
from hf_kd.teachers import BridgeTeacher, LiveTeacher, TeacherCache, make_teacher_source, terms_fed_by

ALL = frozenset(TeacherSignal)


@pytest.fixture
def cache(tmp_path, tokenizer, train_dataset):
    teacher = make_model(len(tokenizer), hidden=64, layers=2, seed=2, origin="someone/teacher")
    folder = cache_teacher(teacher, tokenizer, train_dataset, tmp_path / "cache", top_k=8, progress=False)
    return load_teacher_cache(folder)


def _chat_collator(collator, chat_type) -> bool:
    """TRL's formats are normalised per row (FormatCollator) in front of the source's chat collator."""
    return isinstance(collator, FormatCollator) and isinstance(collator.collator, chat_type)


def _source(teacher_model, train_dataset, tokenizer, tmp_path, student=None, teacher_tokenizer=None, **overrides):
    student = student if student is not None else make_model(len(tokenizer), hidden=32, layers=1, seed=1)
    args = make_args(tmp_path, **overrides)
    return make_teacher_source(teacher_model, student, train_dataset, None, args, tokenizer, teacher_tokenizer), args


def test_a_teacher_model_gives_a_live_teacher_with_every_capability(tmp_path, tokenizer, teacher, train_dataset):
    source, args = _source(teacher, train_dataset, tokenizer, tmp_path)
    assert type(source) is LiveTeacher and source.model is teacher
    assert source.signals == ALL and source.scores_generated and source.generates
    assert _chat_collator(source.collator(tokenizer, args), DataCollatorForChatML)
    assert source.modules() == {}


def test_no_teacher_and_a_cache_give_the_cache_which_feeds_only_top_k_terms(tmp_path, tokenizer, cache):
    source, args = _source(None, cache, tokenizer, tmp_path)
    assert type(source) is TeacherCache and source.model is None
    assert source.signals == {TeacherSignal.NOTHING, TeacherSignal.TOP_K}
    assert not source.scores_generated and not source.generates
    assert isinstance(source.collator(tokenizer, args), TeacherCacheCollator)
    assert source.teacher_name == "someone/teacher"  # for the model card


def test_a_bridge_gives_a_bridge_source_that_generates_only_over_a_shared_vocabulary(
    tmp_path, tokenizer, teacher, train_dataset
):
    same, args = _source(teacher, train_dataset, tokenizer, tmp_path, bridge="dskd")
    assert type(same) is BridgeTeacher and same.generates and same.scores_generated
    assert _chat_collator(same.collator(tokenizer, args), DataCollatorForChatML)
    other_tokenizer = make_tokenizer(extra_words=["zebra"])
    other_teacher = make_model(len(other_tokenizer), hidden=48, layers=2, seed=2)
    cross, args = _source(
        other_teacher, train_dataset, tokenizer, tmp_path, teacher_tokenizer=other_tokenizer, bridge="dskd"
    )
    assert type(cross) is BridgeTeacher and not cross.generates and cross.scores_generated
    assert _chat_collator(cross.collator(tokenizer, args), DualTokenizationCollator)
    with pytest.raises(ValueError, match="own tokenizer.*seq_kd generates with the teacher"):
        _source(
            other_teacher,
            train_dataset,
            tokenizer,
            tmp_path,
            teacher_tokenizer=other_tokenizer,
            bridge="dskd",
            seq_kd=True,
        )


def test_the_trainer_uses_its_source_for_the_collator_the_trained_modules_and_the_teacher(
    tmp_path, tokenizer, student, teacher, train_dataset
):
    args = make_args(tmp_path, bridge="dskd", max_steps=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
    source = trainer.teacher_source
    assert type(source) is BridgeTeacher and trainer.loss_fn is None
    assert trainer.teacher_model is source.model and not trainer.teacher_model.training
    assert trainer.distillation_modules() == {"bridge": source.bridge}
    assert _chat_collator(trainer.data_collator, DataCollatorForChatML)


def test_the_cache_feeds_exactly_the_terms_whose_declared_signal_it_provides(tmp_path, tokenizer, cache):
    source, _ = _source(None, cache, tokenizer, tmp_path)
    fed = terms_fed_by(source.signals)
    declared = {name for name, cls in LOSS_REGISTRY.items() if cls.teacher_needs in source.signals}
    assert set(fed) == declared
    assert {"fkl", "rkl", "jsd", "akl", "ce", "tvd"} <= set(fed)  # tvd was missing from the old hand-written list
    assert not {"bild", "prompt_fkl"} & set(fed)


class _TopKTermForTests(TokenLoss):
    """A new divergence declaring that the teacher's top-k and tail suffice."""

    teacher_needs = TeacherSignal.TOP_K

    def per_token(self, rows):
        return (rows.teacher_probs() * (rows.teacher_logprobs() - rows.student_logprobs())).sum(-1)


class _FullRowsTermForTests(_TopKTermForTests):
    """The same formula, declaring that it reads the teacher's full rows."""

    teacher_needs = TeacherSignal.FULL_ROWS


def test_a_new_top_k_term_is_accepted_from_a_cache_without_editing_any_list(tmp_path, tokenizer, cache, monkeypatch):
    monkeypatch.setitem(LOSS_REGISTRY, "top_k_term_for_tests", _TopKTermForTests)
    monkeypatch.setitem(LOSS_REGISTRY, "full_rows_term_for_tests", _FullRowsTermForTests)
    for cls in (_TopKTermForTests, _FullRowsTermForTests):
        monkeypatch.setattr(cls, "name", [n for n, c in LOSS_REGISTRY.items() if c is cls][0], raising=False)
    source, _ = _source(None, cache, tokenizer, tmp_path)
    assert "top_k_term_for_tests" in terms_fed_by(source.signals)
    source.check_terms([_TopKTermForTests()])  # accepted: nothing lists it
    with pytest.raises(
        ValueError, match="'full_rows_term_for_tests' needs the teacher's logits.*top_k_term_for_tests"
    ):
        source.check_terms([_FullRowsTermForTests()])
    live, _ = _source(
        make_model(len(tokenizer), hidden=64, layers=2, seed=2),
        Dataset.from_list(make_conversations(4)),
        tokenizer,
        tmp_path,
    )
    live.check_terms([_TopKTermForTests(), _FullRowsTermForTests()])  # a live teacher feeds both


def test_a_cache_run_disables_the_students_dropout_as_a_live_run_does(tmp_path, tokenizer, cache):
    student = make_model(len(tokenizer), hidden=32, layers=1, seed=1)
    student.model.extra_dropout = torch.nn.Dropout(0.5)  # Llama has none of its own: an nn.Dropout to switch off
    DistillationTrainer(
        model=student, teacher_model=None, args=make_args(tmp_path), train_dataset=cache, processing_class=tokenizer
    )
    assert student.model.extra_dropout.p == 0
