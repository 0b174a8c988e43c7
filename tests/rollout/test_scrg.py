"""SCRG on hand-built bigram models: which token is corrected, what is re-generated, lengths and EOS."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl.experimental.gkd import GKDTrainer

from hf_kd.rollout import GeneratedBatch, GenerationContext
from hf_kd.rollout.scrg import SCRGCallback

V, PAD, EOS = 16, 0, 1

# next-token choice of the student: a chain per starting token
STUDENT = {2: 3, 3: 4, 4: 5, 5: 6, 6: EOS, 9: 10, 10: EOS, 11: 12, 12: EOS, 13: 14, 14: 15, 15: EOS, 7: EOS, 8: EOS}


def bigram_llama(next_logits: torch.Tensor) -> LlamaForCausalLM:
    """A one-layer Llama whose next-token logits depend only on the current token: logits = next_logits[token].

    Attention and MLP outputs are zeroed, the embedding is the identity, so the final RMSNorm gives
    sqrt(V) * e_token and the head maps it to row ``token`` of ``next_logits``.
    """
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=V,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        rms_norm_eps=1e-12,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(next_logits.T / V**0.5)
    return model.eval()


def table(changes: dict[int, dict[int, float]] | None = None) -> torch.Tensor:
    logits = torch.zeros(V, V)
    for cur, nxt in STUDENT.items():
        logits[cur, nxt] = 10.0
    logits[EOS, EOS] = logits[PAD, EOS] = 10.0
    for cur, row in (changes or {}).items():
        logits[cur] = 0.0
        for nxt, value in row.items():
            logits[cur, nxt] = value
    return logits


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def student():
    return bigram_llama(table())


@pytest.fixture(scope="module")
def teacher():
    # disagrees strongly after 4 (9, not 5), mildly after 6 (7, not EOS), strongly after 14 (9, not 15)
    # and after 10 (7, not EOS); agrees elsewhere
    return bigram_llama(table({4: {9: 20.0}, 6: {7: 2.0, EOS: 1.0}, 14: {9: 20.0}, 10: {7: 20.0}}))


PROMPTS = torch.tensor([[7, 2], [PAD, 11], [PAD, 13]])
PROMPT_MASK = torch.tensor([[1, 1], [0, 1], [0, 1]])


def generate(student, max_new_tokens):
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    inputs = {"prompts": PROMPTS, "prompt_attention_mask": PROMPT_MASK}
    ids, mask, labels = GKDTrainer.generate_on_policy_outputs(student, inputs, config)
    return GeneratedBatch(ids, mask, labels, PROMPTS.shape[1], "student"), config


def run(student, teacher, tokenizer, max_new_tokens=5, teacher_tokenizer=None, **kw):
    batch, config = generate(student, max_new_tokens)
    ctx = GenerationContext(student, teacher, tokenizer, teacher_tokenizer, config, args=None)
    calls = []
    original = student.generate

    def spy(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    student.generate = spy
    try:
        out = SCRGCallback(**kw).on_generation(batch, ctx)
    finally:
        del student.generate
    return batch, out, calls


def completions(batch):
    """Generated tokens of each row (labels != -100), as lists."""
    return [row[lab != -100].tolist() for row, lab in zip(batch.input_ids, batch.labels)]


def test_student_generation_is_the_chain(student, tokenizer):
    batch, _ = generate(student, 5)
    assert completions(batch) == [[3, 4, 5, 6, EOS], [12, EOS], [14, 15, EOS]]


def test_one_correction_picks_largest_kl_and_student_regenerates(student, teacher, tokenizer):
    before, after, calls = run(student, teacher, tokenizer, corrections=1)
    # row 0: after 4 the teacher says 9 (KL ~ 10) and after 6 it says 7 (KL ~ 6): the position of 5 is
    # corrected to 9, then the student continues 9 -> 10 -> EOS; row 1 agrees everywhere and is kept;
    # row 2: 15 -> 9, then 10, EOS
    assert completions(after) == [[3, 4, 9, 10, EOS], [12, EOS], [14, 9, 10, EOS]]
    assert after.stats["scrg/corrected_tokens"] == 2.0
    assert calls == [(2, 5)]  # one batched call over the two corrected rows, left-padded prefixes
    # row 1 is untouched, and every row follows TRL's layout: prompt columns, then completion up to EOS
    n = after.input_ids.shape[1]
    assert after.prompt_length == 2 and torch.equal(after.input_ids[:, :2], before.input_ids[:, :2])
    assert torch.equal(after.attention_mask[:, :2], PROMPT_MASK)
    assert after.input_ids[1, :4].tolist() == before.input_ids[1, :4].tolist()
    assert after.attention_mask.tolist() == [[1] * n, [0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]]
    expected_labels = after.input_ids.masked_fill(after.attention_mask == 0, -100)
    expected_labels[:, :2] = -100
    assert torch.equal(after.labels, expected_labels)


def test_row_chunking_and_padded_teacher_head(student, tokenizer, monkeypatch):
    """KL and choices computed one row at a time give the same result; extra teacher head rows are ignored."""
    wide = table({4: {9: 20.0}, 14: {9: 20.0}})
    teacher = bigram_llama(wide)
    _, whole, _ = run(student, teacher, tokenizer, corrections=1)
    monkeypatch.setattr("hf_kd.rollout.scrg.default_chunk_size", lambda vocab: 1)
    _, chunked, _ = run(student, teacher, tokenizer, corrections=1)
    assert torch.equal(whole.input_ids, chunked.input_ids) and whole.stats == chunked.stats
    padded = bigram_llama(wide)
    head = torch.nn.Linear(V, V + 3, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:V] = padded.lm_head.weight
        head.weight[V:] = 100.0  # padded rows (no token) with huge logits: must never be chosen
    padded.lm_head = head
    _, out, _ = run(student, padded, tokenizer, corrections=1)
    assert torch.equal(out.input_ids, whole.input_ids)


def test_more_corrections_search_after_the_previous_one(student, teacher, tokenizer):
    _, after, calls = run(student, teacher, tokenizer, max_new_tokens=6, corrections=3)
    # round 2: after 10 the teacher says 7 (not EOS); the student ends 7 with EOS; round 3: nothing left
    assert completions(after) == [[3, 4, 9, 10, 7, EOS], [12, EOS], [14, 9, 10, 7, EOS]]
    assert after.stats["scrg/corrected_tokens"] == 4.0
    assert len(calls) == 2


def test_max_new_tokens_is_never_exceeded(student, teacher, tokenizer):
    _, after, _ = run(student, teacher, tokenizer, max_new_tokens=5, corrections=2)
    # row 0's second correction (7 at the 5th generated token) leaves no budget: no EOS after it
    assert completions(after) == [[3, 4, 9, 10, 7], [12, EOS], [14, 9, 10, 7, EOS]]
    _, short, calls = run(student, teacher, tokenizer, max_new_tokens=4, corrections=1)
    # the student stops at 4 tokens (3 4 5 6); the fix keeps 3 tokens, so one token is re-generated
    assert completions(short) == [[3, 4, 9, 10], [12, EOS], [14, 9, 10, EOS]]
    assert short.attention_mask[:, 2:].sum(-1).max() <= 4


def test_corrected_eos_ends_the_sequence(student, tokenizer):
    # this teacher wants EOS right after 3: no re-generation for that row
    teacher = bigram_llama(table({3: {EOS: 20.0}}))
    _, after, calls = run(student, teacher, tokenizer, corrections=1)
    assert completions(after) == [[3, EOS], [12, EOS], [14, 15, EOS]]
    assert calls == []


def test_nothing_differs_keeps_the_batch(student, tokenizer):
    before, after, calls = run(student, bigram_llama(table()), tokenizer, corrections=3)
    assert torch.equal(after.input_ids, before.input_ids) and torch.equal(after.labels, before.labels)
    assert after.stats["scrg/corrected_tokens"] == 0.0 and calls == []


def test_sampled_teacher_choice_and_teacher_source(student, teacher, tokenizer):
    _, after, _ = run(student, teacher, tokenizer, corrections=1, teacher_choice="sample")
    assert completions(after)[0] == [3, 4, 9, 10, EOS]  # the teacher's choice there has probability ~1
    batch, config = generate(student, 5)
    batch.source = "teacher"
    ctx = GenerationContext(student, teacher, tokenizer, None, config, args=None)
    assert SCRGCallback().on_generation(batch, ctx) is batch  # only student generations are revised


def test_different_vocabulary_is_refused(student, teacher, tokenizer):
    other = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "x": 2}, unk_token="<pad>"))
    other = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(ValueError, match="share one vocabulary"):
        run(student, teacher, tokenizer, teacher_tokenizer=other)
    _, after, _ = run(student, teacher, tokenizer, teacher_tokenizer=tokenizer)  # the same vocabulary is fine
    assert after.stats["scrg/corrected_tokens"] == 2.0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="corrections"):
        SCRGCallback(corrections=-1)
    with pytest.raises(ValueError, match="teacher_choice"):
        SCRGCallback(teacher_choice="beam")
