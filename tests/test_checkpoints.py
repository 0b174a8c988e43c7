"""A kill during a save: resume from the newest complete checkpoint, and hf_kd's own files are replaced whole."""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_args, make_pair

from hf_kd import DistillationTrainer
from hf_kd import trainer as trainer_module
from hf_kd.atomic import write_atomically, write_text_atomically
from hf_kd.checkpoints import checkpoint_problem, newest_complete_checkpoint
from hf_kd.hub import MODULES_FILE


def distillation_trainer(tmp_path: Path, tokenizer, train_dataset, max_steps: int) -> DistillationTrainer:
    """A run with a trainable helper (DAC-KL's sub-network) that saves a checkpoint every step."""
    student, teacher = make_pair(len(tokenizer))
    args = make_args(
        tmp_path, kd_loss="0.5*ce+dac_kl", max_steps=max_steps, save_strategy="steps", save_steps=1, logging_steps=1
    )
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )


def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path, tokenizer, train_dataset, caplog):
    full = distillation_trainer(tmp_path / "full", tokenizer, train_dataset, max_steps=3)
    full.train()
    out = Path(full.args.output_dir)
    # A kill while checkpoint-3 was written; checkpoint-2 lost its helper file (a kill in an earlier save).
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    (out / "checkpoint-2" / MODULES_FILE).unlink()

    with caplog.at_level(logging.WARNING, logger="hf_kd.checkpoints"):
        resumed = distillation_trainer(tmp_path / "full", tokenizer, train_dataset, max_steps=3)
        loaded = []
        load = resumed._load_from_checkpoint
        resumed._load_from_checkpoint = lambda folder, model=None: (loaded.append(folder), load(folder, model))[1]
        resumed.train(resume_from_checkpoint=True)

    assert "checkpoint-3: it has no trainer_state.json" in caplog.text.replace(f"{out}/", "")
    assert f"checkpoint-2: it lacks this run's distillation helper files ({MODULES_FILE})" in caplog.text.replace(
        f"{out}/", ""
    )
    # Resumed from checkpoint-1 for two more steps, ending where the uninterrupted run ended, helpers included.
    assert loaded == [str(out / "checkpoint-1")] and resumed.state.global_step == 3
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    helper = resumed.distillation_modules()["loss"]
    for a, b in zip(full.distillation_modules()["loss"].parameters(), helper.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def complete_checkpoint(folder: Path, *extra: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    for name in ("model.safetensors", *extra):
        (folder / name).write_bytes(b"weights")
    return folder


def test_checkpoint_completeness_names_what_is_missing(tmp_path):
    assert checkpoint_problem(complete_checkpoint(tmp_path / "full")) is None
    assert checkpoint_problem(complete_checkpoint(tmp_path / "helpers", MODULES_FILE), [MODULES_FILE]) is None
    cut = complete_checkpoint(tmp_path / "cut")
    (cut / "trainer_state.json").write_text('{"global_st')  # a kill while the Trainer wrote its state
    assert "trainer_state.json cannot be read" in checkpoint_problem(cut)
    adapter = complete_checkpoint(tmp_path / "adapter")
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    assert checkpoint_problem(adapter) is None
    (adapter / "adapter_model.safetensors").unlink()
    assert "no model weights or adapter" in checkpoint_problem(adapter)
    assert MODULES_FILE in checkpoint_problem(tmp_path / "full", [MODULES_FILE])


def test_resume_without_a_complete_checkpoint_is_refused_with_each_reason(tmp_path):
    with pytest.raises(ValueError, match="has no checkpoint-\\* folder"):
        newest_complete_checkpoint(tmp_path)
    (complete_checkpoint(tmp_path / "checkpoint-1") / "trainer_state.json").unlink()
    (complete_checkpoint(tmp_path / "checkpoint-10") / "model.safetensors").unlink()
    complete_checkpoint(tmp_path / "checkpoint-9.bak")  # not a checkpoint folder name: never resumed from
    with pytest.raises(ValueError, match="checkpoint-10: it holds no model weights.*checkpoint-1: it has no trainer"):
        newest_complete_checkpoint(tmp_path)
    complete_checkpoint(tmp_path / "checkpoint-2")
    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_resume_from_an_incomplete_folder_given_by_path_is_refused(tmp_path, tokenizer, train_dataset):
    trainer = distillation_trainer(tmp_path, tokenizer, train_dataset, max_steps=1)
    folder = complete_checkpoint(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-5: it lacks .*{MODULES_FILE}"):
        trainer.train(resume_from_checkpoint=str(folder))


def test_atomic_write_leaves_the_old_file_when_writing_fails_midway(tmp_path):
    path = write_text_atomically(tmp_path / "results.json", '{"runs": 3}')

    def half_then_fail(partial: Path) -> None:
        partial.write_text('{"runs": 4, "tr')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == '{"runs": 3}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no partial file left behind


def test_helper_file_survives_a_save_that_fails_midway(tmp_path, tokenizer, train_dataset, monkeypatch):
    trainer = distillation_trainer(tmp_path, tokenizer, train_dataset, max_steps=1)
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    before = load_file(str(folder / MODULES_FILE))

    def save_half(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 8)  # a kill (here an error) after the first bytes
        raise OSError("killed")

    monkeypatch.setattr(trainer_module, "save_file", save_half)
    with pytest.raises(OSError, match="killed"):
        trainer.save_model(str(folder))
    after = load_file(str(folder / MODULES_FILE))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_checkpoint_rewritten_after_resuming_from_an_older_one_is_incomplete_until_saved(
    tmp_path, tokenizer, train_dataset, monkeypatch
):
    full = distillation_trainer(tmp_path, tokenizer, train_dataset, max_steps=2)
    full.train()
    checkpoint_2 = Path(full.args.output_dir) / "checkpoint-2"
    assert checkpoint_problem(checkpoint_2, [MODULES_FILE]) is None

    def killed(self, output_dir):
        raise KeyboardInterrupt("killed while writing the optimizer")

    monkeypatch.setattr(DistillationTrainer, "_save_optimizer_and_scheduler", killed)
    resumed = distillation_trainer(tmp_path, tokenizer, train_dataset, max_steps=2)
    with pytest.raises(KeyboardInterrupt):
        resumed.train(resume_from_checkpoint=str(checkpoint_2.with_name("checkpoint-1")))
    assert "no trainer_state.json" in checkpoint_problem(checkpoint_2, [MODULES_FILE])
    assert newest_complete_checkpoint(full.args.output_dir, [MODULES_FILE]).endswith("checkpoint-1")
