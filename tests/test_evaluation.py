"""Held-out evaluation: Rouge-L, first-sentence match, teacher-student KL and the training callback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny import chatml_llama, chatml_tokenizer
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from hf_kd.evaluation import (
    Answer,
    EvaluationCallback,
    evaluate_student,
    first_sentence,
    generate_answers,
    has_repetition_loop,
    repeats_a_run,
    rouge_l,
    token_kl,
    word_count,
)

PROMPTS = ["what is the capital of france ?", "the cat sat on the mat .", "is the sky blue ?"]
ANSWERS = ["paris is the capital of france .", "the dog sat on the red mat .", "the sky is blue . it is big ."]


def conversations(answers=ANSWERS) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in zip(PROMPTS, answers)]


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer()


def test_rouge_l_matches_hand_computation():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert rouge_l("a b c d", "a c e") == pytest.approx(100 * 4 / 7)
    assert rouge_l("Paris!", "paris") == pytest.approx(100.0)  # lower-cased, punctuation ignored
    assert rouge_l("london", "paris") == 0.0


def test_repetition_loops_are_caught_and_ordinary_text_is_not():
    assert has_repetition_loop("A moment of peace, A moment of calm, A moment of calm, A moment of calm.")
    assert has_repetition_loop("The a classic of the a classic of the a classic of the")
    assert has_repetition_loop("the the the the end")
    assert not has_repetition_loop("the the the end")  # one word needs four in a row
    assert not has_repetition_loop("1. Eat well. 2. Sleep well. 3. Exercise well.")
    assert not has_repetition_loop("Paris is the capital of France. Paris is big. Paris is old.")
    assert not has_repetition_loop("")


def test_a_sentence_said_twice_in_a_row_is_a_repeated_run_but_not_a_loop():
    text = "I am not so cruel, and I am not so cruel. I am not so cruel, and I am not so cruel."
    assert repeats_a_run(text) and not has_repetition_loop(text)
    assert not repeats_a_run("Paris is the capital of France. Paris is the capital city of a large country.")
    assert not repeats_a_run("one two three four five, one two three four five")  # five words: below min_span
    assert repeats_a_run("one two three four five, one two three four five", min_span=5)
    assert not repeats_a_run("")


def test_answer_length_and_loop_columns(tokenizer, monkeypatch):
    answers = [
        "The sky looks blue.",  # 4 words: short
        "Light from the Sun is scattered by the air, and blue light is scattered most.",  # 15 words
        "A compiler is a compiler is a compiler is a compiler.",  # 11 words, a loop, not short
    ]
    fixed = [Answer(text, True) for text in answers]
    monkeypatch.setattr("hf_kd.evaluation.generate_answers", lambda *args, **kwargs: fixed)
    data = Dataset.from_list([{"messages": c} for c in conversations()])
    result = evaluate_student(chatml_llama(len(tokenizer), seed=1), tokenizer, data, per_sample=True)
    assert [word_count(a) for a in answers] == [4, 15, 11] == result["per_sample"]["words"]
    assert result["answer_words"] == pytest.approx(30 / 3)
    assert result["short_answer_rate"] == pytest.approx(100 / 3)
    assert result["loop_rate"] == pytest.approx(100 / 3)
    assert word_count("  ") == 0


def test_first_sentence():
    assert first_sentence("  Paris is the capital. It is big.") == "Paris is the capital."
    assert first_sentence("No full stop") == "No full stop"
    assert first_sentence("   ") == ""


def test_scores_are_perfect_against_own_greedy_answers_and_lower_otherwise(tokenizer):
    model = chatml_llama(len(tokenizer), seed=1)
    prompts = [c[:-1] for c in conversations()]
    own = [answer.text for answer in generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)]
    assert all(own), "the tiny model must produce non-empty answers for this test to mean anything"
    # Batched left-padded generation gives the same answers as one prompt at a time.
    one_by_one = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert own == [answer.text for answer in one_by_one]

    model.train()
    own_data = Dataset.from_list([{"messages": c} for c in conversations(own)])
    result = evaluate_student(model, tokenizer, own_data, max_new_tokens=6, batch_size=2, return_predictions=True)
    assert model.training, "evaluate_student must restore the model's training mode"
    assert result["rouge_l"] == pytest.approx(100.0)
    assert result["exact_match"] == pytest.approx(100.0)
    assert result["num_samples"] == 3 and result["predictions"] == own
    assert "kl" not in result
    as_list = [{"messages": c} for c in conversations(own)]
    first_two = evaluate_student(model, tokenizer, as_list, max_new_tokens=6, max_samples=2)
    assert first_two["num_samples"] == 2 and first_two["rouge_l"] == pytest.approx(100.0)

    other = evaluate_student(
        model, tokenizer, Dataset.from_list([{"messages": c} for c in conversations()]), max_new_tokens=6, batch_size=2
    )
    expected = sum(rouge_l(p, r) for p, r in zip(own, ANSWERS)) / 3
    assert other["rouge_l"] == pytest.approx(expected) and other["rouge_l"] < 100.0
    matches = sum(first_sentence(p) == first_sentence(r) for p, r in zip(own, ANSWERS))
    assert other["exact_match"] == pytest.approx(100 * matches / 3)


def reference_kl(student, teacher, tokenizer, conversation) -> tuple[float, int]:
    """Summed KL(teacher || student) over one conversation's answer tokens, via F.kl_div on unpadded input."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        s = F.log_softmax(student(ids).logits[0].double(), -1)
        t = F.log_softmax(teacher(ids).logits[0].double(), -1)
    rows = slice(len(prompt_ids) - 1, ids.shape[1] - 1)
    return F.kl_div(s[rows], t[rows], log_target=True, reduction="sum").item(), len(answer_ids)


def test_token_kl_matches_reference_and_is_zero_for_identical_models(tokenizer):
    student = chatml_llama(len(tokenizer), seed=1)
    teacher = chatml_llama(len(tokenizer), seed=2)
    convs = conversations()
    sums, counts = zip(*(reference_kl(student, teacher, tokenizer, c) for c in convs))
    expected = sum(sums) / sum(counts)
    assert expected > 0
    # Batches with right padding give the token-weighted mean of the unpadded reference.
    assert token_kl(student, teacher, tokenizer, convs, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert token_kl(student, teacher, tokenizer, convs, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert token_kl(student, student, tokenizer, convs, batch_size=2) == pytest.approx(0.0, abs=1e-6)

    data = Dataset.from_list([{"messages": c} for c in convs])
    with_teacher = evaluate_student(student, tokenizer, data, teacher=teacher, max_new_tokens=4)
    assert with_teacher["kl"] == pytest.approx(expected, rel=1e-5)
    assert evaluate_student(student, tokenizer, data, teacher=student, max_new_tokens=4)["kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    # Per conversation: the reference's own sum and token count, in the dataset's order, at any batch size.
    got = evaluate_student(student, tokenizer, data, teacher=teacher, max_new_tokens=4, batch_size=3, per_sample=True)
    assert got["per_sample"]["kl_tokens"] == list(counts)
    assert got["per_sample"]["kl_sum"] == pytest.approx(list(sums), rel=1e-5)
    assert len(got["per_sample"]["rouge_l"]) == len(convs)
    assert sum(got["per_sample"]["rouge_l"]) / len(convs) == pytest.approx(got["rouge_l"])


def test_kl_refuses_different_vocabularies(tokenizer):
    student = chatml_llama(len(tokenizer), seed=1)
    teacher = chatml_llama(len(tokenizer), seed=2)
    teacher.lm_head = torch.nn.Linear(32, len(tokenizer) - 5, bias=False)  # cannot predict every token
    with pytest.raises(ValueError, match="vocabularies differ"):
        token_kl(student, teacher, tokenizer, conversations(), batch_size=2)


def test_evaluation_errors_name_the_problem(tokenizer):
    model = chatml_llama(len(tokenizer))
    no_answer = Dataset.from_list([{"messages": [{"role": "user", "content": "the cat"}]}])
    with pytest.raises(ValueError, match="ending with an assistant turn"):
        evaluate_student(model, tokenizer, no_answer)
    with pytest.raises(ValueError, match="eval_steps"):
        EvaluationCallback(no_answer, eval_steps=0)


class TokenizedChats(torch.utils.data.Dataset):
    """Causal-LM training rows from the tiny conversations (labels = input ids)."""

    def __init__(self, tokenizer):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations()]
        self.rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids}


class AveragingTrainer(Trainer):
    """Mimics TRL trainers, whose `log` adds (and then clears) running averages of training metrics."""

    def log(self, logs, start_time=None):
        super().log({**logs, "running_average": 1.0}, start_time)


def test_callback_logs_through_the_trainer_every_n_steps_and_at_the_end(tokenizer, tmp_path):
    model = chatml_llama(len(tokenizer), seed=3)
    teacher = chatml_llama(len(tokenizer), seed=4)
    held_out = Dataset.from_list([{"messages": c} for c in conversations()])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=5,
        use_cpu=True,
        report_to=[],
        logging_steps=100,
        save_strategy="no",
        learning_rate=1e-3,
    )
    trainer = AveragingTrainer(
        model=model, args=args, train_dataset=TokenizedChats(tokenizer), processing_class=tokenizer
    )
    callback = EvaluationCallback(held_out, eval_steps=2, teacher=teacher, trainer=trainer, max_new_tokens=4)
    trainer.add_callback(callback)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "eval/rouge_l" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 5]  # every 2 steps, then once at the end
    assert all({"eval/exact_match", "eval/kl", "eval/num_samples"} <= entry.keys() for entry in logged)
    assert logged[0]["eval/kl"] > 0 and logged[0]["eval/num_samples"] == 3
    assert not any("running_average" in entry for entry in logged), "subclass log hooks must be bypassed"
    final = evaluate_student(model, tokenizer, held_out, teacher=teacher, max_new_tokens=4)
    assert logged[-1]["eval/kl"] == pytest.approx(final["kl"], rel=1e-5)
    assert logged[-1]["eval/rouge_l"] == pytest.approx(final["rouge_l"])


def test_callback_without_trainer_records_in_state(tokenizer):
    model = chatml_llama(len(tokenizer), seed=3)
    held_out = Dataset.from_list([{"messages": c} for c in conversations()])
    callback = EvaluationCallback(held_out, eval_steps=3, max_new_tokens=4)
    state, control = TrainerState(), TrainerControl()
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, control, model=model, processing_class=tokenizer)
    callback.on_train_end(None, state, control, model=model, processing_class=tokenizer)  # step 3 already done
    assert [entry["step"] for entry in state.log_history] == [3]
    assert state.log_history[0]["eval/rouge_l"] == pytest.approx(callback.history[0]["eval/rouge_l"])
    with pytest.raises(ValueError, match="processing_class"):
        callback.on_train_end(None, TrainerState(), control, model=model, processing_class=None)


def test_callback_at_start_scores_step_zero(tokenizer):
    model = chatml_llama(len(tokenizer), seed=3)
    held_out = Dataset.from_list([{"messages": c} for c in conversations()])
    state, control = TrainerState(), TrainerControl()
    for at_start, expected in ((False, []), (True, [0])):
        callback = EvaluationCallback(held_out, eval_steps=5, max_new_tokens=4, at_start=at_start)
        state.log_history = []
        callback.on_train_begin(None, state, control, model=model, processing_class=tokenizer)
        assert [entry["step"] for entry in state.log_history] == expected
