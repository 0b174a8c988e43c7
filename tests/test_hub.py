"""Model cards and Hub pushes of distilled students, against a recording stand-in for the Hub API (no network)."""

from __future__ import annotations

import importlib
import io
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
import yaml
from datasets import Dataset
from huggingface_hub import CommitOperationAdd, constants, errors
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import make_model, make_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from hf_kd import model_card
from hf_kd.hub import MERGED_MARKER, MODULES_FILE, DistillationHubMixin, HubPushError
from hf_kd.model_card import ModelCardData, TrainingBudget, find_template, methods_used, render_model_card

STUDENT_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEACHER_ID = "HuggingFaceTB/SmolLM2-360M-Instruct"
REPO_ID = "someone/tiny-student"
HUB_VOCAB = ["<pad>", "<unk>", "<s>", "</s>", *(f"w{i}" for i in range(44))]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------- tiny models and a Trainer with the mixin


def hub_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0`` .. ``w43`` without a chat template."""
    return make_tokenizer(chat_template=None, vocab=HUB_VOCAB, bos_token="<s>", eos_token="</s>")


def hub_model(origin: str, hidden: int, layers: int) -> LlamaForCausalLM:
    """A tiny Llama over `hub_tokenizer`'s vocabulary that claims to come from ``origin``."""
    return make_model(
        len(HUB_VOCAB),
        hidden,
        layers,
        seed=hidden + layers,
        origin=origin,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )


def lora_student(origin: str = STUDENT_ID) -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(hub_model(origin, 16, 1), config)


@dataclass
class KDArgs(TrainingArguments):
    kd_loss: str = "0.5*ce+0.5*akl"
    bridge: str | None = None
    scrg_corrections: int = 0
    lmbda: float = 0.5
    beta: float = 0.5
    kd_temperature: float = 2.0
    temperature: float = 0.9


class HubTrainer(DistillationHubMixin, Trainer):
    pass


def make_trainer(tmp_path: Path, student=None, **arg_overrides) -> HubTrainer:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        hub_model_id=REPO_ID,
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_strategy="no",
        save_strategy="no",
    )
    args = KDArgs(**{**defaults, **arg_overrides})
    model = student if student is not None else hub_model(STUDENT_ID, 16, 1)
    trainer = HubTrainer(model=model, args=args, processing_class=hub_tokenizer())
    trainer.teacher_model = hub_model(TEACHER_ID, 32, 2)
    return trainer


HELPER_NAMES = (MODULES_FILE, "_hf_kd_modules_extra.pt")


def write_helpers(output_dir: Path) -> dict[str, bytes]:
    """Stand in for what the trainer saves of its trainable distillation modules."""
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({"proj.weight": torch.ones(2, 2)}, str(output_dir / MODULES_FILE))
    buffer = io.BytesIO()
    torch.save({"clip.weight": torch.zeros(3)}, buffer)
    (output_dir / HELPER_NAMES[1]).write_bytes(buffer.getvalue())
    return {name: (output_dir / name).read_bytes() for name in HELPER_NAMES}


# ---------------------------------------------------------------- recording stand-in for the Hub API


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the Hub, not even peft's existence checks when saving an adapter."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


class RecordingHubApi:
    """Records Hub calls; keeps the bytes each upload would send, keyed by path in the repo."""

    def __init__(self, fail_on: str | None = None, error: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.repo: dict[str, bytes] = {}
        self.fail_on, self.error = fail_on, error

    def _record(self, name: str, kwargs: dict) -> None:
        self.calls.append((name, kwargs))
        if name == self.fail_on:
            raise self.error

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", {"repo_id": repo_id, **kwargs})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kw
    ):
        recorded = {"folder_path": folder_path, "ignore_patterns": ignore_patterns, "token": kw.get("token")}
        self._record("upload_folder", {"repo_id": repo_id, **recorded})
        root = Path(folder_path)
        relative = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        for rel in filter_repo_objects(relative, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            self.repo[prefix + rel] = (root / rel).read_bytes()
        commit = SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")
        if not kw.get("run_as_future"):
            return commit
        future = Future()  # Trainer's checkpoint pushes run in the background and are awaited later
        future.set_result(commit)
        return future

    def create_commit(self, *, repo_id, operations, **kwargs):
        self._record("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs})
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            source = op.path_or_fileobj
            self.repo[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/2")

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def fake_hub(monkeypatch) -> RecordingHubApi:
    api = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def local_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- uploads


def write_user_files(output_dir: Path) -> set[str]:
    """Files a user keeps in the output folder, none of which a push may upload."""
    (output_dir / "notes").mkdir(parents=True, exist_ok=True)
    (output_dir / ".env").write_text("HF_TOKEN=hf_user_secret\n")
    (output_dir / "notes" / "private.txt").write_text("not for the Hub\n")
    (output_dir / "my_scores.json").write_text("{}\n")
    return {".env", "notes/private.txt", "my_scores.json"}


def test_full_model_push_uploads_weights_config_tokenizer_and_card_only(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path)
    output_dir = Path(trainer.args.output_dir)
    write_helpers(output_dir)
    user_files = write_user_files(output_dir)

    trainer.push_to_hub()

    assert fake_hub.call_names() == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][1]["repo_id"] == REPO_ID
    uploaded = set(fake_hub.repo)
    student = {"model.safetensors", "config.json", "generation_config.json"}
    assert uploaded == student | {"tokenizer.json", "tokenizer_config.json", "README.md"}
    assert user_files | set(HELPER_NAMES) | {"training_args.bin"} <= local_files(output_dir)  # all kept, none sent
    assert not any(name.startswith("adapter_") for name in uploaded)
    meta = front_matter(fake_hub.repo["README.md"].decode())
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == STUDENT_ID
    assert {"knowledge-distillation", "hf_kd", "akl", "gkd"} <= set(meta["tags"])
    weights = load_file(str(output_dir / "model.safetensors"))
    torch.testing.assert_close(weights[Q_PROJ], trainer.model.model.layers[0].self_attn.q_proj.weight)


def test_adapter_push_uploads_only_the_lora_adapter(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path, student=lora_student())

    trainer.push_to_hub()

    uploaded = set(fake_hub.repo)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= uploaded
    assert "model.safetensors" not in uploaded
    card = fake_hub.repo["README.md"].decode()
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == STUDENT_ID
    assert "lora" in meta["tags"]
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO_ID}")' in card
    adapter = load_file(str(Path(trainer.args.output_dir) / "adapter_model.safetensors"))
    assert all("lora_" in key for key in adapter)


def test_merged_push_uploads_full_weights_with_lora_folded_in(tmp_path, fake_hub):
    student = lora_student()
    trainer = make_trainer(tmp_path, student=student)
    q_proj = student.base_model.model.model.layers[0].self_attn.q_proj
    base = q_proj.base_layer.weight.detach().clone()
    delta = q_proj.scaling["default"] * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight

    trainer.push_to_hub(merge_adapter=True)

    merged_dir = Path(trainer.args.output_dir) / "_merged"
    upload = fake_hub.calls[-1][1]
    assert Path(upload["folder_path"]) == merged_dir
    uploaded = set(fake_hub.repo)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= uploaded
    assert not any(name.startswith("adapter_") for name in uploaded)
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert not torch.allclose(merged[Q_PROJ], base)
    torch.testing.assert_close(merged[Q_PROJ], base + delta.detach())
    card = fake_hub.repo["README.md"].decode()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == STUDENT_ID
    assert "LoRA adapter merged into the base weights" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    # The trained adapter is left as it was: still a PeftModel whose base weight is unchanged.
    assert isinstance(trainer.model, PeftModel)
    torch.testing.assert_close(q_proj.base_layer.weight, base)
    assert (Path(trainer.args.output_dir) / "adapter_model.safetensors").is_file()
    assert (merged_dir / MERGED_MARKER).is_file() and MERGED_MARKER not in uploaded


def test_merge_never_deletes_a_folder_that_hf_kd_did_not_write(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path, student=lora_student())
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model()  # the adapter, its card and tokenizer
    for step in (1, 2):
        trainer.save_model(str(output_dir / f"checkpoint-{step}"), _internal_call=True)
    (output_dir / "my_results.json").write_text('{"rouge_l": 41.5}\n')
    before = {name: (output_dir / name).read_bytes() for name in local_files(output_dir)}
    assert {"adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors"} <= set(before)

    with pytest.raises(FileExistsError, match=f"will not write to {output_dir}:.*move this one away"):
        trainer.save_merged_model(output_dir)

    assert {name: (output_dir / name).read_bytes() for name in local_files(output_dir)} == before
    merged = trainer.save_merged_model()  # the default folder, output_dir/_merged
    again = trainer.save_merged_model()  # a merged copy hf_kd wrote is replaced whole
    assert merged == again == output_dir / "_merged" and (merged / "model.safetensors").is_file()
    assert sorted(p.name for p in output_dir.iterdir() if p.name.startswith("__merged")) == []
    assert {name: (output_dir / name).read_bytes() for name in before} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (trainer.save_merged_model(empty) / MERGED_MARKER).is_file()


def test_merge_request_for_a_full_model_fails_before_any_hub_call(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="merge_adapter=True needs a LoRA"):
        trainer.push_to_hub(merge_adapter=True)
    assert fake_hub.calls == []


def test_helpers_stay_local_by_default_and_go_to_a_subfolder_on_request(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path, bridge="dskd")
    helpers = write_helpers(Path(trainer.args.output_dir))

    trainer.push_to_hub()
    assert not any("distillation_modules" in name or "hf_kd_modules" in name for name in fake_hub.repo)

    fake_hub.repo.clear()
    trainer.push_to_hub(include_helpers=True)
    assert fake_hub.call_names()[-2:] == ["upload_folder", "create_commit"]
    in_subfolder = {name for name in fake_hub.repo if name.startswith("distillation_modules/")}
    assert in_subfolder == {
        "distillation_modules/hf_kd_modules.safetensors",
        "distillation_modules/hf_kd_modules_extra.pt",
        "distillation_modules/README.md",
    }
    for name, content in helpers.items():
        assert fake_hub.repo[f"distillation_modules/{name.lstrip('_')}"] == content
        assert name not in fake_hub.repo
    assert "load_state_dict" in fake_hub.repo["distillation_modules/README.md"].decode()
    assert "distillation_modules/" in fake_hub.repo["README.md"].decode()


def test_the_hub_token_is_never_written_nor_uploaded(tmp_path, fake_hub):
    """Checkpoint pushes every step, then a final push: no file on disk or in the repo holds the token, every
    upload still authenticates with it, and files the user keeps in output_dir stay local."""
    secret = "hf_secretTokenThatMustNotLeak"
    arguments = dict(push_to_hub=True, hub_strategy="checkpoint", save_strategy="steps", save_steps=1, max_steps=2)
    trainer = distillation_trainer(tmp_path, hub_token=secret, **arguments)
    trainer.args.model_init_kwargs = {"token": secret, "dtype": "float32"}  # as for a student given by name
    output_dir = Path(trainer.args.output_dir)
    user_files = write_user_files(output_dir)

    trainer.train()
    trainer.push_to_hub()

    on_disk = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file() and p.name != ".env"}
    assert "checkpoint-2/training_args.bin" in {p.relative_to(output_dir).as_posix() for p in on_disk}
    assert [p for p, content in on_disk.items() if secret.encode() in content] == []
    assert [name for name, content in fake_hub.repo.items() if secret.encode() in content] == []
    assert not user_files & set(fake_hub.repo)
    assert "training_args.bin" not in fake_hub.repo  # the root holds the student; last-checkpoint/ can resume
    assert "last-checkpoint/trainer_state.json" in fake_hub.repo
    uploads = [kwargs for name, kwargs in fake_hub.calls if name == "upload_folder"]
    assert len(uploads) == 5 and all(kwargs["token"] == secret for kwargs in uploads)
    saved = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.model_init_kwargs == {"dtype": "float32"}
    assert saved.kd_loss == trainer.args.kd_loss and saved.hub_model_id == REPO_ID
    assert trainer.args.hub_token == secret  # the run keeps its token


# ---------------------------------------------------------------- failures leave the local output intact


def hub_error(status: int, message: str) -> HfHubHTTPError:
    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # the HTTP library the Hub client uses
    response = http.Response(status, request=http.Request("POST", "https://hub.invalid/api/repos"))
    return HfHubHTTPError(message, response=response)


@pytest.mark.parametrize(
    ("fail_on", "error", "step"),
    [
        ("upload_folder", hub_error(403, "403 Forbidden: repo refused"), "upload the model folder"),
        ("upload_folder", ConnectionError("network unreachable"), "upload the model folder"),
        ("create_repo", hub_error(401, "401 Unauthorized: invalid token"), "create the repository"),
    ],
)
def test_failed_push_raises_a_clear_error_and_deletes_nothing(tmp_path, monkeypatch, fail_on, error, step):
    api = RecordingHubApi(fail_on=fail_on, error=error)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer = make_trainer(tmp_path, student=lora_student())
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model()
    write_helpers(output_dir)
    before = {name: (output_dir / name).read_bytes() for name in local_files(output_dir)}

    with pytest.raises(HubPushError) as caught:
        trainer.push_to_hub(merge_adapter=True)

    message = str(caught.value)
    assert step in message and REPO_ID in message
    assert "trainer.push_to_hub()" in message and f"hf upload {REPO_ID}" in message
    assert "Nothing was deleted" in message
    assert caught.value.__cause__ is error
    after = local_files(output_dir)
    assert set(before) <= after
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", *HELPER_NAMES):
        assert name in after
        assert (output_dir / name).read_bytes() == before[name]


def test_failed_helper_upload_names_its_step(tmp_path, monkeypatch):
    api = RecordingHubApi(fail_on="create_commit", error=hub_error(500, "500 Internal Server Error"))
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer = make_trainer(tmp_path)
    write_helpers(Path(trainer.args.output_dir))
    with pytest.raises(HubPushError, match="upload the distillation modules"):
        trainer.push_to_hub(include_helpers=True)
    assert (Path(trainer.args.output_dir) / MODULES_FILE).is_file()


# ---------------------------------------------------------------- card contents


def test_card_front_matter_takes_the_license_from_the_cached_origin_card(tmp_path, monkeypatch, fake_hub):
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# SmolLM2\n")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    trainer = make_trainer(tmp_path, kd_loss="0.5*ce+0.5*fkl", scrg_corrections=1, lmbda=0.0)

    trainer.create_model_card(model_name="tiny-student", dataset_name="someone/chat-data")

    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == STUDENT_ID
    assert meta["datasets"] == ["someone/chat-data"]
    assert {"knowledge-distillation", "hf_kd", "mgsr"} <= set(meta["tags"])
    assert "gkd" not in meta["tags"]
    assert f"[{TEACHER_ID}](https://huggingface.co/{TEACHER_ID})" in card
    assert "| SCRG corrections per sequence | 1 |" in card
    assert "arXiv:2407.10068" in card and "2404.02657" not in card


def test_card_for_a_student_from_a_local_folder(tmp_path, fake_hub):
    origin = tmp_path / "student-origin"
    origin.mkdir()
    (origin / "README.md").write_text("---\nlicense: mit\n---\n")
    trainer = make_trainer(tmp_path, student=hub_model(str(origin), 16, 1))

    trainer.create_model_card()

    meta = front_matter((Path(trainer.args.output_dir) / "README.md").read_text())
    assert meta["license"] == "mit"
    assert "base_model" not in meta  # a local path is not a Hub id


def test_results_table_only_when_evaluation_results_exist(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path)
    card_path = Path(trainer.args.output_dir) / "README.md"

    trainer.create_model_card()
    assert "## Results" not in card_path.read_text()

    trainer.eval_results = {
        "teacher": {"rouge_l": 27.19},
        "student_before": {"eval_rougeL": 16.8, "kl": 1.2345},
        "student_after": {"rouge_l": 21.44, "heldout_kl": 0.4321},
    }
    trainer.create_model_card()
    card = card_path.read_text()
    assert "## Results" in card
    assert "| teacher | 27.19 | — |" in card
    assert "| student before distillation | 16.8 | 1.234 |" in card
    assert "| student after distillation | 21.44 | 0.4321 |" in card


def test_recipe_budget_and_versions_are_on_the_card(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path, kd_loss="0.3*ce + 0.7*bild", bridge="dskd", gradient_accumulation_steps=2)
    trainer.create_model_card()
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    for row in (
        "| objective | `0.3*ce + 0.7*bild` |",
        "| term `ce` | weight 0.3 |",
        "| term `bild` | weight 0.7 |",
        "| bridge | dskd |",
        "| distillation temperature | 2 |",
        "| generalized JSD beta | 0.5 |",
        "| optimizer steps | 0 of 2 |",
        "| batch size | 4 (2 per device × 2 accumulation × 1 devices) |",
        "| learning rate | 0.001 |",
    ):
        assert row in card
    assert f"- transformers: {transformers.__version__}" in card
    assert "- hf_kd: " in card and "- trl: " in card and "- peft: " in card and "- torch: " in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    for arxiv_id in ("2406.13555", "2406.17328", "2306.13649"):
        assert arxiv_id in card


def test_card_versions_come_from_package_metadata(monkeypatch):
    """One version source: the installed package's metadata (pyproject.toml), read by the card and ``__version__``."""
    from importlib import metadata

    import hf_kd

    installed = metadata.version
    assert hf_kd.__version__ == installed("hf_kd")
    monkeypatch.setattr(metadata, "version", lambda dist: "7.7.7" if dist == "hf_kd" else installed(dist))
    assert dict(model_card.framework_versions())["hf_kd"] == "7.7.7"


def test_card_is_written_on_every_save_including_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=2, include_num_input_tokens_seen="all")
    data = {"input_ids": [[2, 5, 6, 7, 3]] * 4, "labels": [[2, 5, 6, 7, 3]] * 4}
    trainer.train_dataset = Dataset.from_dict(data)

    trainer.train()

    output_dir = Path(trainer.args.output_dir)
    checkpoint_card = (output_dir / "checkpoint-2" / "README.md").read_text()
    assert "| optimizer steps | 2 of 2 |" in checkpoint_card
    trainer.save_model()
    card = (output_dir / "README.md").read_text()
    assert front_matter(card)["library_name"] == "transformers"
    assert "| training examples | 4 |" in card
    assert "| tokens seen | 20 |" in card


def test_unsupported_card_argument_is_refused(tmp_path, fake_hub):
    trainer = make_trainer(tmp_path)
    with pytest.raises(TypeError, match="Unsupported model card arguments \\['colour'\\]"):
        trainer.push_to_hub(colour="blue")
    assert fake_hub.calls == []


def distillation_trainer(tmp_path: Path, **arg_overrides):
    """A DistillationTrainer whose DAC-KL sub-network is a trainable helper saved beside the student."""
    from hf_kd import DistillationConfig, DistillationTrainer

    tokenizer = hub_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        hub_model_id=REPO_ID,
        kd_loss="0.5*ce+dac_kl",
        use_cpu=True,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=2,
        lmbda=0.0,
        save_strategy="no",
        logging_strategy="no",
    )
    return DistillationTrainer(
        model=hub_model(STUDENT_ID, 16, 1),
        teacher_model=hub_model(TEACHER_ID, 32, 2),
        args=DistillationConfig(**{**defaults, **arg_overrides}),
        train_dataset=Dataset.from_list([{"messages": chat}] * 4),
        processing_class=tokenizer,
    )


def test_distillation_trainer_pushes_student_with_card_and_keeps_its_helpers_local(tmp_path, fake_hub):
    trainer = distillation_trainer(tmp_path)
    args = trainer.args
    trainer.train()

    trainer.push_to_hub(dataset_name="someone/chat-data")

    out = Path(args.output_dir)
    assert (out / MODULES_FILE).is_file()  # the trained DAC-KL sub-network, beside the student
    assert fake_hub.call_names() == ["create_repo", "upload_folder"]
    assert {"model.safetensors", "config.json", "README.md"} <= set(fake_hub.repo)
    assert not any("modules" in name for name in fake_hub.repo)
    card = fake_hub.repo["README.md"].decode()
    meta = front_matter(card)
    assert meta["base_model"] == STUDENT_ID and meta["datasets"] == ["someone/chat-data"]
    assert {"knowledge-distillation", "hf_kd", "mgsr"} <= {t.lower() for t in meta["tags"]}
    assert "dac_kl" in card and "| optimizer steps | 1 of 1 |" in card
    assert f"[{TEACHER_ID}](https://huggingface.co/{TEACHER_ID})" in card

    trainer.push_to_hub(include_helpers=True)
    assert "distillation_modules/hf_kd_modules.safetensors" in fake_hub.repo


@pytest.mark.parametrize("hub_strategy", ["checkpoint", "every_save"])
def test_checkpoint_pushes_leave_the_helpers_out_unless_asked(tmp_path, fake_hub, hub_strategy):
    """Trainer's own pushes during training upload checkpoint folders whole: the helper files stay local."""
    arguments = dict(push_to_hub=True, hub_strategy=hub_strategy, save_strategy="steps", save_steps=1)
    trainer = distillation_trainer(tmp_path, **arguments)
    trainer.train()

    checkpoint = Path(trainer.args.output_dir) / "checkpoint-1"
    assert (checkpoint / MODULES_FILE).is_file()  # saved locally, so that the run can resume
    assert "upload_folder" in fake_hub.call_names()
    assert "model.safetensors" in fake_hub.repo
    assert not any("modules" in name for name in fake_hub.repo)
    if hub_strategy == "checkpoint":
        assert "last-checkpoint/model.safetensors" in fake_hub.repo

    fake_hub.repo.clear()
    trainer = distillation_trainer(tmp_path / "opted-in", **arguments)
    trainer.push_helpers = True
    trainer.train()
    if hub_strategy == "checkpoint":
        assert f"last-checkpoint/{MODULES_FILE}" in fake_hub.repo
    assert MODULES_FILE not in fake_hub.repo  # the repository root holds the student only


# ---------------------------------------------------------------- pure functions


def test_method_names_follow_terms_bridge_scrg_and_on_policy_data():
    assert methods_used(["ce", "akl"]) == ["AKL"]
    assert methods_used(["dac_kl", "span"]) == ["MGSR"]
    assert methods_used(["bild"]) == ["BiLD"]
    assert methods_used(["fkl"], bridge="dskd") == ["DSKD"]
    assert methods_used(["jsd"]) == ["GKD"]
    assert methods_used(["ce"], scrg_corrections=1) == ["MGSR"]
    assert methods_used(["fkl"], lmbda=0.5) == ["GKD"]
    assert methods_used(["fkl", "rkl"]) == []
    assert methods_used(["sfkl", "srkl"]) == ["DistiLLM"]  # declared by the terms: the card cites them too
    assert methods_used(["akl", "span"], bridge="dskd", lmbda=0.5) == ["AKL", "MGSR", "DSKD", "GKD"]


def test_card_cites_every_paper_the_recipe_declares():
    card = render_model_card(ModelCardData(recipe="0.5*ce+0.5*sfkl"))
    assert "arXiv:2402.03898" in card and "@inproceedings{ko2024distillm" in card


def test_card_refuses_a_recipe_the_loss_library_cannot_read():
    data = ModelCardData(recipe="0.5*")
    with pytest.raises(ValueError, match="0.5\\*ce\\+0.5\\*akl"):
        render_model_card(data)
    assert ModelCardData(recipe="0.3*ce + 0.7*bild").terms == [(0.3, "ce"), (0.7, "bild")]


def test_render_without_any_method_or_results():
    card = render_model_card(ModelCardData(recipe="fkl", budget=TrainingBudget(steps=3)))
    meta = front_matter(card)
    assert meta["tags"] == ["knowledge-distillation", "hf_kd"]
    assert "base_model" not in meta and "license" not in meta
    assert "## Citations" not in card and "## Results" not in card


def test_template_is_found_in_the_checkout_and_missing_template_names_the_places(tmp_path, monkeypatch):
    assert find_template() == Path(model_card.__file__).resolve().parent.parent / "model_cards" / "student.md.j2"
    packaged, checkout = tmp_path / "package" / "model_cards", tmp_path / "model_cards"
    monkeypatch.setattr(model_card, "template_dirs", lambda: [packaged, checkout])
    with pytest.raises(FileNotFoundError, match="package/model_cards.*model_cards"):
        find_template()
    packaged.mkdir(parents=True)
    (packaged / "student.md.j2").write_text("---\n{{ front_matter }}---\n{{ title }}\n")
    assert find_template() == packaged / "student.md.j2"
    assert render_model_card(ModelCardData(model_name="x")).endswith("---\nx\n")


def test_card_shows_every_metric_and_the_figures():
    results = {"rouge_l": 41.5, "kl": 1.25, "exact_match": 30.0, "loop_rate": 5.0}
    data = ModelCardData(recipe="fkl", eval_results={"student_after": results}, figures=["training_curves.png"])
    card = render_model_card(data)
    assert "| 41.5 | 1.25 | 30 | 5 |" in card
    assert "![training_curves.png](training_curves.png)" in card
    assert "![" not in render_model_card(ModelCardData(recipe="fkl"))
