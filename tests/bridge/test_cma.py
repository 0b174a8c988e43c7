"""DSKD with different vocabularies: cross-model attention, dual tokenization, and the bridge's loss."""

import math

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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_kd.bridge import DSKDBridge, DualTokenizationCollator
from hf_kd.bridge.cma import CrossModelAttention, index_embeddings, masked_softmax, masked_std
from hf_kd.bridge.tokenization import encode_conversation, render_chat
from hf_kd.rollout.callbacks import GeneratedBatch


def make_teacher_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the conversations' text, without a chat template (the plain format applies)."""
    texts = [m["content"] for c in make_conversations(48, seed=7) for m in c["messages"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts + ["User: Assistant:"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizers_pair():
    return make_tokenizer(), make_teacher_tokenizer()


@pytest.fixture
def cross_setup(tokenizers_pair):
    student_tok, teacher_tok = tokenizers_pair
    student, teacher = make_pair(len(student_tok), len(teacher_tok))
    teacher.requires_grad_(False)
    batch = DualTokenizationCollator(student_tok, teacher_tok)(make_conversations(4, seed=3))
    args = bridge_args(7)
    return student, teacher, batch, args, teacher_tok


# --- attention alignment on hand-made inputs ------------------------------------------------------------------


def test_masked_softmax_excludes_masked_keys():
    scores = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]]])
    mask = torch.tensor([[True, False, True]])
    w = masked_softmax(scores, mask)
    assert w[..., 1].abs().max() == 0
    torch.testing.assert_close(w[0, 0, [0, 2]], torch.softmax(torch.tensor([1.0, 3.0]), -1))
    torch.testing.assert_close(w[0, 1, [0, 2]], torch.softmax(torch.tensor([0.5, -1.0]), -1))
    uniform = masked_softmax(scores, torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(uniform, torch.full_like(scores, 1 / 3))


def test_masked_std_uses_selected_positions_only():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    got = masked_std(x, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(got, torch.tensor([1.0, 2.0, 3.0, 4.0]).std())
    assert masked_std(x, torch.zeros(1, 3, dtype=torch.bool)) == 1.0


def test_index_embeddings_use_token_zero_where_ignored_and_detach():
    emb = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[3, 4, 5]])
    targets = torch.tensor([[-100, 5, 6]])
    x, y = index_embeddings(emb, ids, targets)
    torch.testing.assert_close(x[0], emb.weight[[0, 4, 5]].detach())
    torch.testing.assert_close(y[0], emb.weight[[0, 5, 6]].detach())
    assert not x.requires_grad and not y.requires_grad


def _identity(dim: int) -> torch.nn.Linear:
    lin = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(dim))
        lin.bias.zero_()
    return lin


def test_identical_tokenizations_align_near_identity():
    torch.manual_seed(0)
    d, T = 8, 9
    emb = torch.nn.Embedding(32, d)
    ids = torch.arange(1, T + 1).unsqueeze(0)
    targets = torch.arange(2, T + 2).unsqueeze(0)
    targets[0, :2] = -100  # a two-token prompt
    mask = targets != -100
    cma = CrossModelAttention(d, d)
    with torch.no_grad():  # Q = 10 [E(x); E(y)]: the scaled dot product peaks on the same position
        cma.query.weight.copy_(10 * torch.eye(2 * d))
        cma.query.bias.zero_()
    hidden = torch.randn(1, T, d)
    index = index_embeddings(emb, ids, targets)
    out = cma(index, index, hidden, hidden, mask, mask, _identity(d), _identity(d))
    valid = mask[0]
    diag = out.t2s_weights[0][valid][:, valid].diagonal()
    assert diag.min() > 0.99
    assert out.t2s_weights[0][:, ~valid].abs().max() == 0  # prompt positions of the teacher get no weight
    assert out.s2t_weights[0][:, ~valid].abs().max() == 0
    # rows aligned one-to-one carry the other side's value at the same position
    h = hidden[0][valid]
    torch.testing.assert_close(out.s2t_hidden[0][valid], h, atol=1e-2, rtol=0)
    std_h, std_y = masked_std(hidden, mask), masked_std(index[1], mask)
    torch.testing.assert_close(out.t2s_hidden[0][valid], h / std_h + index[1][0][valid] / std_y, atol=1e-2, rtol=0)


def test_alignment_shapes_and_invariance_to_masked_positions():
    torch.manual_seed(1)
    B, Ts, Tt, ds, dt = 2, 5, 7, 6, 10
    s_idx = (torch.randn(B, Ts, ds), torch.randn(B, Ts, ds))
    t_idx = (torch.randn(B, Tt, dt), torch.randn(B, Tt, dt))
    hs, ht = torch.randn(B, Ts, ds), torch.randn(B, Tt, dt)
    s_mask = torch.tensor([[False, True, True, True, False], [True] * 5])
    t_mask = torch.tensor([[False, False, True, True, True, False, False], [False] + [True] * 6])
    cma, t2s, s2t = CrossModelAttention(ds, dt), torch.nn.Linear(dt, ds), torch.nn.Linear(ds, dt)
    out = cma(s_idx, t_idx, hs, ht, s_mask, t_mask, t2s, s2t)
    assert out.t2s_hidden.shape == (B, Ts, ds) and out.s2t_hidden.shape == (B, Tt, dt)
    assert out.t2s_weights.shape == (B, Ts, Tt) and out.s2t_weights.shape == (B, Tt, Ts)
    torch.testing.assert_close(out.t2s_weights.sum(-1), torch.ones(B, Ts))
    # scaling: A = Q K^T / sqrt(2 d_t) with K = [E_t(x); E_t(y)] / std over response positions
    k = torch.cat(t_idx, -1)
    scores = cma.query(torch.cat(s_idx, -1)) @ (k / masked_std(k, t_mask)).transpose(-1, -2) / math.sqrt(2 * dt)
    torch.testing.assert_close(out.t2s_weights, masked_softmax(scores, t_mask))
    # whatever sits at masked positions of one side does not change what the other side receives
    noise_t = torch.where(t_mask.unsqueeze(-1), 0.0, 50 * torch.randn(B, Tt, dt))
    noise_s = torch.where(s_mask.unsqueeze(-1), 0.0, 50 * torch.randn(B, Ts, ds))
    out2 = cma(
        (s_idx[0] + noise_s, s_idx[1]),
        (t_idx[0] + noise_t, t_idx[1]),
        hs + noise_s,
        ht + noise_t,
        s_mask,
        t_mask,
        t2s,
        s2t,
    )
    torch.testing.assert_close(out2.t2s_hidden[s_mask], out.t2s_hidden[s_mask])
    torch.testing.assert_close(out2.s2t_hidden[t_mask], out.s2t_hidden[t_mask])


# --- dual tokenization ----------------------------------------------------------------------------------------


def test_collator_pairs_the_same_conversation(tokenizers_pair):
    student_tok, teacher_tok = tokenizers_pair
    convs = make_conversations(5, seed=4)
    batch = DualTokenizationCollator(student_tok, teacher_tok)(convs)
    for key in ("input_ids", "labels", "prompts", "teacher_input_ids", "teacher_labels", "teacher_prompts"):
        assert key in batch
    assert batch["teacher_input_ids"].shape == batch["teacher_labels"].shape == batch["teacher_attention_mask"].shape
    assert batch["prompt_messages"] == [c["messages"][:-1] for c in convs]
    for i, conv in enumerate(convs):
        answer = conv["messages"][-1]["content"]
        s_lab, t_lab = batch["labels"][i], batch["teacher_labels"][i]
        s_text = student_tok.decode(s_lab[s_lab != -100], skip_special_tokens=True).strip()
        t_text = teacher_tok.decode(t_lab[t_lab != -100], skip_special_tokens=True).strip()
        assert s_text == t_text == answer
        t_ids = batch["teacher_input_ids"][i][batch["teacher_attention_mask"][i].bool()]
        full = render_chat(teacher_tok, conv["messages"], add_generation_prompt=False)
        assert teacher_tok.decode(t_ids) == full  # plain format: "<bos>User: ...\nAssistant: ...<eos>\n"
        assert full.startswith("<bos>User: ") and f"Assistant: {answer}<eos>" in full
        p_ids = batch["teacher_prompts"][i][batch["teacher_prompt_attention_mask"][i].bool()]
        torch.testing.assert_close(p_ids, t_ids[: len(p_ids)])
        assert (t_lab[-len(t_ids) :][: len(p_ids)] == -100).all() and (
            t_lab[-len(t_ids) :][len(p_ids) :] != -100
        ).all()
    assert (batch["teacher_labels"][batch["teacher_attention_mask"] == 0] == -100).all()


def test_truncation_keeps_the_last_tokens(tokenizers_pair):
    teacher_tok = tokenizers_pair[1]
    prompt = [{"role": "user", "content": "please count from two"}]
    full, n_prompt = encode_conversation(teacher_tok, prompt, "two three four .")
    cut, n_cut = encode_conversation(teacher_tok, prompt, "two three four .", max_length=len(full) - 3)
    assert cut == full[3:] and n_cut == n_prompt - 3
    with pytest.raises(ValueError, match="max_length"):
        encode_conversation(teacher_tok, prompt, "two three four .", max_length=len(full) - n_prompt)
    rest, n_rest = encode_conversation(
        teacher_tok, prompt, "two three four .", max_length=len(full) - n_prompt, require_prompt=False
    )
    assert rest == full[n_prompt:] and n_rest == 0


def test_collator_requires_assistant_answer(tokenizers_pair):
    collator = DualTokenizationCollator(*tokenizers_pair)
    with pytest.raises(ValueError, match="assistant"):
        collator([{"messages": [{"role": "user", "content": "please count"}]}])


def test_generated_batch_is_retokenized_for_the_teacher(cross_setup, tokenizers_pair):
    student, teacher, batch, args, teacher_tok = cross_setup
    student_tok = tokenizers_pair[0]
    bridge = DSKDBridge(student, teacher, args, teacher_tokenizer=teacher_tok)
    generated = GeneratedBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], 0, "student")
    complete = bridge.teacher_inputs_for_generated(generated, student_tok, teacher_tok, batch["prompt_messages"])
    for key in ("teacher_input_ids", "teacher_attention_mask", "teacher_labels"):
        torch.testing.assert_close(complete[key], batch[key])
    # cut every completion before its last word and end of turn: the teacher gets no end of turn either
    labels = batch["labels"].clone()
    for row in labels:
        kept = (row != -100).nonzero().squeeze(-1)
        row[kept[-2:]] = -100
    cut = GeneratedBatch(batch["input_ids"], batch["attention_mask"], labels, 0, "student")
    partial = bridge.teacher_inputs_for_generated(cut, student_tok, teacher_tok, batch["prompt_messages"])
    for i, row in enumerate(partial["teacher_labels"]):
        text = teacher_tok.decode(row[row != -100])
        assert "<eos>" not in text
        assert text.strip() == student_tok.decode(labels[i][labels[i] != -100]).strip()
    with pytest.raises(ValueError, match="prompt_messages"):
        bridge.teacher_inputs_for_generated(cut, student_tok, teacher_tok)


# --- the cross-vocabulary loss -----------------------------------------------------------------------------------


def _reference_cma(student, teacher, bridge, batch, temperature):
    """DSKD-CMA (official dual_space_kd_with_cross_model_attention.py) on full logits, std over response tokens."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        t = teacher(
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch["teacher_attention_mask"],
            output_hidden_states=True,
        )
    y, ty = batch["labels"][:, 1:], batch["teacher_labels"][:, 1:]
    m, tm = y != -100, ty != -100
    x, tx = batch["input_ids"][:, :-1], batch["teacher_input_ids"][:, :-1]
    es, et = student.get_input_embeddings().weight.detach(), teacher.get_input_embeddings().weight.detach()
    q_in = torch.cat([es[x.masked_fill(~m, 0)], es[y.masked_fill(~m, 0)]], -1)
    k = torch.cat([et[tx.masked_fill(~tm, 0)], et[ty.masked_fill(~tm, 0)]], -1)
    t_target = et[ty.masked_fill(~tm, 0)]
    h_s, h_t = s.hidden_states[-1][:, :-1], t.hidden_states[-1][:, :-1]
    align = bridge.cma.query(q_in) @ (k / k[tm].std()).transpose(-1, -2) / math.sqrt(k.shape[-1])
    mask2 = m.unsqueeze(-1) & tm.unsqueeze(1)
    align = align.masked_fill(~mask2, -1e5)
    v_t = bridge.t2s(h_t / h_t[tm].std() + t_target / t_target[tm].std())
    t2s_logits = (torch.softmax(align, -1) @ v_t) @ student.lm_head.weight.detach().T
    s2t_logits = (torch.softmax(align.transpose(-1, -2), -1) @ bridge.s2t(h_s)) @ teacher.lm_head.weight.T
    n = m.sum()
    logits_s = s.logits[:, :-1]
    ce = F.cross_entropy(logits_s[m], y[m], reduction="sum") / n
    t2s_ce = F.cross_entropy(t2s_logits[m], y[m], reduction="sum") / n
    correct = t2s_logits.argmax(-1) == y
    log_p = F.log_softmax(t2s_logits.detach() / temperature, -1)
    kl = (log_p.exp() * (log_p - F.log_softmax(logits_s / temperature, -1))).sum(-1)
    kd_student = (kl * (m & correct)).sum() / n
    log_t = F.log_softmax(t.logits[:, :-1] / temperature, -1)
    kl_t = (log_t.exp() * (log_t - F.log_softmax(s2t_logits / temperature, -1))).sum(-1)
    kd_teacher = (kl_t * tm).sum() / n
    total = 0.5 * ce + 0.5 * (kd_student + t2s_ce + kd_teacher)
    return total, {"ce": ce, "t2s_ce": t2s_ce, "kd_student": kd_student, "kd_teacher": kd_teacher}, correct[m]


def test_cma_loss_matches_direct_reference(cross_setup):
    student, teacher, batch, args, teacher_tok = cross_setup
    bridge = DSKDBridge(student, teacher, args, teacher_tokenizer=teacher_tok)
    with torch.no_grad():  # make the projected teacher right at some positions so the argmax mask matters
        bridge.t2s.weight.mul_(40)
    loss, values = bridge.compute_loss(student, teacher, batch)
    loss.backward()
    watched = [bridge.cma.query.weight, bridge.t2s.weight, bridge.s2t.weight, student.lm_head.weight]
    fused = [p.grad.clone() for p in watched]
    for p in watched:
        p.grad = None
    ref, ref_values, correct = _reference_cma(student, teacher, bridge, batch, 2.0)
    ref.backward()
    assert 0 < int(correct.sum()) < correct.numel()
    torch.testing.assert_close(values["t2s_acc"], correct.float().mean())
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, value in ref_values.items():
        torch.testing.assert_close(values[name], value.detach(), atol=1e-5, rtol=1e-5)
    for got, p in zip(fused, watched):
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)


def test_cma_gradients_reach_projectors_and_student_only(cross_setup):
    student, teacher, batch, args, teacher_tok = cross_setup
    teacher.requires_grad_(True)
    bridge = DSKDBridge(student, teacher, args, teacher_tokenizer=teacher_tok)
    assert set(bridge.state_dict()) >= {"t2s.weight", "s2t.weight", "cma.query.weight"}
    loss, _ = bridge.compute_loss(student, teacher, batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bridge.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_cma_loss_decreases_with_adamw(cross_setup):
    student, teacher, batch, args, teacher_tok = cross_setup
    bridge = DSKDBridge(student, teacher, args, teacher_tokenizer=teacher_tok)
    losses, values = train_bridge(bridge, student, teacher, batch, steps=20)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.isfinite(v) for v in values.values())


def test_cma_needs_teacher_tokenization(cross_setup):
    student, teacher, batch, args, teacher_tok = cross_setup
    bridge = DSKDBridge(student, teacher, args, teacher_tokenizer=teacher_tok)
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with pytest.raises(ValueError, match="DualTokenizationCollator"):
        bridge.compute_loss(student, teacher, plain)


# --- through the trainer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_trainer_with_different_tokenizers(tmp_path, tokenizers_pair, lmbda):
    from datasets import Dataset

    from hf_kd import DistillationTrainer

    student_tok, teacher_tok = tokenizers_pair
    student, teacher = make_pair(len(student_tok), len(teacher_tok))
    args = make_args(
        tmp_path,
        bridge="dskd",
        kd_loss="fkl",
        lmbda=lmbda,
        max_new_tokens=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        projector_lr=1e-2,
        max_steps=12,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(make_conversations(8, seed=5)),
        processing_class=student_tok,
        teacher_processing_class=teacher_tok,
    )
    assert isinstance(trainer.data_collator.collator, DualTokenizationCollator)
    projector = trainer.bridge.cma.query.weight.detach().clone()
    trainer.train()
    history = trainer.state.log_history
    losses = train_losses(trainer)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    for name in ("ce", "kd_student", "t2s_ce", "kd_teacher", "t2s_acc"):
        assert any(f"loss/{name}" in e for e in history)
    assert not torch.equal(projector, trainer.bridge.cma.query.weight.detach())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in teacher.parameters())
    if lmbda == 0.0:  # a fixed data set: the loss must go down
        assert sum(losses[-3:]) < sum(losses[:3])
