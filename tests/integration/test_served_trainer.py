"""DistillationTrainer with a teacher served by a real vLLM server (the session's, conftest.py): the same first loss
as from a teacher cache of that teacher, an on-policy step with SCRG, and a server killed mid-run."""

import os
import signal

import pytest
import torch
from tiny import make_args, train_losses
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_kd import DistillationTrainer, cache_teacher, load_teacher_cache
from hf_kd.assets import make_layer_pruned_student
from hf_kd.data import load_bundled_dataset
from hf_kd.teachers import ServedTeacher, ServedTeacherError, ServedTeacherSource
from hf_kd.teachers.router import TEACHER_INDEX, rows_of

pytestmark = pytest.mark.vllm

MAX_LENGTH = 256
TOLERANCE = 1e-3  # fp32 vLLM vs fp32 transformers: log-probabilities within 2e-4


@pytest.fixture(scope="module")
def student_path(teacher_path, tmp_path_factory):
    return make_layer_pruned_student(teacher_path, 2, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def rows():
    return load_bundled_dataset("train").select(range(4))


def _trainer(student_path, teacher_model, train_dataset, tokenizer, tmp_path, **overrides) -> DistillationTrainer:
    args = make_args(
        tmp_path, **{"per_device_train_batch_size": 2, "max_length": MAX_LENGTH, "max_steps": 1, **overrides}
    )
    return DistillationTrainer(
        model=str(student_path),
        teacher_model=teacher_model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("kd_loss", ["fkl", "jsd"])  # jsd: the default recipe
def test_first_loss_from_the_server_equals_the_loss_from_a_cache_of_the_same_teacher(
    server, teacher_path, teacher_tokenizer, student_path, rows, max_logprobs, tmp_path, kd_loss
):
    folder = cache_teacher(
        str(teacher_path), teacher_tokenizer, rows, tmp_path / "cache", top_k=max_logprobs, value_dtype="float32",
        max_length=MAX_LENGTH, dtype=torch.float32, device="cpu", progress=False,
    )  # fmt: skip
    cached = _trainer(student_path, None, load_teacher_cache(folder), teacher_tokenizer, tmp_path, kd_loss=kd_loss)
    served = _trainer(
        student_path, server.url, rows, teacher_tokenizer, tmp_path, kd_loss=kd_loss, teacher_top_k=max_logprobs,
        teacher_model_name_or_path=str(teacher_path),
    )  # fmt: skip
    assert type(served.teacher_source) is ServedTeacherSource
    batch = next(iter(cached.get_train_dataloader()))  # the same token ids, scored by the server for `served`
    with torch.no_grad():
        from_cache = cached.compute_loss(cached.model, batch).item()
        from_server = served.compute_loss(served.model, batch).item()
    assert from_server == pytest.approx(from_cache, abs=TOLERANCE)


def test_an_on_policy_step_with_scrg_trains_from_the_server(server, teacher_tokenizer, student_path, rows, tmp_path):
    trainer = _trainer(
        student_path, server.url, rows, teacher_tokenizer, tmp_path, kd_loss="fkl", lmbda=1.0, scrg_corrections=1,
        max_new_tokens=16, teacher_top_k=20,
    )  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert any("scrg/corrected_tokens" in entry for entry in trainer.state.log_history)


def test_two_teachers_routed_by_a_column_one_served_one_live(
    server, teacher_path, teacher_tokenizer, student_path, rows, tmp_path
):
    """Rows routed to the server or to the same teacher loaded live: the routed loss is each alone on its rows,
    weighted by its share of the response tokens; training logs each teacher's part."""
    routed = rows.add_column("teacher", ["served", "live", "live", "served"])
    live = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    teachers = {"served": ServedTeacher(server.url, top_k=20), "live": live}
    options = {"kd_loss": "fkl", "per_device_train_batch_size": 4, "max_steps": 2}
    trainer = _trainer(student_path, teachers, routed, teacher_tokenizer, tmp_path, **options)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        from_router = trainer.compute_loss(trainer.model, batch).item()
    expected, total = 0.0, (batch["labels"][:, 1:] != -100).sum().item()
    for i, teacher in enumerate([ServedTeacher(server.url, top_k=20), live]):
        alone = _trainer(student_path, teacher, rows, teacher_tokenizer, tmp_path, **options)
        part = rows_of(batch, (batch[TEACHER_INDEX] == i).nonzero().flatten())
        with torch.no_grad():
            expected += alone.compute_loss(alone.model, part).item() * (part["labels"][:, 1:] != -100).sum() / total
    assert from_router == pytest.approx(float(expected), rel=1e-5)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all("loss/fkl/served" in e and "loss/fkl/live" in e for e in logged)
    assert all(e["teacher_tokens/served"] + e["teacher_tokens/live"] == pytest.approx(1.0) for e in logged)


class _KillAfterFirstStep(TrainerCallback):
    def __init__(self, server):
        self.server = server

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.process.wait(timeout=30)


def test_a_server_killed_mid_run_stops_training_naming_its_url_and_its_checkpoint_resumes_exactly(
    server_to_kill, new_server, teacher_tokenizer, student_path, rows, tmp_path
):
    """Runs last (it kills the session's server). A 2-step run checkpointing every step; the same run with the server
    killed after step 1 fails at step 2 after the client's retries, naming the URL; once a server is back (a new one,
    on another port) the run resumes from checkpoint-1 to the uninterrupted run's student. Without prefetching: the
    data loader collates step 2's batch during step 1, so its prefetched scores may arrive before the kill."""
    options = {"kd_loss": "fkl", "max_steps": 2, "save_strategy": "steps", "save_steps": 1, "teacher_prefetch": False}

    def client(url):
        return ServedTeacher(url, top_k=8, timeout=10, retries=2, backoff=0.1)

    url = server_to_kill.url
    uninterrupted = _trainer(student_path, client(url), rows, teacher_tokenizer, tmp_path / "a", **options)
    uninterrupted.train()
    killed = _trainer(student_path, client(url), rows, teacher_tokenizer, tmp_path / "b", **options)
    killed.add_callback(_KillAfterFirstStep(server_to_kill))
    with pytest.raises(ServedTeacherError, match="did not answer /v1/completions after 3 attempts") as error:
        killed.train()
    assert server_to_kill.url in str(error.value) and killed.state.global_step == 1
    with new_server() as back:
        resumed = _trainer(student_path, client(back.url), rows, teacher_tokenizer, tmp_path / "b", **options)
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
