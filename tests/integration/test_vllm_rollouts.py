"""Student rollouts from a real vLLM server (CPU build, fp32): a 2-layer SmolLM2 student served with the weight-sync
extension, started as hf_kd starts it (``start_student_server``). Greedy rollouts equal ``generate``'s token for token
before and after an optimizer step and its weight push, the on-policy loss on them equals the loss on generate's,
a run resumes exactly (the engine re-synced from the checkpoint), and seq_kd from the served teacher (the session's
server) generates what the same teacher generates in this process. A bf16 engine of its own checks weight pushes."""

import pytest
import torch
from tiny import make_args
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_kd import DistillationTrainer
from hf_kd.assets import make_layer_pruned_student
from hf_kd.data import load_bundled_dataset
from hf_kd.rollout.backend import TransformersBackend
from hf_kd.rollout.select import start_student_server
from hf_kd.rollout.vllm_backend import VLLMServerBackend
from hf_kd.rollout.weight_sync import METHOD, WeightSync, fingerprint, merged_state_dict

pytestmark = pytest.mark.vllm

MAX_LENGTH, NEW_TOKENS = 256, 24
ROLLOUT_KEYS = ("input_ids", "attention_mask", "labels")


@pytest.fixture(scope="module")
def student_path(teacher_path, tmp_path_factory):
    return make_layer_pruned_student(teacher_path, 2, tmp_path_factory.mktemp("rollout-student"))


@pytest.fixture(scope="module")
def rows():
    return load_bundled_dataset("train").select(range(8))


@pytest.fixture(scope="module")
def student_server(student_path, teacher_tokenizer, vllm_python, tmp_path_factory):
    """A server for the student, as hf_kd starts one when `vllm_server_url` is None; stopped by its pid."""
    folder = tmp_path_factory.mktemp("served-student")
    args = make_args(folder, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS, vllm_python=str(vllm_python),
                     use_vllm=True)  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    server = start_student_server(args, student, teacher_tokenizer, folder / "weights")
    yield server
    server.stop()


def _trainer(student_path, teacher, rows, tokenizer, tmp_path, url, **overrides) -> DistillationTrainer:
    args = make_args(
        tmp_path,
        **{
            "per_device_train_batch_size": 4, "max_length": MAX_LENGTH, "max_new_tokens": NEW_TOKENS, "max_steps": 1,
            "lmbda": 1.0, "learning_rate": 1e-3, "kd_loss": "fkl", "use_vllm": True, "vllm_server_url": url,
            **overrides,
        },
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    return DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=rows,
                               processing_class=tokenizer)  # fmt: skip


def _greedy_rollouts(trainer, batch):
    """The student's greedy rollouts of ``batch`` from the run's backend and from transformers' generate."""
    trainer.generation_config.do_sample = False
    served = trainer._rollout(trainer.model, batch, "student")
    backend, trainer.rollout_backend = trainer.rollout_backend, TransformersBackend()
    generated = trainer._rollout(trainer.model, batch, "student")
    trainer.rollout_backend = backend
    trainer.generation_config.do_sample = True
    return served, generated


@pytest.fixture(scope="module")
def teacher(teacher_path):
    return AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)


def test_greedy_rollouts_equal_generate_before_and_after_a_step_and_its_weight_push(
    student_server, student_path, teacher, rows, teacher_tokenizer, tmp_path
):
    trainer = _trainer(student_path, teacher, rows, teacher_tokenizer, tmp_path, student_server.url)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.rollout_backend.sync(trainer.model)
    before, generated = _greedy_rollouts(trainer, batch)
    for key in ROLLOUT_KEYS:
        assert torch.equal(before[key], generated[key]), key
    assert (before["labels"] != -100).sum() > 4 * 4
    # the on-policy loss on the server's rollout is the loss on generate's
    with torch.no_grad():
        on_served = trainer.compute_loss(trainer.model, before).item()
        on_generated = trainer.compute_loss(trainer.model, generated).item()
    assert on_served == on_generated

    trainer.train()  # one step; the callback pushes the updated weights
    after, generated = _greedy_rollouts(trainer, batch)
    for key in ROLLOUT_KEYS:
        assert torch.equal(after[key], generated[key]), key
    assert not torch.equal(after["input_ids"], before["input_ids"])  # the engine follows the student
    assert trainer.rollout_backend.syncer.seconds > 0


class _StopAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def test_a_run_with_vllm_rollouts_resumes_exactly(
    student_server, student_path, teacher, rows, teacher_tokenizer, tmp_path
):
    """Sampled rollouts (per-row seeds from torch's generator). The interrupted run stops after step 1; the
    uninterrupted one then leaves step 2's weights in the engine, which the resumed run must replace with the
    checkpoint's before its step 2."""
    options = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "per_device_train_batch_size": 2}
    url = student_server.url
    interrupted = _trainer(student_path, teacher, rows, teacher_tokenizer, tmp_path / "b", url, **options)
    interrupted.add_callback(_StopAfterFirstStep())
    interrupted.train()
    assert interrupted.state.global_step == 1
    uninterrupted = _trainer(student_path, teacher, rows, teacher_tokenizer, tmp_path / "a", url, **options)
    uninterrupted.train()
    resumed = _trainer(student_path, teacher, rows, teacher_tokenizer, tmp_path / "b", url, **options)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_seq_kd_from_the_served_teacher_generates_as_the_teacher_does_here(
    server, teacher, rows, student_path, teacher_tokenizer, tmp_path
):
    args = make_args(tmp_path, per_device_train_batch_size=4, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS,
                     max_steps=1, seq_kd=True, kd_loss="fkl", teacher_top_k=20)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    trainer = DistillationTrainer(model=model, teacher_model=server.url, args=args, train_dataset=rows,
                                  processing_class=teacher_tokenizer)  # fmt: skip
    assert isinstance(trainer.teacher_rollout_backend, VLLMServerBackend)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.generation_config.do_sample = False
    served = trainer._rollout(trainer.model, batch, "teacher")
    prompts, mask = batch["prompts"], batch["prompt_attention_mask"]
    here = TransformersBackend().generate(teacher, prompts, mask, trainer.generation_config)
    assert torch.equal(served["input_ids"], here)
    trainer.generation_config.do_sample = True
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))


def test_sampled_rollouts_of_more_prompt_tokens_than_one_engine_step_takes(
    student_server, student_path, teacher, teacher_tokenizer, tmp_path
):
    """Per-row seeds with more prompt tokens than an engine step schedules (2048): with split prefills the CPU build's
    engine died on them ("CPU Generator does not use offset"); the servers hf_kd starts take whole prefills only.
    The same seeds sample the same rollouts again."""
    rows = load_bundled_dataset("train").select(range(48))
    trainer = _trainer(student_path, teacher, rows, teacher_tokenizer, tmp_path, student_server.url,
                       per_device_train_batch_size=48)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["prompt_attention_mask"].sum() > 2048
    torch.manual_seed(0)
    first = trainer._rollout(trainer.model, batch, "student")
    torch.manual_seed(0)
    again = trainer._rollout(trainer.model, batch, "student")
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert (first["labels"] != -100).sum() > 48 * 4


def test_a_bf16_engine_takes_pushes_and_its_answer_tells_stale_weights_from_new(
    student_path, teacher_tokenizer, vllm_python, tmp_path
):
    """bf16, as on a GPU: each push's check passes against the engine's own bf16 kernels, and an engine left on the
    weights before a small update (one Adam-sized step, 1e-3 per weight) answers another sum than the new weights."""
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.bfloat16)
    args = make_args(tmp_path, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS, vllm_python=str(vllm_python),
                     use_vllm=True)  # fmt: skip
    server = start_student_server(args, student, teacher_tokenizer, tmp_path / "served")
    try:
        backend = VLLMServerBackend(server.url, retries=0)
        sync = WeightSync(str(tmp_path / "pushed"))
        sync.push(student, backend)
        student.save_pretrained(tmp_path / "old")
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(1e-3 * torch.randn_like(parameter).sign())
        sync.push(student, backend)  # passes: the engine computes with the updated weights
        probe = sync.pushes
        stale = backend.request(
            "/collective_rpc", {"method": METHOD, "kwargs": {"weights_path": str(tmp_path / "old"), "probe": probe}}
        )["results"][0]
        assert stale["dtype"] == "bfloat16"
        plain, state = merged_state_dict(student)
        assert abs(stale["sum"] - fingerprint(plain, state, torch.bfloat16, probe)) > 1e-3
        sync.push(student, backend)  # and back on the new weights
    finally:
        server.stop()
