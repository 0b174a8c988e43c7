"""BiLD's prompt-position forward KL: the official trainer's instruction loss, its rows, and its temperature."""

import torch
import torch.nn.functional as F
from tiny import make_args, make_pair

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.losses import Recipe, build_loss
from hf_kd.losses.prompt_fkl import PromptForwardKL


def _batch():
    """Two right-padded sequences: prompt lengths 3 and 2, response lengths 2 and 3, one padding token."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 8, 9, 4, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, -100, 8, 9, 4, -100]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_value_is_the_mean_kl_at_t1_over_positions_predicting_prompt_tokens(tmp_path):
    """The official instruction loss (mean over prompt positions of KL(teacher || student) at T = 1), whatever the
    KD temperature of the run, without the official code's row that predicts padding."""
    batch = _batch()
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 5, 10, generator=g, dtype=torch.float64) * 2 for _ in range(2))  # shifted: 5 positions
    labels = batch["labels"][:, 1:]
    prompt = PromptForwardKL.build_inputs(batch, None, None)["prompt_positions"][:, 1:]
    assert prompt.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    expected = kl[prompt].mean()
    config = DistillationConfig(output_dir=str(tmp_path), kd_loss="prompt_fkl", kd_temperature=3.0)
    loss = Recipe.from_config(config).build()
    torch.testing.assert_close(loss(s, t, labels, prompt_positions=prompt), expected, rtol=1e-12, atol=1e-14)
    # The official mask (attended position t, label -100 at t + 1) also keeps each sequence's last real token,
    # which predicts padding: one more row per sequence here, so the two means differ.
    official = batch["attention_mask"][:, :-1].bool() & (labels == -100)
    assert official.sum() == prompt.sum() + 2 and not torch.isclose(kl[official].mean(), expected)


def test_added_to_bild_it_is_a_separate_term_normalised_by_its_own_rows():
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(2, 5, 10, generator=g, dtype=torch.float64) for _ in range(2))
    labels = batch["labels"][:, 1:]
    prompt = PromptForwardKL.build_inputs(batch, None, None)["prompt_positions"][:, 1:]
    both = build_loss("bild+prompt_fkl")
    total = both(s, t, labels, prompt_positions=prompt)
    bild = build_loss("bild")(s, t, labels)
    prompt_only = build_loss("prompt_fkl")(s, t, labels, prompt_positions=prompt)
    torch.testing.assert_close(total, bild + prompt_only, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(both.last_values["prompt_fkl"], prompt_only)
    counted = build_loss("prompt_fkl")(s, t, labels, position_counts={"prompt_positions": 6}, prompt_positions=prompt)
    torch.testing.assert_close(counted, prompt_only * 3 / 6)


def test_trainer_logs_and_lowers_the_prompt_term(tmp_path, tokenizer, train_dataset):
    student, teacher = make_pair(len(tokenizer))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, kd_loss="bild+prompt_fkl", max_steps=12),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [e["loss/prompt_fkl"] for e in trainer.state.log_history if "loss/prompt_fkl" in e]
    assert len(logged) == 12 and logged[-1] < logged[0]


def test_a_left_padded_sequence_first_token_is_not_predicted_by_padding():
    batch = _batch()
    left = {key: torch.roll(value, 1, dims=1) for key, value in batch.items()}  # the padding moves to the front
    prompt = PromptForwardKL.build_inputs(left, None, None)["prompt_positions"][:, 1:]
    right = PromptForwardKL.build_inputs(batch, None, None)["prompt_positions"][:, 1:]
    assert prompt.sum() == right.sum() == 3 and not prompt[:, 0].any()
