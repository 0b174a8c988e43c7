"""One rank of the FSDP2 tests (tests/test_sharded.py): run under `torchrun --nproc_per_node 2`, CPU and gloo.

For every scenario it builds a DistillationTrainer on tiny models, computes the reference loss and gradients of
both ranks' batches with the unsharded models in this process, then shards student and teacher with
`torch.distributed.fsdp.fully_shard` (per decoder layer, then the root) and runs the trainer's training step on
this rank's batch. It writes <out>/<scenario>.rank<R>.json with the losses and the largest gradient differences
(student gradients as full tensors, helper-module gradients after the trainer's all-reduce). The last scenario
also saves a sharded checkpoint (torch.distributed.checkpoint, helpers included), loads it into freshly sharded
models, checks the resumed step against the uninterrupted one, and saves the student as a Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny import chatml_tokenizer, make_args, make_conversations, make_model, make_tokenizer  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.sharding import HELPER_OPTIMIZER_FILE, load_sharded_checkpoint, save_sharded_checkpoint  # noqa: E402

SCENARIOS = {
    # name: (trainer config, student has tied embeddings, root reshard_after_forward, cross vocabulary)
    "akl_tied": ({"kd_loss": "akl"}, True, True, False),
    "akl_root_unsharded": ({"kd_loss": "akl"}, False, None, False),
    "mgsr": (
        {"kd_loss": "ce+dac_kl+span", "loss_kwargs": {"dac_kl_top_m": 8, "dac_kl_hidden": 8}},
        True,
        True,
        False,
    ),
    "dskd_same_vocab": ({"bridge": "dskd", "kd_loss": "fkl"}, True, True, False),
    "dskd_cross_vocab": ({"bridge": "dskd", "kd_loss": "fkl"}, False, True, True),
}
CHECKPOINT_SCENARIO = "dskd_cross_vocab"


def build(name: str, out: Path, **overrides) -> DistillationTrainer:
    config, tied, _, cross = SCENARIOS[name]
    tokenizer = make_tokenizer()
    teacher_tokenizer = chatml_tokenizer() if cross else None
    student = make_model(len(tokenizer), hidden=32, layers=2, seed=1, tie=tied)
    teacher = make_model(len(teacher_tokenizer or tokenizer), hidden=48, layers=2, seed=2, tie=True)
    args = make_args(out, per_device_train_batch_size=2, loss_chunk_size=5, max_steps=2, **config, **overrides)
    torch.manual_seed(0)  # helper modules start equal on both ranks
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(make_conversations(8, seed=3)),
        processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step reads it
    return trainer


def batches(trainer: DistillationTrainer) -> list[dict]:
    """One batch per rank (different conversations), collated once and identically on every rank."""
    rows = make_conversations(4, seed=11)
    return [trainer.data_collator(rows[2 * r : 2 * r + 2]) for r in range(2)]


def helpers(trainer: DistillationTrainer) -> dict[str, torch.nn.Parameter]:
    return {f"{k}.{n}": p for k, m in trainer.distillation_modules().items() for n, p in m.named_parameters()}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gradients(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    named = {**dict(trainer.model.named_parameters()), **helpers(trainer)}
    return {n: full(p.grad).detach().clone() for n, p in named.items() if p.grad is not None}


def zero_grads(trainer: DistillationTrainer) -> None:
    trainer.model.zero_grad(set_to_none=True)
    for module in trainer.distillation_modules().values():
        module.zero_grad(set_to_none=True)


def reference(trainer: DistillationTrainer, data: list[dict]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Unsharded, in this process: each batch's loss, and the mean of the two batches' gradients."""
    losses, mean = [], {}
    for batch in data:
        zero_grads(trainer)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.item())
        for n, g in gradients(trainer).items():
            mean[n] = mean.get(n, 0) + g / len(data)
    zero_grads(trainer)
    return losses, mean


def shard(trainer: DistillationTrainer, name: str) -> None:
    """FSDP2 in place: each decoder layer, then the root, for the student and the frozen teacher."""
    reshard_root = SCENARIOS[name][2]
    root_kwargs = {} if reshard_root is None else {"reshard_after_forward": reshard_root}
    for model in (trainer.model, trainer.teacher_model):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, **root_kwargs)


def make_optimizer(trainer: DistillationTrainer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [{"params": list(trainer.model.parameters()), "lr": 1e-2}, {"params": list(helpers(trainer).values())}],
        lr=1e-2,
    )


def step(trainer: DistillationTrainer, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    loss = trainer.training_step(trainer.model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    zero_grads(trainer)
    return loss.item()


def full_state(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    """Whole student and helper tensors (copies), identical on every rank."""
    student = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    return {**student, **{k: v.detach().clone() for k, v in helpers(trainer).items()}}


def checkpoint_round_trip(trainer: DistillationTrainer, data: list[dict], out: Path, rank: int) -> dict:
    """Step, save sharded state, step again; then restore into a fresh sharded trainer and repeat the step."""
    optimizer = make_optimizer(trainer)
    step(trainer, optimizer, data[rank])
    folder = str(out / "checkpoint")
    save_sharded_checkpoint(folder, trainer.model, trainer.distillation_modules(), optimizer)
    saved = full_state(trainer)
    uninterrupted = step(trainer, optimizer, data[1 - rank])

    resumed = build(CHECKPOINT_SCENARIO, out / "resumed")
    shard(resumed, CHECKPOINT_SCENARIO)
    resumed_optimizer = make_optimizer(resumed)
    load_sharded_checkpoint(folder, resumed.model, resumed.distillation_modules(), resumed_optimizer)
    restored = full_state(resumed)
    restored_diff = max((restored[k] - saved[k]).abs().max().item() for k in saved)
    resumed_loss = step(resumed, resumed_optimizer, data[1 - rank])
    after = full_state(trainer)
    after_resumed = full_state(resumed)
    record = {
        "restored_max_diff": restored_diff,
        "uninterrupted_loss": uninterrupted,
        "resumed_loss": resumed_loss,
        "after_step_max_diff": max((after[k] - after_resumed[k]).abs().max().item() for k in after),
    }
    student_state = get_model_state_dict(
        resumed.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        final = LlamaForCausalLM(resumed.model.config)  # a plain, unsharded student
        final.load_state_dict(student_state)
        final.save_pretrained(out / "final")
        resumed.processing_class.save_pretrained(out / "final")
        record["final_digest"] = digest(final.state_dict())
    return record


def as_fsdp2_trainer(trainer: DistillationTrainer) -> None:
    """Tell the trainer (and accelerate) that it runs under FSDP2, as `accelerate launch` with `fsdp_version: 2`
    does on GPUs (on CPU accelerate does not shard: the models were sharded by hand), and give it an optimizer
    holding student and helper parameters, as `create_optimizer` builds it."""
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    trainer.accelerator.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    trainer.optimizer = make_optimizer(trainer)
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)


def trainer_checkpoint_round_trip(trainer: DistillationTrainer, data: list[dict], out: Path, rank: int) -> dict:
    """The Trainer's own FSDP2 checkpoint of model and optimizer (accelerate's `save_fsdp_model` and
    `save_fsdp_optimizer`) with helper-module parameters in the optimizer: save after a step, resume into a fresh
    sharded trainer, and compare the next step with the uninterrupted one."""
    from accelerate.utils import load_fsdp_model
    from transformers import Trainer

    as_fsdp2_trainer(trainer)
    step(trainer, trainer.optimizer, data[rank])
    record = {}
    try:  # transformers' own method, without hf_kd's handling of the helpers
        Trainer._save_optimizer_and_scheduler(trainer, str(out / "plain"))
        record["plain_save_error"] = None
    except Exception as error:  # noqa: BLE001  (recorded for the test to assert on)
        record["plain_save_error"] = type(error).__name__
    folder = str(out / "trainer-checkpoint")
    trainer._save_optimizer_and_scheduler(folder)
    saved = full_state(trainer)
    uninterrupted = step(trainer, trainer.optimizer, data[1 - rank])

    resumed = build(CHECKPOINT_SCENARIO, out / "trainer-resumed")
    shard(resumed, CHECKPOINT_SCENARIO)
    as_fsdp2_trainer(resumed)
    load_fsdp_model(resumed.accelerator.state.fsdp_plugin, resumed.accelerator, resumed.model, folder)
    with torch.no_grad():  # helper weights travel in the model folder's hf_kd modules file, not tested here
        for name, param in helpers(resumed).items():
            param.copy_(saved[name])
    resumed._load_optimizer_and_scheduler(folder)
    restored = full_state(resumed)
    resumed_loss = step(resumed, resumed.optimizer, data[1 - rank])
    after, after_resumed = full_state(trainer), full_state(resumed)
    return record | {
        "restored_max_diff": max((restored[k] - saved[k]).abs().max().item() for k in saved),
        "uninterrupted_loss": uninterrupted,
        "resumed_loss": resumed_loss,
        "after_step_max_diff": max((after[k] - after_resumed[k]).abs().max().item() for k in after),
        "helper_state_file": (Path(folder) / HELPER_OPTIMIZER_FILE).is_file(),
    }


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def fsdp_request(out: Path) -> dict:
    """A trainer asked for FSDP (`fsdp=True`) on CPU ranks: how accelerate ran it, and what hf_kd logged."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("hf_kd.trainer").addHandler(handler)
    trainer = build("akl_tied", out / "fsdp_request", fsdp=True)
    logging.getLogger("hf_kd.trainer").removeHandler(handler)
    return {
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "warnings": messages,
    }


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    torch.set_num_threads(1)
    request = fsdp_request(out)  # builds the first trainer, which starts the process group
    (out / f"fsdp_request.rank{dist.get_rank()}.json").write_text(json.dumps(request))
    for name in names:
        trainer = build(name, out / name)
        rank = dist.get_rank()
        data = batches(trainer)
        ref_losses, ref_grads = reference(trainer, data)
        shard(trainer, name)
        loss = trainer.training_step(trainer.model, data[rank]).item()
        grads = gradients(trainer)
        record = {
            "rank": rank,
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "student_sharded": any(isinstance(p, DTensor) for p in trainer.model.parameters()),
            "teacher_sharded": any(isinstance(p, DTensor) for p in trainer.teacher_model.parameters()),
            "loss": loss,
            "reference_loss": ref_losses[rank],
            "missing_gradients": sorted(set(ref_grads) - set(grads)),
            "max_grad_diff": {n: (grads[n] - g).abs().max().item() for n, g in ref_grads.items() if n in grads},
            "max_grad": max(g.abs().max().item() for g in ref_grads.values()),
            "helpers": sorted(helpers(trainer)),
        }
        zero_grads(trainer)
        if name == CHECKPOINT_SCENARIO:
            record["checkpoint"] = checkpoint_round_trip(trainer, data, out / name, rank)
            record["trainer_checkpoint"] = trainer_checkpoint_round_trip(trainer, data, out / name, rank)
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(record, indent=1))
        dist.barrier()
    # A process group left to interpreter shutdown can abort the process as its threads are torn down ("terminate
    # called without an active exception", SIGABRT, seen once in 2-rank runs on loaded cores): end it first.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
