"""Several teachers routed by a dataset column (hf_kd.teachers.TeacherRouter): the loss is the one-teacher loss of
each teacher's rows over the whole batch's count, refusals come before training, and checkpoints record the teachers.

tests/integration/test_served_trainer.py routes rows between a real vLLM server and a live teacher.
"""

import json

import pytest
import torch
from datasets import Dataset
from served_fake import FakeServer, vllm_responder
from tiny import make_args, make_conversations, make_model

from hf_kd import DistillationTrainer
from hf_kd.hub import TEACHERS_FILE
from hf_kd.teachers import ServedTeacher, TeacherRouter
from hf_kd.teachers.router import TEACHER_INDEX, rows_of

ROUTES = ["code", "chat", "chat", "code", "chat", "chat", "code", "chat"]


@pytest.fixture
def teachers(tokenizer):
    """Two different tiny teachers over the student's vocabulary."""
    return {
        "code": make_model(len(tokenizer), hidden=64, layers=2, seed=2, origin="someone/code-teacher"),
        "chat": make_model(len(tokenizer), hidden=48, layers=2, seed=3, origin="someone/chat-teacher"),
    }


def _routed(n: int = 24, routes: list[str] = ROUTES) -> Dataset:
    rows = make_conversations(n, seed=0)
    return Dataset.from_list([{**row, "teacher": routes[i % len(routes)]} for i, row in enumerate(rows)])


def _trainer(tmp_path, tokenizer, teacher_model, train_dataset, **overrides) -> DistillationTrainer:
    return DistillationTrainer(
        model=make_model(len(tokenizer), hidden=32, layers=1, seed=1),
        teacher_model=teacher_model,
        args=make_args(tmp_path, **{"max_steps": 2, "kd_loss": "fkl+0.5*rkl", **overrides}),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


def _first_batch(trainer: DistillationTrainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_the_loss_is_each_teachers_rows_over_the_whole_batch(tmp_path, tokenizer, teachers):
    router = _trainer(tmp_path, tokenizer, teachers, _routed())
    assert isinstance(router.teacher_source, TeacherRouter) and router.teacher_model is None
    batch = _first_batch(router)
    assert set(batch[TEACHER_INDEX].tolist()) == {0, 1}  # rows of both teachers (the sampler shuffles)
    with torch.no_grad():
        routed = router.compute_loss(router.model, batch).item()
    # Reference: each teacher alone on its rows (divided by its rows' count), weighted by its share of the tokens.
    expected, total = 0.0, (batch["labels"][:, 1:] != -100).sum().item()
    for i, name in enumerate(teachers):
        single = _trainer(tmp_path, tokenizer, teachers[name], Dataset.from_list(make_conversations(8)))
        rows = rows_of(batch, (batch[TEACHER_INDEX] == i).nonzero().flatten())
        count = (rows["labels"][:, 1:] != -100).sum().item()
        with torch.no_grad():
            expected += single.compute_loss(single.model, rows).item() * count / total
    assert routed == pytest.approx(expected, rel=1e-5)
    values = router._metrics["train"]
    for term in ("fkl", "rkl"):  # each teacher's part of a term sums to the term
        parts = values[f"loss/{term}/code"][-1] + values[f"loss/{term}/chat"][-1]
        assert parts == pytest.approx(values[f"loss/{term}"][-1], rel=1e-6)
    shares = values["teacher_tokens/code"][-1] + values["teacher_tokens/chat"][-1]
    assert shares == pytest.approx(1.0) and 0 < values["teacher_tokens/code"][-1] < 1


def test_one_teacher_for_every_row_gives_that_teachers_loss(tmp_path, tokenizer, teachers):
    router = _trainer(tmp_path, tokenizer, teachers, _routed(routes=["chat"]))
    single = _trainer(tmp_path, tokenizer, teachers["chat"], Dataset.from_list(make_conversations(24)))
    batch = _first_batch(router)
    with torch.no_grad():
        routed = router.compute_loss(router.model, batch).item()
        alone = single.compute_loss(single.model, {k: v for k, v in batch.items() if k != TEACHER_INDEX}).item()
    assert routed == pytest.approx(alone, rel=1e-6)
    assert router._metrics["train"]["teacher_tokens/code"][-1] == 0.0


def test_gradient_accumulation_gives_the_same_update(tmp_path, tokenizer, teachers):
    """8 rows as one batch or as 4 micro-batches of 2 (rows of one micro-batch may all go to one teacher)."""
    students = []
    for batch_size, steps in ((8, 1), (2, 4)):
        trainer = _trainer(
            tmp_path / str(batch_size),
            tokenizer,
            teachers,
            _routed(8),
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=steps,
            learning_rate=1e-3,
            max_grad_norm=0.0,
        )
        trainer.train()
        students.append(trainer.model)
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_rows_naming_no_known_teacher_are_refused_before_training(tmp_path, tokenizer, teachers):
    unknown = r"6 rows whose 'teacher' names no teacher \(row 3: 'math'.*\['code', 'chat'\]"
    with pytest.raises(ValueError, match=unknown):
        _trainer(tmp_path, tokenizer, teachers, _routed(routes=["code", "chat", "chat", "math"] * 2))
    with pytest.raises(ValueError, match="has no column 'domain' naming each row's teacher"):
        _trainer(tmp_path, tokenizer, teachers, _routed(), teacher_column="domain")
    with pytest.raises(ValueError, match="empty dict"):
        _trainer(tmp_path, tokenizer, {}, _routed())
    with pytest.raises(ValueError, match=r"teacher_model\['chat'\] is None: give each name one teacher"):
        _trainer(tmp_path, tokenizer, {"code": teachers["code"], "chat": None}, _routed())


@pytest.mark.parametrize(
    "overrides, needs",
    [({"seq_kd": True}, "seq_kd generates"), ({"scrg_corrections": 1}, "SCRG"), ({"bridge": "dskd"}, "bridge")],
)
def test_what_needs_one_teacher_per_sequence_is_refused(tmp_path, tokenizer, teachers, overrides, needs):
    with pytest.raises(ValueError, match=f"With several teachers \\(code, chat\\).*{needs}"):
        _trainer(tmp_path, tokenizer, teachers, _routed(), **overrides)


def test_on_policy_steps_route_generated_rows(tmp_path, tokenizer, teachers):
    trainer = _trainer(tmp_path, tokenizer, teachers, _routed(), lmbda=1.0, max_steps=2)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss/fkl/code" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)


def test_checkpoints_record_the_teachers_and_resume_only_with_them(tmp_path, tokenizer, teachers):
    args = {"save_strategy": "steps", "save_steps": 1, "max_steps": 2}
    full = _trainer(tmp_path / "full", tokenizer, teachers, _routed(), **args)
    full.train()
    record = json.loads((tmp_path / "full" / "out" / "checkpoint-1" / TEACHERS_FILE).read_text())
    teachers_by_name = {"code": "someone/code-teacher", "chat": "someone/chat-teacher"}
    assert record == {"column": "teacher", "teachers": teachers_by_name}
    resumed = _trainer(tmp_path / "full", tokenizer, teachers, _routed(), **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-1"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)
    swapped = _trainer(tmp_path / "full", tokenizer, {"code": teachers["chat"], "chat": teachers["code"]}, _routed())
    with pytest.raises(ValueError, match="was trained with the teachers .* but this run has"):
        swapped.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-1"))
    card = full.model_card_data()
    assert card.teacher_model == "code: someone/code-teacher, chat: someone/chat-teacher"


def test_a_served_teacher_and_a_live_one_route_together(tmp_path, tokenizer, teachers):
    """The chat teacher served (every token sent, so nothing is rebuilt) gives the loss of the all-live router."""
    with FakeServer(vllm_responder(teachers["chat"].eval(), tokenizer)) as server:
        served = ServedTeacher(server.url, top_k=len(tokenizer))
        mixed = _trainer(tmp_path, tokenizer, {"code": teachers["code"], "chat": served}, _routed())
        live = _trainer(tmp_path, tokenizer, teachers, _routed())
        batch = _first_batch(live)
        with torch.no_grad():
            from_mixed = mixed.compute_loss(mixed.model, batch).item()
            from_live = live.compute_loss(live.model, batch).item()
    assert from_mixed == pytest.approx(from_live, rel=1e-4)
