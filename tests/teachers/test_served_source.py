"""A served teacher as a teacher source, against a local server that answers as vLLM does from a tiny teacher.

tests/integration/test_served_trainer.py trains against a real vLLM server.
"""

import pytest
import torch
from served_fake import FakeServer, vllm_responder
from tiny import make_args, make_model, train_losses

from hf_kd import DistillationTrainer, distill
from hf_kd.losses import TeacherSignal
from hf_kd.rollout.scrg import completion_logits
from hf_kd.teacher_cache import TopKReconstruction
from hf_kd.teachers import ServedTeacher, ServedTeacherError, ServedTeacherSource, terms_fed_by
from hf_kd.teachers.prefetch import PREFETCHED, PrefetchingCollator


@pytest.fixture
def server(tokenizer, teacher):
    with FakeServer(vllm_responder(teacher.eval(), tokenizer)) as running:
        yield running


def _trainer(tmp_path, tokenizer, train_dataset, teacher_model, **overrides) -> DistillationTrainer:
    """A one-step run; a served teacher's top-k is 8 of the tiny vocabulary's 29 tokens unless given."""
    return DistillationTrainer(
        model=make_model(len(tokenizer), hidden=32, layers=1, seed=1),
        teacher_model=teacher_model,
        args=make_args(tmp_path, **{"max_steps": 1, "teacher_top_k": 8, **overrides}),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


def _first_loss(trainer: DistillationTrainer) -> float:
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_a_url_gives_a_served_source_checked_against_the_server(tmp_path, tokenizer, train_dataset, server):
    trainer = _trainer(tmp_path, tokenizer, train_dataset, server.url, teacher_top_k=7)
    source = trainer.teacher_source
    assert type(source) is ServedTeacherSource and trainer.teacher_model is None
    assert source.client.url == server.url and source.client.top_k == 7
    assert source.signals == {TeacherSignal.NOTHING, TeacherSignal.TOP_K}
    assert source.scores_generated and source.generates  # seq_kd: through its server (tests/test_rollout_vllm.py)
    assert source.teacher_name == "teacher"  # the served model, for the model card
    # Checked at construction: the served model, the probe text's tokenization, one scoring request.
    assert [path for path, _ in server.requests] == ["/v1/models", "/tokenize", "/v1/completions"]


@pytest.mark.parametrize("kd_loss", terms_fed_by(frozenset({TeacherSignal.TOP_K})) + ["jsd+0.5*ce"])
def test_first_loss_from_the_server_equals_the_live_teachers_at_k_equal_vocabulary(
    tmp_path, tokenizer, teacher, train_dataset, server, kd_loss
):
    """With every token sent (k = vocabulary) nothing is rebuilt: each term the server feeds gives the live loss."""
    served = ServedTeacher(server.url, top_k=len(tokenizer))
    from_server = _first_loss(_trainer(tmp_path, tokenizer, train_dataset, served, kd_loss=kd_loss))
    live = _first_loss(_trainer(tmp_path, tokenizer, train_dataset, teacher, kd_loss=kd_loss))
    assert from_server == pytest.approx(live, rel=1e-4, abs=1e-5)
    assert server.requests[-1][0] == "/v1/completions"


def test_terms_and_options_a_server_cannot_feed_are_refused_naming_it(tmp_path, tokenizer, train_dataset, server):
    full_rows = terms_fed_by(frozenset({TeacherSignal.FULL_ROWS}))[0]
    with pytest.raises(ValueError, match=f"'{full_rows}' needs .* served teacher at {server.url} holds .* top-k"):
        _trainer(tmp_path, tokenizer, train_dataset, server.url, kd_loss=full_rows)
    with pytest.raises(ValueError, match=r"at 1.0: the top-k would rescale .*set kd_temperature=1.0"):
        _trainer(tmp_path, tokenizer, train_dataset, server.url, kd_loss="fkl", kd_temperature=2.0)
    with pytest.raises(ValueError, match="teacher_model_init_kwargs"):
        _trainer(tmp_path, tokenizer, train_dataset, server.url, teacher_model_init_kwargs={"dtype": "float32"})


def test_a_server_for_another_model_or_tokenizer_is_refused_before_training(
    tmp_path, tokenizer, train_dataset, teacher
):
    with pytest.raises(ServedTeacherError, match="serves 'teacher'.*not 'someone/other'"):
        with FakeServer(vllm_responder(teacher, tokenizer)) as running:
            _trainer(tmp_path, tokenizer, train_dataset, running.url, teacher_model_name_or_path="someone/other")
    reversed_ids = vllm_responder(teacher, tokenizer)

    def other_tokenizer(path, payload):
        status, body = reversed_ids(path, payload)
        return (status, {"tokens": body["tokens"][::-1]}) if path == "/tokenize" else (status, body)

    with pytest.raises(ServedTeacherError, match="tokenizes a probe text differently"):
        with FakeServer(other_tokenizer) as running:
            _trainer(tmp_path, tokenizer, train_dataset, running.url)


def test_on_policy_steps_with_scrg_are_scored_by_the_server(tmp_path, tokenizer, train_dataset, server):
    trainer = _trainer(tmp_path, tokenizer, train_dataset, server.url, lmbda=1.0, scrg_corrections=1, max_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(torch.isfinite(torch.tensor(train_losses(trainer))))
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert any("scrg/corrected_tokens" in entry for entry in trainer.state.log_history)
    scored = [path for path, _ in server.requests[3:] if path == "/v1/completions"]
    assert len(scored) == 4  # per step: SCRG's scoring of the generated batch, then the loss's of the corrected one


def test_scrg_reads_the_servers_scores_of_generated_tokens_as_the_live_teachers(tokenizer, teacher, server):
    """At k = vocabulary the rows given to SCRG are the teacher's own log-probabilities of the last n tokens."""
    source = ServedTeacherSource(ServedTeacher(server.url, top_k=len(tokenizer)), "flat", tokenizer)
    source.reconstruction = TopKReconstruction(len(tokenizer), len(tokenizer), 1.0, "flat")
    ids = torch.randint(4, len(tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    n = 5
    rows = source.score_completions(ids, mask, torch.zeros(2, n, len(tokenizer)))
    with torch.no_grad():
        live = torch.log_softmax(completion_logits(teacher, ids, mask, n).float(), -1)
    torch.testing.assert_close(rows, live, rtol=0, atol=1e-5)


def test_a_server_that_dies_mid_run_stops_training_naming_its_url(tmp_path, tokenizer, train_dataset, teacher):
    running = FakeServer(vllm_responder(teacher, tokenizer)).__enter__()
    served = ServedTeacher(running.url, top_k=8, retries=1, backoff=0.0, timeout=5)
    trainer = _trainer(tmp_path, tokenizer, train_dataset, served, max_steps=3)
    running.__exit__()
    with pytest.raises(ServedTeacherError, match="did not answer /v1/completions after 2 attempts") as error:
        trainer.train()
    assert running.url in str(error.value) and trainer.state.global_step == 0


def test_a_batch_is_scored_as_it_is_collated_and_its_scores_serve_only_its_own_ids(
    tmp_path, tokenizer, train_dataset, server
):
    trainer = _trainer(tmp_path, tokenizer, train_dataset, server.url)
    assert isinstance(trainer.data_collator, PrefetchingCollator)
    sent = len(server.requests)
    batch = trainer.data_collator([train_dataset[i] for i in range(4)])
    batch[PREFETCHED].scores.result()
    assert len(server.requests) == sent + 1  # requested while collating
    with torch.no_grad():
        prefetched = trainer.compute_loss(trainer.model, batch).item()
        assert len(server.requests) == sent + 1  # the loss used those scores
        plain = {key: value for key, value in batch.items() if key != PREFETCHED}
        assert trainer.compute_loss(trainer.model, plain).item() == pytest.approx(prefetched, rel=1e-6)
        # Other ids of the same shape (as after a rollout) are scored anew, never given the prefetched scores
        answers = batch["labels"] != -100
        ids = batch["input_ids"].clone()
        ids[answers] = 5 + (ids[answers] - 4) % (len(tokenizer) - 5)  # other (non-special) answer tokens
        generated = {**plain, "input_ids": ids, "labels": torch.where(answers, ids, -100)}
        other = trainer.compute_loss(trainer.model, {**generated, PREFETCHED: batch[PREFETCHED]}).item()
        assert other == pytest.approx(trainer.compute_loss(trainer.model, generated).item(), rel=1e-6)
    assert other != pytest.approx(prefetched, rel=1e-3)


@pytest.mark.parametrize("overrides", [{"lmbda": 1.0}, {"teacher_prefetch": False}])
def test_no_prefetching_when_every_step_generates_or_when_off(tmp_path, tokenizer, train_dataset, server, overrides):
    trainer = _trainer(tmp_path, tokenizer, train_dataset, server.url, **overrides)
    assert not isinstance(trainer.data_collator, PrefetchingCollator)


def test_prefetching_in_data_loader_workers_trains_as_in_the_main_process(tmp_path, tokenizer, train_dataset, server):
    losses = []
    for workers in (0, 1):
        trainer = _trainer(tmp_path / str(workers), tokenizer, train_dataset, server.url, max_steps=2)
        trainer.args.dataloader_num_workers = workers
        trainer.train()
        losses.append(train_losses(trainer))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_the_distill_script_trains_from_a_served_teachers_url(tmp_path, tokenizer, train_dataset, server):
    student = tmp_path / "student"
    make_model(len(tokenizer), hidden=32, layers=1, seed=1).save_pretrained(student)
    tokenizer.save_pretrained(student)
    data = tmp_path / "train.jsonl"
    train_dataset.to_json(data)
    common = ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    argv = [*common, "--teacher", server.url, "--model_name_or_path", str(student), "--teacher_top_k", "8"]
    argv += ["--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false"]
    result = distill.main(*distill.parse_args(argv))
    assert result["global_step"] == 2 and torch.isfinite(torch.tensor(result["train_loss"]))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert any(path == "/v1/completions" for path, _ in server.requests[3:])  # trained from the server's scores
    with pytest.raises(distill.CommandLineError, match="student_layers cuts the student from the teacher's weights"):
        distill.main(*distill.parse_args([*common, "--teacher", server.url, "--student_layers", "1"]))
