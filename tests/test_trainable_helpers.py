"""Trainable helper modules beside the student (DAC-KL sub-network, DSKD projectors): only the used ones exist,
and they are clipped with the student."""

import torch
from datasets import Dataset
from safetensors.torch import load_file
from tiny import make_args, make_conversations, make_pair, make_tokenizer

from hf_kd import DistillationTrainer
from hf_kd.trainer import MODULES_FILE


def _trainer(tmp_path, **overrides):
    tok = make_tokenizer()
    student, teacher = make_pair(len(tok))
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, per_device_train_batch_size=4, **overrides),
        train_dataset=Dataset.from_list(make_conversations(8)),
        processing_class=tok,
    )


def test_dskd_builds_only_the_bridge_and_saves_nothing_else(tmp_path):
    """The bridge owns the recipe's terms (here DAC-KL's sub-network); no second, unused copy is built, optimised
    or saved."""
    trainer = _trainer(tmp_path, bridge="dskd", kd_loss="dac_kl", max_steps=1)
    assert trainer.loss_fn is None
    assert set(trainer.distillation_modules()) == {"bridge"}
    trainer.train()
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    expected = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    expected |= {id(p) for p in trainer.bridge.parameters() if p.requires_grad}
    assert optimised == expected
    trainer.save_model()
    saved = load_file(str(tmp_path / "out" / MODULES_FILE))
    assert saved and all(key.startswith("bridge.") for key in saved)
    assert any("band" in key for key in saved)  # the bridge's own DAC-KL sub-network is what is saved


def test_max_grad_norm_clips_student_and_helpers_by_one_global_norm(tmp_path):
    trainer = _trainer(tmp_path, kd_loss="ce+dac_kl", max_grad_norm=0.01)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(trainer.model, batch).backward()
    helpers = [p for p in trainer.loss_fn.parameters() if p.grad is not None]
    assert helpers
    for p in helpers:
        p.grad.mul_(1e3)  # helper gradients dominate the global norm
    params = [*trainer.model.parameters(), *helpers]
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    reported = trainer._clip_grad_norm(trainer.model)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    torch.testing.assert_close(reported, before)
    torch.testing.assert_close(after, torch.tensor(0.01), rtol=1e-4, atol=0)
