"""DistillationTrainer end to end on tiny models: every recipe and mode, normalisation, resume, LoRA, errors."""

import copy

import pytest
import torch
from datasets import Dataset
from tiny import make_args, make_conversations, make_model, make_pair, make_tokenizer, train_losses
from torch import nn

from hf_kd import DistillationTrainer, build_loss
from hf_kd.hub import MODULES_FILE
from hf_kd.losses import TokenLoss, register_loss
from hf_kd.losses.dac_kl import DACKL
from hf_kd.losses.divergences import kl_rows

DIVERGENCES = ["jsd", "fkl", "rkl", "sfkl", "srkl", "akl", "bild"]
RECIPES = [*DIVERGENCES, "0.5*ce+0.5*akl"]


def heldout_kl(student, teacher, tokenizer, dataset) -> float:
    """Token-level KL(teacher || student) on the reference responses of ``dataset``."""
    from trl.experimental.utils import DataCollatorForChatML

    batch = DataCollatorForChatML(tokenizer=tokenizer)(list(dataset))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return build_loss("fkl")(s, t, batch["labels"][:, 1:]).item()


def train_30_steps_lowering_the_loss(tmp_path, tokenizer, student, teacher, train_dataset, **args):
    """A trainer after 30 off-policy steps whose last five losses average below 0.8x its first five."""
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=30, **args),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    return trainer


@pytest.mark.parametrize("recipe", RECIPES)
def test_off_policy_training_lowers_the_loss(tmp_path, tokenizer, student, teacher, train_dataset, recipe):
    trainer = train_30_steps_lowering_the_loss(tmp_path, tokenizer, student, teacher, train_dataset, kd_loss=recipe)
    term_keys = {k for entry in trainer.state.log_history for k in entry if k.startswith("loss/")}
    assert term_keys == {f"loss/{name}" for _, name in __import__("hf_kd").losses.parse_recipe(recipe)}


def test_bf16_mixed_precision_training_lowers_the_loss(tmp_path, tokenizer, student, teacher, train_dataset):
    """bf16=True (CPU autocast here): the engine's head matmuls run in bf16 under the trainer's autocast, the
    divergences in float32, and the float32 student still learns."""
    args = {"kd_loss": "jsd", "bf16": True}
    trainer = train_30_steps_lowering_the_loss(tmp_path, tokenizer, student, teacher, train_dataset, **args)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mode", ["on_policy", "seq_kd"])
def test_generated_modes_train(tmp_path, tokenizer, student, teacher, train_dataset, heldout_dataset, recipe, mode):
    """Every recipe trains on student (lmbda = 1) and teacher (seq_kd) generations; a pure divergence also brings
    the student closer to the teacher on held-out references (a CE term on the student's own samples need not)."""
    overrides = {"lmbda": 1.0} if mode == "on_policy" else {"lmbda": 0.0, "seq_kd": True}
    before = heldout_kl(student, teacher, tokenizer, heldout_dataset)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, kd_loss=recipe, max_steps=12, **overrides),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    if recipe in DIVERGENCES:
        assert heldout_kl(trainer.model, teacher, tokenizer, heldout_dataset) < before


def test_group_by_length_counts_chat_tokens_and_pads_less(tmp_path, tokenizer, student, teacher):
    """transformers' group_by_length sampler can only infer lengths from input_ids; the trainer counts a chat
    dataset's tokens as the collator lays them out, so batches of similar length pad less, and training runs."""
    train_dataset = Dataset.from_list(make_conversations(80, seed=3))  # sorted within groups of 5 batches
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=4, train_sampling_strategy="group_by_length")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
    lengths = trainer.train_dataset["length"]
    assert lengths == [len(trainer.data_collator([example])["input_ids"][0]) for example in train_dataset]

    def padded_tokens(order):
        return sum(4 * max(lengths[i] for i in order[j : j + 4]) for j in range(0, len(order), 4))

    grouped = list(trainer._get_train_sampler(trainer.train_dataset))
    assert sorted(grouped) == list(range(len(train_dataset)))
    assert padded_tokens(grouped) < padded_tokens(list(range(len(train_dataset))))
    trainer.train()
    assert trainer.state.global_step == 3


def test_teacher_is_frozen_and_in_eval_mode(tmp_path, tokenizer, student, teacher, train_dataset):
    before = copy.deepcopy(teacher.state_dict())
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=3, lmbda=0.5),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher_model.parameters())
    for key, value in trainer.teacher_model.state_dict().items():
        assert torch.equal(value, before[key])


def test_generated_steps_are_normalised_by_generated_tokens(tmp_path, tokenizer, student, teacher, train_dataset):
    """TRL divides on-policy losses by the collated label count; hf_kd by the generated tokens."""
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(
            tmp_path,
            kd_loss="fkl",
            max_steps=2,
            lmbda=1.0,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=6,
        ),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    seen = []
    original = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        seen.append((int(num_items_in_batch), int((inputs["labels"][:, 1:] != -100).sum()), loss.item()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    assert len(seen) == 4
    for num_items, generated, _ in seen:
        assert num_items == 2 * generated
    # and the value is the mean over generated tokens divided by the accumulation steps
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._rollout(trainer.model, batch, "student")
    n = int((inputs["labels"][:, 1:] != -100).sum())
    value = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=torch.tensor(2 * n))
    with torch.no_grad():
        s = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    expected = build_loss("fkl")(s, t, inputs["labels"][:, 1:]) / 2
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-6)


@register_loss("scaled_fkl_for_tests")
class ScaledFKL(TokenLoss):
    """FKL times a learnable positive scale: a loss with its own trainable parameters.

    Registered after the config was built, so it reuses an existing knob for its learning rate."""

    knobs = DACKL.knobs
    lr_knob = "dac_kl_lr"

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def per_token(self, rows):
        return self.log_scale.exp() * kl_rows(rows.teacher_logprobs(), rows.student_logprobs()) - self.log_scale


def test_exact_resume_includes_helper_modules(tmp_path, tokenizer, train_dataset):
    def run(out, max_steps, resume=None):
        student, teacher = make_pair(len(tokenizer), teacher_hidden=64)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(
                tmp_path,
                output_dir=str(tmp_path / out),
                kd_loss="0.5*ce+scaled_fkl_for_tests",
                lmbda=0.5,
                max_steps=6,
                save_strategy="steps",
                save_steps=3,
                dac_kl_lr=5e-2,
            ),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
        trainer.args.max_steps = max_steps
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full", 6)
    groups = full.optimizer.param_groups
    assert any(
        g["initial_lr"] == 5e-2 and any(p is full.loss_fn.terms[1].log_scale for p in g["params"]) for g in groups
    )
    assert (tmp_path / "full" / "checkpoint-3" / MODULES_FILE).is_file()
    resumed = run("full", 6, resume=str(tmp_path / "full" / "checkpoint-3"))
    scale_full = full.loss_fn.terms[1].log_scale.detach()
    assert scale_full != 0  # the helper parameter trained
    torch.testing.assert_close(resumed.loss_fn.terms[1].log_scale.detach(), scale_full, rtol=0, atol=0)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_lora_student_trains_adapters_only(tmp_path, tokenizer, student, teacher, train_dataset):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, kd_loss="akl", max_steps=8, lmbda=0.5),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    assert isinstance(trainer.model, PeftModel) and not isinstance(trainer.teacher_model, PeftModel)
    lora_changed = False
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            lora_changed |= "lora_B" in name and param.abs().sum() > 0
        else:
            assert not param.requires_grad
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_before[key]), name
    assert lora_changed
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_config(student.config)
    base.load_state_dict(base_before)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    x = torch.tensor([[2, 7, 8, 9]])
    trainer.model.eval()
    torch.testing.assert_close(reloaded(input_ids=x).logits, trainer.model(input_ids=x).logits)


@pytest.mark.parametrize("recipe", ["jsd", "akl", "bild", "0.5*ce+0.5*srkl"])
@pytest.mark.parametrize("student_kind", ["plain", "tied", "lora"])
def test_fused_head_equals_full_logits(tmp_path, tokenizer, teacher, train_dataset, recipe, student_kind):
    from peft import LoraConfig

    results = []
    for fused in (True, False):
        model = make_model(len(tokenizer), 32, 1, seed=1, tie=student_kind == "tied")
        peft = (
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            if student_kind == "lora"
            else None
        )
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=make_args(tmp_path, kd_loss=recipe, fused_loss=fused, loss_chunk_size=5),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)


class TestErrors:
    def _trainer(self, tmp_path, tokenizer, student, teacher, dataset, **kw):
        args_kw = kw.pop("args_kw", {})
        return DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path, **args_kw),
            train_dataset=dataset,
            processing_class=tokenizer,
            **kw,
        )

    def test_vocabulary_mismatch_names_the_bridge(self, tmp_path, tokenizer, student, train_dataset):
        other = make_model(len(tokenizer) + 7, 32, 1)
        with pytest.raises(ValueError, match="teacher_processing_class.*bridge='dskd'"):
            self._trainer(tmp_path, tokenizer, student, other, train_dataset)

    def test_tokenizer_without_pad_token(self, tmp_path, student, teacher, train_dataset):
        tok = make_tokenizer()
        tok.pad_token = None
        with pytest.raises(ValueError, match="no pad token.*pad_token = tokenizer.eos_token"):
            self._trainer(tmp_path, tok, student, teacher, train_dataset)

    def test_tokenizer_without_chat_template(self, tmp_path, student, teacher, train_dataset):
        tok = make_tokenizer(chat_template=None)
        with pytest.raises(ValueError, match="no chat template"):
            self._trainer(tmp_path, tok, student, teacher, train_dataset)

    def test_empty_dataset(self, tmp_path, tokenizer, student, teacher):
        with pytest.raises(ValueError, match="train_dataset is empty"):
            self._trainer(tmp_path, tokenizer, student, teacher, Dataset.from_list([]))

    def test_missing_messages(self, tmp_path, tokenizer, student, teacher):
        data = Dataset.from_list([{"instruction": "count", "response": "one two"}])
        with pytest.raises(ValueError, match="no column of a format.*instruction.*map_to_messages"):
            self._trainer(tmp_path, tokenizer, student, teacher, data)

    def test_unknown_recipe_term(self, tmp_path, tokenizer, student, teacher, train_dataset):
        with pytest.raises(ValueError, match="Unknown loss 'kl'. Known losses: .*akl"):
            self._trainer(tmp_path, tokenizer, student, teacher, train_dataset, args_kw={"kd_loss": "0.5*kl"})

    def test_lora_targets_matching_nothing(self, tmp_path, tokenizer, student, teacher, train_dataset):
        from peft import LoraConfig

        with pytest.raises(ValueError, match="match no module.*q_proj"):
            self._trainer(
                tmp_path, tokenizer, student, teacher, train_dataset, peft_config=LoraConfig(target_modules=["c_attn"])
            )

    def test_cpu_run_does_not_default_to_bf16(self, tmp_path):
        args = make_args(tmp_path)
        assert args.bf16 is False and args.gradient_checkpointing is False


def _stops_before_the_first_update(tmp_path, tokenizer, student, teacher, match: str, **args) -> None:
    """Training on 8 conversations (one batch a step, a checkpoint a step) fails on step 1 with ``match``, leaving
    the student as it was and no checkpoint."""
    before = copy.deepcopy(student.state_dict())
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, **args),
        train_dataset=Dataset.from_list(make_conversations(8, seed=0)),
        processing_class=tokenizer,
    )
    with pytest.raises(FloatingPointError, match=match):
        trainer.train()
    torch.testing.assert_close(student.state_dict(), before, rtol=0, atol=0, equal_nan=True)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_teacher_stops_training_naming_the_step_and_rows(tmp_path, tokenizer, student, teacher, fused):
    """A NaN embedding of one word makes the teacher's rows NaN in the sequences holding it (as a float16
    overflow would): training stops at step 1 naming those rows and the likely causes, before the update. AKL's
    head search used to loop forever on such rows; unfused, the step logged loss 0.0 and the student became NaN."""
    word = "three"
    holding = sum(word in " ".join(m["content"] for m in row["messages"]).split() for row in make_conversations(8))
    assert 0 < holding < 8
    with torch.no_grad():
        teacher.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(word)] = float("nan")
    rows = "last hidden states" if fused else "logits"
    match = rf"training step 1: the teacher's {rows} hold NaN or inf in {holding} of the batch's 8 .*{word}.*float16"
    _stops_before_the_first_update(tmp_path, tokenizer, student, teacher, match, kd_loss="akl", fused_loss=fused)


def test_a_non_finite_loss_stops_training_before_the_update(tmp_path, tokenizer, student, teacher):
    """A student whose logits hold NaN (one diverged head row) gives a NaN loss with a finite teacher."""
    with torch.no_grad():
        student.lm_head.weight[5] = float("nan")
    match = r"training step 1: the loss is nan on the batch of 8 sequences.*learning rate"
    _stops_before_the_first_update(tmp_path, tokenizer, student, teacher, match, fused_loss=False)


def test_conversations_fixture_is_learnable():
    rows = make_conversations(4)
    assert all(r["messages"][1]["content"].endswith(".") for r in rows)


# ---------------------------------------------------------------- inherited options (see the class docstring)


@pytest.mark.parametrize(
    "option, value",
    [
        ("packing", True),
        ("padding_free", True),
        ("assistant_only_loss", True),
        ("completion_only_loss", False),
        ("pad_to_multiple_of", 8),
        ("loss_type", "dft"),
        ("label_smoothing_factor", 0.1),
    ],
)
def test_replaced_sft_options_are_refused(tmp_path, tokenizer, student, teacher, train_dataset, option, value):
    args = make_args(tmp_path, **{option: value})
    with pytest.raises(ValueError, match=f"`{option}=.*not supported by DistillationTrainer"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
        )


def test_training_steps_run_in_the_activation_offloading_context(tmp_path, tokenizer, student, teacher, train_dataset):
    """SFTTrainer's `activation_offloading` wraps its training step in a context; the replaced step enters it too."""
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.maybe_activation_offload_context = recorder = _RecordingContext()
    trainer.train()
    assert recorder.entered == 2 and recorder.exited == 2


class _RecordingContext:
    """Stands in for SFTTrainer's activation offloading context (re-entered every step) and counts its uses."""

    def __init__(self):
        self.entered = self.exited = 0

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *exc):
        self.exited += 1
        return False
