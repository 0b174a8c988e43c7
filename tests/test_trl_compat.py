"""A GKD user's code, with only the import changed: what TRL 1.16's GKD tests exercise, run against hf_kd.

The cases follow TRL's tests/experimental/test_gkd_trainer.py (generation, the generalized JSD, init, train and
evaluate, the generation config, normalisation) plus what a GKD or SFT user also relies on (dataset kinds and
formats, compute_metrics, LoRA, save and resume, inherited options), on tiny offline models. Differences that are
intended are listed in docs/trl_compatibility.md.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from tiny import make_conversations, make_model, make_tokenizer, train_losses
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, TrainerCallback
from trl.experimental.gkd import GKDConfig as TRLGKDConfig
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

from hf_kd import DistillationConfig as GKDConfig
from hf_kd import DistillationTrainer as GKDTrainer

# CPU settings a GKD user passes on a machine without CUDA (GKDConfig defaults bf16 and checkpointing on).
CPU = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}


def gkd_config(tmp_path, config_class=GKDConfig, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_new_tokens=8,
        seed=0,
        **CPU,
    )
    return config_class(**{**values, **overrides})


def gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, **kwargs):
    config_overrides = kwargs.pop("args", {})
    return GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=gkd_config(tmp_path, **config_overrides),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **kwargs,
    )


def generalized_jsd(student_logits, teacher_logits, labels, beta: float) -> torch.Tensor:
    """GKD's Eq. (1) per token, summed over labelled positions / their count, in float64, from its definition:
    beta * KL(p_T || m) + (1 - beta) * KL(p_S || m) with m = beta * p_T + (1 - beta) * p_S (beta 0: KL(p_T || p_S),
    beta 1: KL(p_S || p_T))."""
    p_s = torch.softmax(student_logits.double(), -1)
    p_t = torch.softmax(teacher_logits.double(), -1)

    def kl(p, q):
        return (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1)

    if beta == 0:
        per_token = kl(p_t, p_s)
    elif beta == 1:
        per_token = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        per_token = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    mask = labels != -100
    return per_token[mask].sum() / mask.sum()


def collated(trainer, dataset, n: int = 4) -> dict:
    return trainer.data_collator([dataset[i] for i in range(n)])


def full_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


# ---------------------------------------------------------------- generation (generate_on_policy_outputs)


def test_generate_on_policy_outputs_is_deterministic_when_greedy_and_masks_the_prompt(tokenizer, student):
    tokenizer.padding_side = "left"
    prompts = tokenizer(
        ["please count from two", "please count from seven to nine"], return_tensors="pt", padding=True
    )
    inputs = {"prompts": prompts["input_ids"], "prompt_attention_mask": prompts["attention_mask"]}
    config = GenerationConfig(
        max_new_tokens=10, min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.eos_token_id
    )
    first = GKDTrainer.generate_on_policy_outputs(student, inputs, config)
    second = GKDTrainer.generate_on_policy_outputs(student, inputs, config)
    assert isinstance(first, tuple) and len(first) == 3
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ids, mask, labels = first
    width = prompts["input_ids"].shape[1]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    assert torch.equal(ids[:, :width], prompts["input_ids"])  # the generations continue the prompts
    assert (labels[:, :width] == -100).all()
    assert (labels[:, width:] != -100).any()


def test_generation_config_is_set_from_the_config(tmp_path, tokenizer, student, teacher, train_dataset):
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, args={"temperature": 0.7})
    generation = trainer.generation_config
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.eos_token_id == student.generation_config.eos_token_id
    assert generation.max_new_tokens == 8
    assert generation.temperature == 0.7
    assert generation.top_k == 0 and generation.do_sample


# ---------------------------------------------------------------- the loss against its definition


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_compute_loss_is_the_generalized_jsd(tmp_path, tokenizer, student, teacher, train_dataset, beta, fused):
    trainer = gkd_trainer(
        tmp_path, tokenizer, student, teacher, train_dataset, args={"beta": beta, "fused_loss": fused}
    )
    batch = collated(trainer, train_dataset)
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, batch)
    expected = generalized_jsd(full_logits(student, batch), full_logits(teacher, batch), batch["labels"][:, 1:], beta)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-7)
    assert value > 0


def test_inherited_generalized_jsd_loss_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[-100, 1, 2], [3, 4, -100]])
    for beta in (0.0, 0.3, 1.0):
        value = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
        torch.testing.assert_close(value.double(), generalized_jsd(s, t, labels, beta), rtol=1e-5, atol=1e-7)
    assert GKDTrainer.generalized_jsd_loss(s, s).abs() < 1e-6
    assert GKDTrainer.generalized_jsd_loss(s, t, reduction="none").shape == s.shape


def test_loss_normalises_by_num_items_in_batch_over_every_completion_token(tmp_path, tokenizer, student, teacher):
    """sum / num_items_in_batch: the local count gives the mean, twice the count half of it, also when the prompts
    of a batch differ in length (the labels are not cut at the widest prompt)."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "please count from two"},
                {"role": "assistant", "content": "two ."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "please count from one to nine please count from one to nine"},
                {"role": "assistant", "content": "one two three four five six seven eight nine ."},
            ]
        },
    ]
    data = Dataset.from_list(rows)
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, data)
    batch = collated(trainer, data, 2)
    prompt_lengths = batch["prompt_attention_mask"].sum(1)
    assert prompt_lengths[0] < prompt_lengths[1]
    n = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        mean = trainer.compute_loss(trainer.model, batch)
        by_count = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
        by_double = trainer.compute_loss(trainer.model, batch, num_items_in_batch=2 * n)
    torch.testing.assert_close(by_count, mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(by_double, mean / 2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- on-policy normalisation (hf_kd's own, or GKD's)


def _one_on_policy_step(tmp_path, trainer_class, config_class, student, teacher, tokenizer, data, **overrides):
    """The logged loss of one fully on-policy step and what compute_loss saw (batch, num_items_in_batch)."""
    args = gkd_config(tmp_path, config_class, max_steps=1, lmbda=1.0, learning_rate=1e-2, **overrides)
    trainer = trainer_class(
        model=copy.deepcopy(student),
        teacher_model=copy.deepcopy(teacher),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, int(num_items_in_batch)))
        return compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = recording
    trainer.train()
    return train_losses(trainer)[0], seen


def test_on_policy_normalization_gkd_reproduces_trl_and_the_default_divides_by_generated_tokens(
    tmp_path, tokenizer, student, teacher, train_dataset
):
    trl_loss, trl_seen = _one_on_policy_step(
        tmp_path / "trl", TRLGKDTrainer, TRLGKDConfig, student, teacher, tokenizer, train_dataset
    )
    gkd_loss, gkd_seen = _one_on_policy_step(
        tmp_path / "gkd",
        GKDTrainer,
        GKDConfig,
        student,
        teacher,
        tokenizer,
        train_dataset,
        on_policy_normalization="gkd",
    )
    default_loss, default_seen = _one_on_policy_step(
        tmp_path / "default", GKDTrainer, GKDConfig, student, teacher, tokenizer, train_dataset
    )
    # the same seed samples the same generations
    batch = gkd_seen[0][0]
    for seen in (trl_seen, default_seen):
        assert torch.equal(seen[0][0]["input_ids"], batch["input_ids"])
    labels = batch["labels"][:, 1:]
    generated = int((labels != -100).sum())
    dataset_labels = gkd_seen[0][1]
    assert dataset_labels == trl_seen[0][1] != generated  # GKD's count: the replaced dataset labels
    jsd_sum = generalized_jsd(full_logits(student, batch), full_logits(teacher, batch), labels, 0.5) * generated
    torch.testing.assert_close(torch.tensor(gkd_loss), torch.tensor(trl_loss), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(gkd_loss).double(), jsd_sum / dataset_labels, rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(default_loss).double(), jsd_sum / generated, rtol=1e-4, atol=0)


def test_on_policy_normalization_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_policy_normalization must be 'generated' or 'gkd'"):
        gkd_config(tmp_path, on_policy_normalization="tokens")


# ---------------------------------------------------------------- init with each dataset kind, train, evaluate


def test_train_evaluate_and_checkpoint_as_in_gkd(
    tmp_path, tokenizer, student, teacher, train_dataset, heldout_dataset
):
    args = {
        "dataloader_drop_last": True,
        "eval_strategy": "steps",
        "max_steps": 4,
        "eval_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "lmbda": 0.5,
    }
    trainer = gkd_trainer(
        tmp_path, tokenizer, student, teacher, train_dataset, eval_dataset=heldout_dataset, args=args
    )
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [2, 4]
    assert "model.safetensors" in os.listdir(tmp_path / "out" / "checkpoint-2")


def test_models_given_as_paths_with_init_kwargs(tmp_path, tokenizer, student, teacher, train_dataset):
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    args = {"teacher_model_init_kwargs": {"dtype": "float32"}, "model_init_kwargs": {"dtype": "bfloat16"}}
    trainer = gkd_trainer(
        tmp_path, tokenizer, str(tmp_path / "student"), str(tmp_path / "teacher"), train_dataset, args=args
    )
    assert trainer.model.dtype == torch.bfloat16 and trainer.teacher_model.dtype == torch.float32


def test_eval_dataset_dict_is_evaluated_per_name(
    tmp_path, tokenizer, student, teacher, train_dataset, heldout_dataset
):
    evals = {"a": heldout_dataset, "b": heldout_dataset.select(range(4))}
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, eval_dataset=evals)
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss"} <= set(metrics)


# Formats and streams come with TRL's SFT data support (hf_kd.formats): a GKD user passes them unchanged.
def _stream(rows):
    return IterableDataset.from_generator(lambda: iter(rows))


FORMATS = {
    "stream": lambda: _stream(make_conversations(16)),
    "prompt_completion_strings": lambda: Dataset.from_list(
        [{"prompt": "please count from two", "completion": " two three ."}] * 8
    ),
    "prompt_completion_messages": lambda: Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "please count from two"}],
                "completion": [{"role": "assistant", "content": "two three ."}],
            }
        ]
        * 8
    ),
    "text": lambda: Dataset.from_list([{"text": "two three four ."}] * 8),
}


@pytest.mark.parametrize("kind", FORMATS)
def test_each_dataset_kind_trains_and_evaluates(tmp_path, tokenizer, student, teacher, kind):
    data = FORMATS[kind]()
    lmbda = 0.0 if kind == "text" else 0.5
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, data, eval_dataset=data, args={"lmbda": lmbda})
    trainer.train()
    assert len(train_losses(trainer)) == 2
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_prompt_only_data_trains_fully_on_policy(tmp_path, tokenizer, student, teacher):
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "please count from two"}]}] * 8)
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, data, args={"lmbda": 1.0})
    trainer.train()
    assert len(train_losses(trainer)) == 2


# ---------------------------------------------------------------- compute_metrics gets what Trainer gives it


def token_accuracy(prediction) -> dict:
    predicted = prediction.predictions.argmax(-1)[:, :-1]
    labels = prediction.label_ids[:, 1:]
    mask = labels != -100
    return {"token_accuracy": float((predicted[mask] == labels[mask]).mean())}


def _logit_positions(trainer) -> list[int]:
    """Records the positions whose logits each student forward returns (1: only the last one kept)."""
    seen = []
    trainer.model.register_forward_hook(lambda module, args, out: seen.append(out.logits.shape[1]))
    return seen


@pytest.mark.parametrize("fused", [True, False])
def test_compute_metrics_gets_every_position_and_the_eval_loss_is_the_training_loss(
    tmp_path, tokenizer, student, teacher, train_dataset, heldout_dataset, fused
):
    trainer = gkd_trainer(
        tmp_path,
        tokenizer,
        student,
        teacher,
        train_dataset,
        eval_dataset=heldout_dataset,
        compute_metrics=token_accuracy,
        args={"per_device_eval_batch_size": 8, "fused_loss": fused},
    )
    rows = _logit_positions(trainer)
    metrics = trainer.evaluate()
    batch = collated(trainer, heldout_dataset, 8)
    assert rows == [batch["input_ids"].shape[1]]
    logits = full_logits(student, batch)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected_accuracy = (logits.argmax(-1)[mask] == labels[mask]).double().mean().item()
    assert metrics["eval_token_accuracy"] == pytest.approx(expected_accuracy)
    expected_loss = generalized_jsd(logits, full_logits(teacher, batch), labels, 0.5).item()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(trainer.compute_loss(trainer.model, batch).item(), rel=1e-5)


def test_preprocess_logits_for_metrics_reads_full_logits_and_feeds_compute_metrics(
    tmp_path, tokenizer, student, teacher, train_dataset, heldout_dataset
):
    shapes = []

    def argmax(logits, labels):
        shapes.append(tuple(logits.shape))
        return logits.argmax(-1)

    def accuracy(prediction):
        predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        mask = labels != -100
        return {"token_accuracy": float((predicted[mask] == labels[mask]).mean())}

    trainer = gkd_trainer(
        tmp_path,
        tokenizer,
        student,
        teacher,
        train_dataset,
        eval_dataset=heldout_dataset,
        compute_metrics=accuracy,
        preprocess_logits_for_metrics=argmax,
        args={"per_device_eval_batch_size": 8},
    )
    metrics = trainer.evaluate()
    batch = collated(trainer, heldout_dataset, 8)
    assert shapes == [(8, batch["input_ids"].shape[1], len(tokenizer))]
    assert 0.0 <= metrics["eval_token_accuracy"] <= 1.0


def test_evaluation_without_metrics_keeps_the_cheap_fused_forward(
    tmp_path, tokenizer, student, teacher, train_dataset, heldout_dataset
):
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, eval_dataset=heldout_dataset)
    rows = _logit_positions(trainer)
    trainer.evaluate()
    assert rows and set(rows) == {1}


# ---------------------------------------------------------------- LoRA, save and resume


def test_lora_student_trains_and_saves_its_adapter(tmp_path, tokenizer, student, teacher, train_dataset):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    trainer.save_model()
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "out")


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path, tokenizer, teacher, train_dataset):
    def run(folder, max_steps, resume=None):
        args = {"max_steps": max_steps, "save_strategy": "steps", "save_steps": 2, "output_dir": str(folder)}
        trainer = gkd_trainer(
            tmp_path, tokenizer, make_model(len(tokenizer), 32, 1, seed=1), teacher, train_dataset, args=args
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole", 4)
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------- inherited options: honoured or refused


@pytest.mark.parametrize(
    "option, value",
    [
        ("eval_packing", True),
        ("truncation_mode", "keep_end"),
        ("pad_token", "<pad>"),
        ("dataset_num_proc", 2),
        ("dataset_kwargs", {"add_special_tokens": False}),
        ("dataset_kwargs", {"skip_prepare_dataset": False}),
        ("chat_template_path", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ],
)
def test_options_whose_sft_code_never_runs_are_refused(
    tmp_path, tokenizer, student, teacher, train_dataset, option, value
):
    with pytest.raises(ValueError, match=f"`{option}=.*not supported by DistillationTrainer"):
        gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, args={option: value})


def test_model_init_kwargs_with_a_loaded_student_are_refused(tmp_path, tokenizer, student, teacher, train_dataset):
    with pytest.raises(ValueError, match="`model_init_kwargs` is only used when `model` is a path"):
        gkd_trainer(
            tmp_path, tokenizer, student, teacher, train_dataset, args={"model_init_kwargs": {"dtype": "float32"}}
        )


def test_a_moe_students_router_loss_is_refused_unless_turned_off(tmp_path, tokenizer, train_dataset):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        pad_token_id=0,
        eos_token_id=4,
    )
    teacher = make_model(len(tokenizer), hidden=32, layers=1, seed=2)
    with pytest.raises(ValueError, match="router load-balancing loss"):
        gkd_trainer(tmp_path, tokenizer, MixtralForCausalLM(config), teacher, train_dataset)
    trainer = gkd_trainer(
        tmp_path, tokenizer, MixtralForCausalLM(config), teacher, train_dataset, args={"router_aux_loss_coef": 0.0}
    )
    trainer.train()
    assert len(train_losses(trainer)) == 2


def test_teacher_model_name_or_path_loads_the_teacher(tmp_path, tokenizer, student, teacher, train_dataset):
    teacher.save_pretrained(tmp_path / "teacher")
    args = {"teacher_model_name_or_path": str(tmp_path / "teacher")}
    trainer = gkd_trainer(tmp_path, tokenizer, student, None, train_dataset, args=args)
    for a, b in zip(trainer.teacher_model.parameters(), teacher.parameters()):
        assert torch.equal(a, b)


def test_chat_template_path_file_is_read(tmp_path, student, teacher, train_dataset):
    from hf_kd.smoke import CHAT_TEMPLATE

    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    tokenizer = make_tokenizer(chat_template=None)
    args = {"chat_template_path": str(tmp_path / "chat.jinja")}
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, args=args)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    trainer.train()


def test_shuffle_dataset_shuffles_the_training_rows_once(tmp_path, tokenizer, student, teacher, train_dataset):
    trainer = gkd_trainer(tmp_path, tokenizer, student, teacher, train_dataset, args={"shuffle_dataset": True})
    assert list(trainer.train_dataset) == list(train_dataset.shuffle(seed=0))
    assert list(trainer.train_dataset) != list(train_dataset)


def test_neftune_noise_reaches_the_student(tmp_path, tokenizer, student, teacher, train_dataset):
    def first_loss(**args):
        trainer = gkd_trainer(
            tmp_path, tokenizer, copy.deepcopy(student), teacher, train_dataset, args={"max_steps": 1, **args}
        )
        trainer.train()
        return train_losses(trainer)[0]

    assert first_loss(neftune_noise_alpha=50.0) != pytest.approx(first_loss(), rel=1e-3)


def test_trackers_receive_every_loss_term(tmp_path, tokenizer, student, teacher, train_dataset):
    """report_to trackers are Trainer callbacks fed by `on_log`: each term of the recipe arrives there."""

    class Recorder(TrainerCallback):
        logs: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = gkd_trainer(
        tmp_path, tokenizer, student, teacher, train_dataset, callbacks=[recorder], args={"kd_loss": "0.5*ce+0.5*jsd"}
    )
    trainer.train()
    assert {"loss", "loss/ce", "loss/jsd"} <= set(recorder.logs[0])
