"""Output heads exact to each model's logits (scales, soft-caps, LoRA heads), the first-step guard, and padded
vocabularies (heads of different sizes over one tokenizer)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import (
    FAMILY_OVERRIDES,
    bridge_args,
    make_args,
    make_conversations,
    make_family_model,
    make_model,
    make_pair,
    make_tokenizer,
)
from transformers import LlamaForCausalLM
from trl.experimental.utils import DataCollatorForChatML

from hf_kd import DistillationTrainer
from hf_kd.bridge import DSKDBridge
from hf_kd.evaluation import generate_answers, token_kl
from hf_kd.heads import logit_transform, output_head, verify_output_head
from hf_kd.rollout import GeneratedBatch, GenerationContext
from hf_kd.rollout.scrg import SCRGCallback


def _loss_and_grads(trainer, batch):
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _trainer(tmp_path, student, teacher, tokenizer, train_dataset, **kw):
    args = {"kd_loss": "fkl", "loss_chunk_size": 5, **kw.pop("args", {})}
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, **args),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **kw,
    )


# --- heads exact to the model's logits ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_output_head_reproduces_the_models_logits(family):
    model = make_family_model(family, 29, seed=1).eval()
    ids = torch.randint(0, 29, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(output_head(model)(out.hidden_states[-1]), out.logits, rtol=1e-6, atol=1e-6)
    verify_output_head(output_head(model), out)


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_fused_loss_equals_full_logits_for_every_family(tmp_path, tokenizer, train_dataset, family):
    """Same loss value and gradients from the fused heads as from the models' own logits (FKL and AKL)."""
    results = []
    for fused in (True, False):
        student = make_family_model(family, len(tokenizer), seed=1)
        teacher = make_family_model(family, len(tokenizer), seed=2, hidden=48)
        trainer = _trainer(
            tmp_path, student, teacher, tokenizer, train_dataset, args={"kd_loss": "fkl+akl", "fused_loss": fused}
        )
        batch = next(iter(trainer.get_train_dataloader()))
        results.append(_loss_and_grads(trainer, batch))
    (fused_loss, fused_grads), (full_loss, full_grads) = results
    torch.testing.assert_close(fused_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == full_grads.keys() and fused_grads
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_logit_transforms_read_from_the_configurations():
    """The families read by rule (their modeling code is only read, not built here) get the right transform."""
    from transformers import AutoConfig

    def transform(model_type, **fields):
        return logit_transform(AutoConfig.for_model(model_type, **fields))

    assert transform("granite", logits_scaling=8.0).output_scale == 1 / 8
    assert transform("hyperclovax", logits_scaling=8.0).output_scale == 8.0
    minicpm = transform("minicpm3", hidden_size=1280, dim_model_base=320)
    assert (minicpm.input_scale, minicpm.output_scale) == (0.25, 1.0)
    assert transform("cohere2", logit_scale=0.5).output_scale == 0.5
    assert transform("mpt", logit_scale=0.5).output_scale == 1.0  # MPT's forward ignores its logit_scale
    assert transform("recurrent_gemma", logits_soft_cap=30.0).softcap == 30.0
    assert transform("llama").output_scale == 1.0 and transform("llama").softcap is None


class ScaledLogitsLlama(LlamaForCausalLM):
    """A model that transforms its logits in a way no rule knows (a custom model)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_unknown_logit_transform_is_refused_on_the_first_step(tmp_path, tokenizer, teacher, train_dataset):
    reference = make_model(len(tokenizer), 32, 1, seed=1)
    student = ScaledLogitsLlama(reference.config)
    student.load_state_dict(reference.state_dict())
    trainer = _trainer(tmp_path, student, teacher, tokenizer, train_dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises(ValueError, match="ScaledLogitsLlama.*fused_loss=False"):
        trainer.compute_loss(trainer.model, batch)
    unfused = _trainer(tmp_path, student, teacher, tokenizer, train_dataset, args={"fused_loss": False})
    assert torch.isfinite(unfused.compute_loss(unfused.model, batch))


def test_non_finite_logits_are_reported_as_such_not_blamed_on_logit_transforms():
    model = make_model(29, 32, 1, seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    ids = torch.randint(0, 29, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    with pytest.raises(FloatingPointError, match="LlamaForCausalLM gives non-finite logits.*whatever its logit"):
        verify_output_head(output_head(model), out)


def test_dskd_bridge_uses_the_models_logit_scaling():
    """DSKD's heads are the models' own: its loss on Granite equals the loss computed from Granite's logits."""
    tok = make_tokenizer()
    batch = DataCollatorForChatML(tokenizer=tok)(make_conversations(4, seed=3))
    student = make_family_model("granite", len(tok), seed=1)
    teacher = make_family_model("granite", len(tok), seed=2, hidden=48).requires_grad_(False)
    bridge = DSKDBridge(student, teacher, bridge_args(5))
    loss, values = bridge.compute_loss(student, teacher, batch)
    s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(s_out.logits[:, :-1].reshape(-1, len(tok)), labels.reshape(-1))
    torch.testing.assert_close(values["ce"], ce.detach(), rtol=1e-5, atol=1e-6)


# --- LoRA on the head ---------------------------------------------------------------------------------------------


def test_dskd_bridge_uses_the_lora_adapted_head():
    """With LoRA on lm_head, every DSKD term (the projected t2s logits too) sees the adapted head."""
    tok = make_tokenizer()
    batch = DataCollatorForChatML(tokenizer=tok)(make_conversations(4, seed=3))
    student, teacher = make_pair(len(tok))
    teacher.requires_grad_(False)
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    lora = get_peft_model(student, config)
    bridge = DSKDBridge(lora, teacher, bridge_args(5))
    loss, values = bridge.compute_loss(lora, teacher, batch)
    loss.backward()
    head_lora = [p for n, p in lora.named_parameters() if "lm_head.lora_" in n]
    assert head_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_lora)
    merged = lora.merge_and_unload()  # the adapted head as a plain weight
    merged_loss, merged_values = bridge.compute_loss(merged, teacher, batch)
    torch.testing.assert_close(loss.detach(), merged_loss.detach(), rtol=1e-5, atol=1e-6)
    for name in values:
        torch.testing.assert_close(values[name], merged_values[name], rtol=1e-5, atol=1e-6, msg=name)


# --- padded vocabularies --------------------------------------------------------------------------------------------


def _padded(model, rows: int, seed: int = 0):
    """``model`` with its head grown to ``rows`` rows; the extra rows are huge random noise (no token)."""
    vocab, hidden = model.lm_head.weight.shape
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, rows, bias=False)
    with torch.no_grad():
        head.weight[:vocab] = model.lm_head.weight
        head.weight[vocab:] = torch.randn(rows - vocab, hidden, generator=g) * 50
    model.lm_head = head
    model.config.vocab_size = rows
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_padded_rows_do_not_change_the_loss(tmp_path, tokenizer, train_dataset, fused):
    """Heads padded to different sizes over one tokenizer: same loss and gradients as unpadded heads."""
    results = []
    for pad in (False, True):
        student, teacher = make_pair(len(tokenizer))
        if pad:
            student, teacher = _padded(student, len(tokenizer) + 3, seed=1), _padded(teacher, len(tokenizer) + 7)
        trainer = _trainer(
            tmp_path,
            student,
            teacher,
            tokenizer,
            train_dataset,
            args={"kd_loss": "ce+fkl+akl+span", "fused_loss": fused},
            teacher_processing_class=tokenizer,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        results.append(_loss_and_grads(trainer, batch))
    (plain_loss, plain_grads), (padded_loss, padded_grads) = results
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        padded = padded_grads[name]
        if name == "lm_head.weight":
            assert padded[grad.shape[0] :].abs().max() == 0  # padded rows get no gradient
            padded = padded[: grad.shape[0]]
        torch.testing.assert_close(padded, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_padded_pair_needs_the_shared_tokenizer(tmp_path, tokenizer, train_dataset):
    student, teacher = make_pair(len(tokenizer))
    teacher = _padded(teacher, len(tokenizer) + 7)
    with pytest.raises(ValueError, match="teacher_processing_class.*trains as it is.*bridge='dskd'"):
        _trainer(tmp_path, student, teacher, tokenizer, train_dataset)
    small = make_model(len(tokenizer) - 2, 48, 2, seed=2)
    with pytest.raises(ValueError, match="cannot predict every token"):
        _trainer(tmp_path, student, small, tokenizer, train_dataset, teacher_processing_class=tokenizer)
    other = make_tokenizer(extra_words=["extra"])
    with pytest.raises(ValueError, match="do not share a vocabulary.*bridge='dskd'"):
        _trainer(tmp_path, student, teacher, tokenizer, train_dataset, teacher_processing_class=other)


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_generation_never_emits_a_padded_id(tmp_path, tokenizer, train_dataset, source):
    """On-policy and seq-kd rollouts, SCRG's correction and re-generation: no id of a padded row, though those
    rows carry huge logits."""
    student, teacher = make_pair(len(tokenizer))
    student, teacher = _padded(student, len(tokenizer) + 3, seed=1), _padded(teacher, len(tokenizer) + 7)
    trainer = _trainer(
        tmp_path,
        student,
        teacher,
        tokenizer,
        train_dataset,
        teacher_processing_class=tokenizer,
        args={"seq_kd": source == "teacher", "max_new_tokens": 6},
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    rolled = trainer._rollout(trainer.model, inputs, source)
    assert rolled["input_ids"].max() < len(tokenizer)
    ids, mask, labels = trainer.generate_on_policy_outputs(trainer.model, inputs, trainer.generation_config)
    batch = GeneratedBatch(ids, mask, labels, inputs["prompts"].shape[1], "student")
    config = trainer.generation_config
    ctx = GenerationContext(trainer.model, trainer.teacher_model, tokenizer, tokenizer, config, None)
    corrected = SCRGCallback(corrections=2).on_generation(batch, ctx)
    assert corrected.stats["scrg/corrected_tokens"] > 0
    assert corrected.input_ids.max() < len(tokenizer)


def test_evaluation_over_real_tokens(tokenizer):
    """Greedy answers never pick a padded id; token KL ignores padded rows (same value as unpadded heads)."""
    student, teacher = make_pair(len(tokenizer))
    conversations = [row["messages"] for row in make_conversations(4, seed=5)]
    kl = token_kl(student, teacher, tokenizer, conversations, batch_size=2)
    student, teacher = _padded(student, len(tokenizer) + 3, seed=1), _padded(teacher, len(tokenizer) + 7)
    assert token_kl(student, teacher, tokenizer, conversations, batch_size=2) == pytest.approx(kl, rel=1e-5)
    generated = []
    generate = student.generate
    student.generate = lambda **kw: generated.append(generate(**kw)) or generated[-1]
    generate_answers(student, tokenizer, [c[:1] for c in conversations], 6, batch_size=2)
    assert generated and all(out.max() < len(tokenizer) for out in generated)


def test_plain_heads_take_the_engines_linear_path_and_lora_heads_do_not():
    """The engine applies a plain linear head outside autograd (its scale and soft-cap stay exact, see the family
    tests above); a LoRA-adapted head keeps the autograd path."""
    from hf_kd.losses.core import _linear_form

    model = make_family_model("granite", 40)
    form = _linear_form(output_head(model, vocab_size=37))
    assert form is not None and form.columns == 37 and form.finish is not None and form.trainable
    assert not _linear_form(output_head(model, frozen=True)).trainable
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    assert _linear_form(output_head(lora)) is None
