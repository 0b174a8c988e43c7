"""One rank of tests/integration/test_vllm_ranks.py: run under `torchrun --nproc_per_node 2` (CPU, gloo).

Arguments: <out> <student folder> <teacher folder> <vLLM's python>. Each rank builds an on-policy run (lmbda 1)
whose rollouts come from the vLLM server hf_kd starts from the student (``use_vllm``, ``vllm_python``), trains it
for two optimizer steps (a weight push after each), and writes <out>/rank<R>.json with the URL its backend generates
from, whether this rank started that server, and the greedy rollouts of one fixed batch: from transformers' generate
before training, and after training from the server and from generate of this rank's student.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # this checkout

import torch  # noqa: E402
from tiny import make_args  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.data import load_bundled_dataset  # noqa: E402
from hf_kd.rollout.backend import TransformersBackend  # noqa: E402


def greedy_rollout(trainer: DistillationTrainer, batch: dict, backend) -> list[list[int]]:
    """The student's greedy sequences of ``batch`` (prompt and completion) from ``backend``."""
    config = trainer.generation_config
    config.do_sample = False
    sequences = backend.generate(trainer.model, batch["prompts"], batch["prompt_attention_mask"], config)
    config.do_sample = True
    return sequences.tolist()


def main() -> None:
    out, student_path, teacher_path, vllm_python = (Path(a) for a in sys.argv[1:5])
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    args = make_args(
        out, per_device_train_batch_size=2, max_length=256, max_new_tokens=16, max_steps=2, lmbda=1.0,
        learning_rate=5e-3, kd_loss="fkl", use_vllm=True, vllm_python=str(vllm_python),
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32),
        args=args,
        train_dataset=load_bundled_dataset("train").select(range(8)),
        processing_class=tokenizer,
    )
    rows = [trainer.train_dataset[i] for i in range(4)]  # the same prompts on every rank
    batch = trainer.data_collator(rows)
    before = greedy_rollout(trainer, batch, TransformersBackend())
    trainer.train()
    record = {
        "url": trainer.rollout_backend.url,
        "owns_server": trainer.rollout_backend.server is not None,
        "before": before,
        "served": greedy_rollout(trainer, batch, trainer.rollout_backend),
        "generated": greedy_rollout(trainer, batch, TransformersBackend()),
        "global_step": trainer.state.global_step,
    }
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    trainer.accelerator.wait_for_everyone()  # the server's owner stops it on exit: after every rank's last rollout


if __name__ == "__main__":
    main()
