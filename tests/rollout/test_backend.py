"""Rollout backends without a real engine: transformers' generate as TRL's GKD generates, and the vLLM server backend
against a local server that answers as vLLM does from a tiny model (generation, weight reloads), with its errors.

tests/integration/test_vllm_rollouts.py runs the vLLM backend against a real vLLM server.
"""

import copy
import gc
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from served_fake import FakeServer, vllm_responder
from tiny import make_args, make_model
from transformers import GenerationConfig
from trl.experimental.gkd import GKDTrainer
from trl.experimental.utils import DataCollatorForChatML

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.rollout.backend import TransformersBackend, rollout_outputs
from hf_kd.rollout.select import student_backend
from hf_kd.rollout.vllm_backend import VLLMRolloutError, VLLMServerBackend
from hf_kd.rollout.vllm_sync_extension import PROBES, probe_columns
from hf_kd.rollout.weight_sync import METHOD, WeightSync, fingerprint, merged_state_dict
from hf_kd.vllm_server import free_port


class FakeEngine:
    """Answers generation (``return_token_ids``) from ``model`` as vLLM does: the prompt ids as given, greedy at
    temperature 0 (else sampled with the request's seed), only ``allowed_token_ids``, stop after a ``stop_token_ids``
    id (kept); reloads ``model`` from the folder of a ``/collective_rpc`` weight reload and answers its fingerprint;
    anything else goes to ``fallback`` (the served teacher's endpoints)."""

    def __init__(self, model, fallback=None):
        self.model, self.fallback, self.sum_offset = model.eval(), fallback, 0.0

    def __call__(self, path, payload):
        if path == "/collective_rpc":
            assert payload["method"] == METHOD
            folder = payload["kwargs"]["weights_path"]
            state = load_file(f"{folder}/model.safetensors")
            self.model.load_state_dict(state, strict=False)
            probe = payload["kwargs"]["probe"]
            total = fingerprint(self.model, self.model.state_dict(), torch.float32, probe) + self.sum_offset
            return 200, {"results": [{"sum": total, "dtype": "float32", "embeddings_refreshed": 1}]}
        if path == "/reset_prefix_cache":
            return 200, {"success": True}
        if path == "/v1/models" and self.fallback is None:
            return 200, {"object": "list", "data": [{"id": "student", "root": "student"}]}
        if path == "/v1/completions" and payload.get("return_token_ids"):
            return 200, {"choices": [{"index": 0, "token_ids": self.complete(payload)}]}
        return self.fallback(path, payload)

    def complete(self, payload) -> list[int]:
        ids, out = list(payload["prompt"]), []
        generator = torch.Generator().manual_seed(payload["seed"])
        allowed = payload.get("allowed_token_ids")
        for _ in range(payload["max_tokens"]):
            with torch.no_grad():
                logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
            if allowed is not None:
                keep = torch.full_like(logits, float("-inf"))
                keep[allowed] = 0
                logits = logits + keep
            if payload["temperature"] == 0:
                token = int(logits.argmax())
            else:
                token = int(
                    torch.multinomial(torch.softmax(logits / payload["temperature"], -1), 1, generator=generator)
                )
            out.append(token)
            if token in payload["stop_token_ids"]:
                break
        return out


def _prompts(tokenizer, train_dataset, n=4):
    """The left-padded prompts of ``n`` rows, as the trainer's collator gives them."""
    batch = DataCollatorForChatML(tokenizer=tokenizer)([train_dataset[i] for i in range(n)])
    return batch["prompts"], batch["prompt_attention_mask"]


def _config(tokenizer, model, greedy=True, max_new_tokens=6):
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=0.9,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )


def test_transformers_backend_gives_trls_on_policy_outputs(tokenizer, student, train_dataset):
    """The default backend and rollout_outputs give what GKDTrainer.generate_on_policy_outputs gives (sampled)."""
    prompts, mask = _prompts(tokenizer, train_dataset)
    config = _config(tokenizer, student, greedy=False, max_new_tokens=10)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("three")  # a token the random student emits early
    torch.manual_seed(3)
    ours = rollout_outputs(TransformersBackend().generate(student, prompts, mask, config), mask, config)
    torch.manual_seed(3)
    trls = GKDTrainer.generate_on_policy_outputs(student, {"prompts": prompts, "prompt_attention_mask": mask}, config)
    for a, b in zip(ours, trls):
        assert torch.equal(a, b)
    assert (ours[2] == -100).any() and (ours[2] != -100).any()


def test_vllm_backend_sends_token_ids_and_the_sampling_and_equals_generate_when_greedy(
    tokenizer, student, train_dataset
):
    prompts, mask = _prompts(tokenizer, train_dataset)
    config = _config(tokenizer, student)
    config.suppress_tokens = [len(tokenizer) - 1]
    with FakeServer(FakeEngine(copy.deepcopy(student))) as server:
        sequences = VLLMServerBackend(server.url).generate(None, prompts, mask, config)
    expected = TransformersBackend().generate(student, prompts, mask, config)
    assert torch.equal(sequences, expected)
    sent = [payload for path, payload in server.requests if path == "/v1/completions"]
    assert sorted(p["prompt"] for p in sent) == sorted(r[m.bool()].tolist() for r, m in zip(prompts, mask))
    first = sent[0]
    assert first["return_token_ids"] and first["temperature"] == 0 and first["max_tokens"] == 6
    assert first["stop_token_ids"] == [config.eos_token_id] and first["top_k"] == 0
    assert first["allowed_token_ids"] == list(range(len(tokenizer) - 1))
    config.do_sample = True
    assert VLLMServerBackend("http://x").sampling(config)["temperature"] == pytest.approx(0.9)


def test_an_unreachable_server_is_an_error_naming_its_url(tokenizer, student, train_dataset):
    prompts, mask = _prompts(tokenizer, train_dataset, n=1)
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = VLLMServerBackend(url, model="student", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(VLLMRolloutError, match=f"vLLM server at {url} did not answer /v1/completions after 2"):
        backend.generate(None, prompts, mask, _config(tokenizer, student))


def test_a_sync_that_fails_or_leaves_other_weights_is_an_error(student, tmp_path):
    sync = WeightSync(str(tmp_path / "weights"))
    engine = FakeEngine(copy.deepcopy(student))
    with FakeServer(engine) as server:
        backend = VLLMServerBackend(server.url, retries=0)
        sync.push(student, backend)  # the engine now sums as the student
        engine.sum_offset = 1e-3  # an engine that kept other weights
        with pytest.raises(VLLMRolloutError, match="holds weights summing to .* but the student written there"):
            sync.push(student, backend)
    with FakeServer(lambda path, payload: (404, {"detail": "Not Found"})) as server:
        with pytest.raises(VLLMRolloutError, match="VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls"):
            sync.push(student, VLLMServerBackend(server.url, retries=0))


def test_a_temporary_weights_folder_goes_with_its_sync(student):
    """Each push writes the whole student: a temporary folder is removed by close(), or when the sync is collected."""
    for closing in (True, False):
        sync = WeightSync()
        folder = sync.folder
        student.save_pretrained(folder)
        if closing:
            sync.close()
        del sync
        gc.collect()
        assert not folder.exists()


def test_a_lora_student_is_written_merged_and_left_unmerged(student):
    lora = get_peft_model(copy.deepcopy(student), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    with torch.no_grad():
        written = {k: v.clone() for k, v in merged_state_dict(lora)[1].items()}
    expected = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key])
    assert not torch.equal(written["model.layers.0.self_attn.q_proj.weight"], student.state_dict()[
        "model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    for key, value in lora.state_dict().items():
        assert torch.equal(value, before[key])


def test_on_policy_training_with_the_vllm_backend_keeps_the_engine_on_the_students_weights(
    tmp_path, tokenizer, student, teacher, train_dataset
):
    """Weights pushed when training begins and after every step (vllm_sync_steps=1); the rollouts come from the
    server and equal generate's from the same weights when greedy."""
    engine = FakeEngine(make_model(len(tokenizer), hidden=32, layers=1, seed=9))  # other weights until the first push
    with FakeServer(engine) as server:
        args = make_args(tmp_path, lmbda=1.0, max_steps=2, use_vllm=True, vllm_server_url=server.url)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
        )
        trainer.train()
        pushes = [p for p, _ in server.requests if p == "/collective_rpc"]
        assert len(pushes) == 3 and any(p == "/v1/completions" for p, _ in server.requests)
        for a, b in zip(engine.model.parameters(), trainer.model.parameters()):
            assert torch.equal(a, b)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.generation_config.do_sample = False
        from_server = trainer._rollout(trainer.model, batch, "student")
        trainer.rollout_backend = TransformersBackend()
        from_generate = trainer._rollout(trainer.model, batch, "student")
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(from_server[key], from_generate[key])
    assert any("vllm/sync_seconds" in entry for entry in trainer.state.log_history)


def test_seq_kd_from_a_served_teacher_generates_with_its_server(tmp_path, tokenizer, student, teacher, train_dataset):
    engine = FakeEngine(teacher, vllm_responder(teacher.eval(), tokenizer))
    with FakeServer(engine) as server:
        args = make_args(tmp_path, seq_kd=True, max_steps=1, teacher_top_k=8)
        trainer = DistillationTrainer(
            model=student, teacher_model=server.url, args=args, train_dataset=train_dataset, processing_class=tokenizer
        )
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.generation_config.do_sample = False
        served = trainer._rollout(trainer.model, batch, "teacher")
        trainer.train()
        generations = [p for path, p in server.requests if path == "/v1/completions" and p.get("return_token_ids")]
    live = TransformersBackend().generate(
        teacher, batch["prompts"], batch["prompt_attention_mask"], trainer.generation_config
    )
    assert torch.equal(served["input_ids"], live)
    assert generations and all(p["allowed_token_ids"] == list(range(len(tokenizer))) for p in generations)
    assert not any(path == "/collective_rpc" for path, _ in server.requests)  # a teacher is never synced


def test_vllm_options_are_checked(tmp_path, tokenizer, student, teacher, train_dataset):
    def config(**kw):
        return DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    with pytest.raises(ValueError, match="vllm_sync_steps must be >= 1"):
        config(use_vllm=True, vllm_sync_steps=0)
    with pytest.raises(ValueError, match="vllm_mode must be 'server' or 'colocate'"):
        config(use_vllm=True, vllm_mode="remote")
    with pytest.raises(ValueError, match="vllm_server_url must be an http"):
        config(use_vllm=True, vllm_server_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="use_vllm is False"):
        config(vllm_server_url="http://127.0.0.1:8000/v1")

    def trainer(**kw):
        args = make_args(tmp_path, **kw)
        return DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
        )

    with pytest.raises(ValueError, match="vllm_mode='colocate' .* use vllm_mode='server'"):
        trainer(use_vllm=True, vllm_mode="colocate", lmbda=1.0)
    with pytest.raises(ValueError, match="does not import in this environment: set vllm_python"):
        trainer(use_vllm=True, lmbda=1.0)
    with pytest.raises(ValueError, match="lmbda=0 never lets the student generate"):
        trainer(use_vllm=True, vllm_server_url="http://127.0.0.1:1/v1")


def test_processes_without_the_main_ones_server_stop_with_an_error(tmp_path, monkeypatch, tokenizer, student):
    """Under several processes only the main one starts the server (tests/integration/test_vllm_ranks.py runs two):
    on other machines it could not be reached, and a process that receives no URL from the main one stops."""
    args = make_args(tmp_path, lmbda=1.0, use_vllm=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="other machines cannot reach: .* set vllm_server_url"):
        student_backend(args, student, tokenizer, SimpleNamespace(is_main_process=True, num_processes=4))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # a single process: the broadcast hands back what it is given
    with pytest.raises(RuntimeError, match="The main process could not start the vLLM rollout server"):
        student_backend(args, student, tokenizer, SimpleNamespace(is_main_process=False, num_processes=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fingerprint_is_what_one_hot_rows_through_a_matmul_give_in_the_engines_dtype(student, dtype):
    """The engine applies each linear layer to one-hot rows at its probe columns (vllm_sync_extension): a matmul in
    bf16 returns those weight columns exactly, so the sum is exact in bf16 too (a row of ones would be rounded to
    8 bits per row). Computed here with torch's own kernel, layer by layer, against ``fingerprint``."""
    model = copy.deepcopy(student).to(dtype)
    for probe in (0, 1, 5):
        total, seen = 0.0, set()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                columns = probe_columns(module.in_features, probe)
                one_hot = torch.zeros(len(columns), module.in_features, dtype=dtype)
                one_hot[range(len(columns)), columns] = 1
                total += float(torch.nn.functional.linear(one_hot, module.weight).double().sum())
                total += float(module.bias.double().sum()) if module.bias is not None else 0.0
                continue
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    total += float(parameter.double().sum())
        expected = fingerprint(student, student.state_dict(), dtype, probe)
        assert total == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert fingerprint(student, student.state_dict(), dtype, 0) != fingerprint(student, student.state_dict(), dtype, 1)


def test_probe_columns_are_distinct_in_range_and_move_with_the_push():
    for width in (1, 7, 16, 576, 151936):
        for probe in (0, 1, 2, 1000):
            columns = probe_columns(width, probe)
            assert len(columns) == len(set(columns)) == min(PROBES, width)
            assert all(0 <= c < width for c in columns)
        if width > PROBES:
            assert set(probe_columns(width, 0)).isdisjoint(probe_columns(width, 1))
