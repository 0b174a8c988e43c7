"""MGSR end to end: CE + DAC-KL + span loss with SCRG on half of the steps, on tiny random models."""

import copy

import pytest
import torch
from tiny import make_args, train_losses

from hf_kd import DistillationTrainer
from hf_kd.losses.dac_kl import DACKL


def test_mgsr_recipe_trains(tmp_path, tokenizer, student, teacher, train_dataset):
    args = make_args(
        tmp_path,
        max_steps=24,
        kd_loss="ce+dac_kl+span",
        scrg_corrections=1,
        lmbda=0.5,
        loss_kwargs={"dac_kl_top_m": 16, "dac_kl_hidden": 16},
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
    (dac,) = [t for t in trainer.loss_fn.terms if isinstance(t, DACKL)]
    band_before = copy.deepcopy(dac.band.state_dict())
    trainer.train()

    logs = trainer.state.log_history
    losses = train_losses(trainer)
    assert len(losses) == args.max_steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for key in ("loss/ce", "loss/dac_kl", "loss/span"):
        values = [entry[key] for entry in logs if key in entry]
        assert len(values) == args.max_steps and all(v >= 0 for v in values), key
    assert any(entry.get("loss/span", 0) > 0 for entry in logs)
    # SCRG ran on the generated steps and corrected tokens there
    corrected = [entry["scrg/corrected_tokens"] for entry in logs if "scrg/corrected_tokens" in entry]
    assert corrected and sum(corrected) > 0
    # the DAC-KL sub-network was trained (its own parameter group)
    changed = [not torch.equal(band_before[k], v) for k, v in dac.band.state_dict().items()]
    assert all(changed)


@pytest.mark.parametrize("recipe", ["ce+dac_kl+span", "ce"])
def test_generated_steps_take_ce_on_the_references(tmp_path, tokenizer, student, teacher, train_dataset, recipe):
    """With lmbda = 1 (and SCRG) every step trains on generated sequences; the SFT term is still the student's
    cross-entropy on the dataset's reference answers, the other terms are on the generated sequence."""
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, kd_loss=recipe, lmbda=1.0, scrg_corrections=1, per_device_train_batch_size=4),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    count = (batch["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    trainer.training_step(trainer.model, batch, count)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(torch.tensor(trainer._metrics["train"]["loss/ce"][-1]), expected, rtol=1e-5, atol=1e-6)
    logged = {key for key, values in trainer._metrics["train"].items() if key.startswith("loss/") and values}
    assert logged == {f"loss/{name}" for name in recipe.split("+")}
