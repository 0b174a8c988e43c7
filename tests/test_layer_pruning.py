"""Layer-pruned students: which layers are kept, and the pruned model against a hand-built one."""

from __future__ import annotations

import pytest
import torch
from tiny import chatml_llama, chatml_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

from hf_kd.layer_pruning import (
    block_influence,
    evenly_spaced_layers,
    influential_layers,
    make_layer_pruned_student,
    prune_layers,
)


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(10, 30) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(2, 4) == [0, 3]
    assert evenly_spaced_layers(3, 4) == [0, 2, 3]  # 1.5 rounds up
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced_layers(1, 6) == [0]
    for n in range(1, 31):
        layers = evenly_spaced_layers(n, 30)
        assert len(layers) == n and layers == sorted(set(layers)) and layers[0] == 0
        assert n == 1 or layers[-1] == 29
    with pytest.raises(ValueError, match="between 1 and"):
        evenly_spaced_layers(0, 4)
    with pytest.raises(ValueError, match="between 1 and"):
        evenly_spaced_layers(5, 4)


def copy_reference(teacher, keep, reference):
    """Build the pruned model by hand: module by module, from the teacher's modules."""
    reference.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    for new, old in enumerate(keep):
        reference.model.layers[new].load_state_dict(teacher.model.layers[old].state_dict())
    reference.model.norm.load_state_dict(teacher.model.norm.state_dict())
    reference.lm_head.load_state_dict(teacher.lm_head.state_dict())
    return reference.eval()


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    input_ids = torch.randint(4, vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding in the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_block_influence_ranks_a_pass_through_layer_lowest_and_pruning_drops_it():
    tokenizer = chatml_tokenizer()
    model = chatml_llama(len(tokenizer), num_layers=4)
    with torch.no_grad():  # layer 2 adds nothing to its input: its output equals its input, influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    question = {"role": "user", "content": "what is the capital of france ?"}
    chats = [[question, {"role": "assistant", "content": "paris"}]]
    influence = block_influence(model, tokenizer, chats * 3, batch_size=2)
    assert influence.shape == (4,)
    assert influence[2].abs() < 1e-6 and bool((influence[[0, 1, 3]] > 1e-3).all())
    assert influential_layers(influence, 3) == [0, 1, 3]


def test_influential_layers_keeps_first_and_last_then_the_most_influential():
    influence = torch.tensor([0.9, 0.2, 0.01, 0.5, 0.03, 0.8])
    assert influential_layers(influence, 2) == [0, 5]
    assert influential_layers(influence, 4) == [0, 1, 3, 5]
    with pytest.raises(ValueError, match="between 2 and"):
        influential_layers(influence, 7)
    with pytest.raises(ValueError, match="at least one conversation"):
        block_influence(torch.nn.Linear(1, 1), None, [])


def test_pruned_llama_matches_a_hand_built_reference():
    vocab = 40
    teacher = chatml_llama(vocab, seed=0, num_layers=5)
    keep = [0, 2, 4]
    student = prune_layers(teacher, keep).eval()
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert teacher.config.num_hidden_layers == 5, "the teacher's config must not change"

    torch.manual_seed(123)  # a different init, fully overwritten by the copy
    reference = copy_reference(teacher, keep, LlamaForCausalLM(student.config))
    inputs = batch(vocab)
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, reference(**inputs).logits)
        assert not torch.allclose(student(**inputs).logits, teacher(**inputs).logits)
    # Each kept layer has its new index, so cached generation equals generation without a cache.
    cached = student.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = student.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_int_keep_layers_uses_evenly_spaced_layers_and_bad_lists_fail():
    teacher = chatml_llama(40, num_layers=6)
    student = prune_layers(teacher, 3)
    reference = prune_layers(teacher, evenly_spaced_layers(3, 6))
    for a, b in zip(student.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    for bad in ([], [2, 1], [0, 0], [0, 6]):
        with pytest.raises(ValueError, match="strictly increasing"):
            prune_layers(teacher, bad)


def test_tied_head_stays_tied():
    teacher = chatml_llama(40, num_layers=3, tie_word_embeddings=True)
    student = prune_layers(teacher, [0, 2])
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_gemma3_layer_types_follow_the_kept_layers():
    config = Gemma3TextConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    teacher = Gemma3ForCausalLM(config).eval()
    assert teacher.config.layer_types[5] == "full_attention" and teacher.config.layer_types[0] != "full_attention"
    student = prune_layers(teacher, [0, 5]).eval()
    assert student.config.layer_types == [teacher.config.layer_types[0], teacher.config.layer_types[5]]
    reference = copy_reference(teacher, [0, 5], Gemma3ForCausalLM(student.config))
    inputs = batch(40)
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, reference(**inputs).logits)


def test_make_layer_pruned_student_round_trip(tmp_path):
    tokenizer = chatml_tokenizer()
    teacher = chatml_llama(len(tokenizer), num_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")

    out = make_layer_pruned_student(tmp_path / "teacher", [1, 3], tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    student_tokenizer = AutoTokenizer.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    assert student_tokenizer.chat_template == tokenizer.chat_template
    assert student_tokenizer.pad_token == tokenizer.pad_token
    inputs = batch(len(tokenizer))
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, prune_layers(teacher, [1, 3]).eval()(**inputs).logits)

    # From a model object, with its tokenizer given explicitly.
    out2 = make_layer_pruned_student(teacher, 2, tmp_path / "student2", tokenizer=tokenizer)
    assert AutoModelForCausalLM.from_pretrained(out2).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="tokenizer="):
        make_layer_pruned_student(teacher, 2, tmp_path / "student3")
