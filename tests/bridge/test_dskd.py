"""Same-vocabulary DSKD: the fused bridge against a direct reference, gradients, training, configuration."""

import pytest
import torch
import torch.nn.functional as F
from tiny import (
    bridge_args,
    make_args,
    make_conversations,
    make_pair,
    make_tokenizer,
    train_bridge,
    train_losses,
)
from trl.experimental.utils import DataCollatorForChatML

from hf_kd.bridge import DSKD_DEFAULT_TEMPERATURE, DSKDBridge
from hf_kd.losses import Recipe


@pytest.fixture
def pair():
    tok = make_tokenizer()
    student, teacher = make_pair(len(tok))
    teacher.requires_grad_(False)
    batch = DataCollatorForChatML(tokenizer=tok)(make_conversations(4, seed=3))
    return student, teacher, batch


def _kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per row."""
    log_p = F.log_softmax(p_logits, -1)
    return (log_p.exp() * (log_p - F.log_softmax(q_logits, -1))).sum(-1)


def _reference(student, teacher, bridge, batch, temperature, kd_rate, divergence):
    """DSKD (official dual_space_kd.py) written directly on full logits."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    logits_s, h_s = s.logits[:, :-1], s.hidden_states[-1][:, :-1]
    logits_t, h_t = t.logits[:, :-1], t.hidden_states[-1][:, :-1]
    labels = batch["labels"][:, 1:]
    m = labels != -100
    n = m.sum()
    t2s_logits = bridge.t2s(h_t) @ student.lm_head.weight.detach().T
    s2t_logits = bridge.s2t(h_s) @ teacher.lm_head.weight.T
    ce = F.cross_entropy(logits_s[m], labels[m], reduction="sum") / n
    t2s_ce = F.cross_entropy(t2s_logits[m], labels[m], reduction="sum") / n
    target = t2s_logits.detach()[m] / temperature
    if divergence == "fkl":
        kd_student = _kl(target, logits_s[m] / temperature).sum() / n
    else:  # rkl
        kd_student = _kl(logits_s[m] / temperature, target).sum() / n
    kd_teacher = _kl(logits_t[m] / temperature, s2t_logits[m] / temperature).sum() / n
    total = (1 - kd_rate) * ce + kd_rate * (kd_student + t2s_ce + kd_teacher)
    return total, {"ce": ce, "kd_student": kd_student, "t2s_ce": t2s_ce, "kd_teacher": kd_teacher}


def _grads(params):
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("divergence,temperature", [("fkl", None), ("rkl", 1.5)])
def test_fused_bridge_matches_direct_reference(pair, divergence, temperature):
    student, teacher, batch = pair
    bridge = DSKDBridge(student, teacher, bridge_args(5, kd_loss=divergence, kd_temperature=temperature, kd_rate=0.3))
    loss, values = bridge.compute_loss(student, teacher, batch)
    watched = [bridge.t2s.weight, bridge.s2t.weight, bridge.s2t.bias, student.lm_head.weight]
    watched.append(student.model.layers[0].self_attn.q_proj.weight)
    loss.backward()
    fused_grads = _grads(watched)

    temp = DSKD_DEFAULT_TEMPERATURE if temperature is None else temperature
    ref, ref_values = _reference(student, teacher, bridge, batch, temp, 0.3, divergence)
    ref.backward()
    ref_grads = _grads(watched)

    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, value in ref_values.items():
        torch.testing.assert_close(values[name], value.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(fused_grads, ref_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    labels = batch["labels"][:, 1:]
    assert 0.0 <= float(values["t2s_acc"]) <= 1.0
    assert set(values) == {"ce", "kd_student", "t2s_ce", "t2s_acc", "kd_teacher"}
    assert all(not v.requires_grad for v in values.values())
    assert int((labels != -100).sum()) > 8


def test_gradients_reach_projectors_and_student_only(pair):
    student, teacher, batch = pair
    teacher.requires_grad_(True)  # even a teacher left trainable must receive no gradient
    bridge = DSKDBridge(student, teacher, bridge_args(5))
    loss, _ = bridge.compute_loss(student, teacher, batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bridge.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.dim() > 1)
    assert all(p.grad is None for p in teacher.parameters())


def test_num_items_in_batch_normalises_every_term(pair):
    student, teacher, batch = pair
    bridge = DSKDBridge(student, teacher, bridge_args(5))
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean, _ = bridge.compute_loss(student, teacher, batch)
        summed, _ = bridge.compute_loss(student, teacher, batch, num_items_in_batch=2 * n)
    torch.testing.assert_close(summed, mean / 2)


def test_loss_decreases_with_adamw(pair):
    student, teacher, batch = pair
    bridge = DSKDBridge(student, teacher, bridge_args(5, kd_loss="jsd"))
    losses, values = train_bridge(bridge, student, teacher, batch, steps=20)
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.isfinite(values["t2s_ce"])


def test_temperature_and_recipe_validation(pair):
    student, teacher, _ = pair
    default = DSKDBridge(student, teacher, bridge_args(5, kd_loss="akl"))
    assert default.temperature == DSKD_DEFAULT_TEMPERATURE
    assert default.student_kd.terms[0].temperature == DSKD_DEFAULT_TEMPERATURE
    assert default.teacher_kd.terms[0].temperature == DSKD_DEFAULT_TEMPERATURE
    explicit = DSKDBridge(student, teacher, bridge_args(5, kd_temperature=1.0))
    assert explicit.student_kd.terms[0].temperature == 1.0 and explicit.teacher_kd.terms[0].temperature == 1.0
    with pytest.raises(ValueError, match="kd_rate"):
        DSKDBridge(student, teacher, bridge_args(5, kd_loss="0.5*ce+0.5*fkl"))
    with pytest.raises(ValueError, match=r"kd_rate must be in \[0, 1\]"):
        DSKDBridge(student, teacher, bridge_args(5, kd_rate=1.5))


def test_the_bridge_builds_the_recipe_it_is_given(pair):
    """The trainer's parsed recipe, not a second parse of the args: its terms and options, at the bridge's KD
    temperature where the recipe sets none."""
    student, teacher, _ = pair
    recipe = Recipe.parse("0.25*akl+srkl", {"akl_mu": 0.7, "srkl_temperature": 1.5})
    bridge = DSKDBridge(student, teacher, bridge_args(5, kd_loss="fkl"), recipe=recipe)
    akl, srkl = bridge.student_kd.terms
    assert (type(akl).name, akl.mu, akl.temperature) == ("akl", 0.7, DSKD_DEFAULT_TEMPERATURE)
    assert (type(srkl).name, srkl.temperature, bridge.student_kd.weights) == ("srkl", 1.5, [0.25, 1.0])


def test_same_vocab_rejects_mismatched_teacher_ids(pair):
    student, teacher, batch = pair
    bridge = DSKDBridge(student, teacher, bridge_args(5))
    bad = dict(batch, teacher_input_ids=batch["input_ids"][:, :-1])
    with pytest.raises(ValueError, match="teacher_tokenizer"):
        bridge.compute_loss(student, teacher, bad)


def test_trainer_same_vocabulary_off_policy(tmp_path):
    from datasets import Dataset

    from hf_kd import DistillationTrainer

    tok = make_tokenizer()
    student, teacher = make_pair(len(tok))
    args = make_args(
        tmp_path,
        bridge="dskd",
        kd_loss="akl",
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=12,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(make_conversations(8)),
        processing_class=tok,
    )
    assert trainer.bridge is not None and trainer.bridge.cma is None
    assert any(
        g["lr"] == args.projector_lr and g["params"][0] is trainer.bridge.t2s.weight
        for g in trainer.create_optimizer().param_groups
    )
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert {"loss/ce", "loss/kd_student", "loss/t2s_ce", "loss/kd_teacher"} <= {
        k for e in trainer.state.log_history for k in e
    }
