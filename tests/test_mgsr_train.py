"""MGSR end to end: CE + DAC-KL + span loss with SCRG on half of the steps, on tiny random models."""

import copy

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
