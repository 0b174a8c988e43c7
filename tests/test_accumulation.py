"""Every term gives the same update whether a batch is taken at once or as gradient-accumulated micro-batches."""

import pytest
import torch
from tiny import make_args, make_pair

from hf_kd import DistillationTrainer


def one_sgd_step(tmp_path, tokenizer, dataset, recipe: str, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    """Student (and helper) parameters after one plain SGD step over the same 8 examples."""
    student, teacher = make_pair(len(tokenizer), teacher_hidden=64)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(
            tmp_path,
            output_dir=str(tmp_path / f"{batch}x{accumulation}"),
            kd_loss=recipe,
            optim="sgd",
            learning_rate=5.0,
            dac_kl_lr=5.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            span_segmenter="punct",
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    params = {k: v.detach() for k, v in trainer.model.named_parameters()}
    assert any((params[k] - before[k]).abs().max() > 1e-3 for k in params)  # the step is large enough to compare
    for name, module in trainer.distillation_modules().items():
        params |= {f"{name}.{k}": v.detach() for k, v in module.named_parameters()}
    return params


@pytest.mark.parametrize("recipe", ["span", "ce+dac_kl+span", "akl", "bild+prompt_fkl"])
def test_one_step_same_at_8x1_and_4x2(tmp_path, tokenizer, train_dataset, recipe):
    whole = one_sgd_step(tmp_path, tokenizer, train_dataset, recipe, batch=8, accumulation=1)
    accumulated = one_sgd_step(tmp_path, tokenizer, train_dataset, recipe, batch=4, accumulation=2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-5, msg=name)
