"""On-policy step time with each rollout backend against the off-policy step, on the real SmolLM2 pair (CPU).

Teacher SmolLM2-135M-Instruct, student its layers 0, 3, ..., 27 (10 of 30, as the demo prunes), both fp32; the same
bundled conversations, batch, recipe (jsd) and ``max_new_tokens`` for every configuration:

* ``off-policy``: ``lmbda=0`` (no generation);
* ``on-policy transformers``: ``lmbda=1``, transformers' ``generate``;
* ``on-policy vllm``: ``lmbda=1``, a vLLM server (its own environment, ``--python``) hf_kd starts from the student,
  its weights pushed after every optimizer step (``--sync-steps``, default 1; the push is included in the step time).

Each runs ``--warmup`` steps then ``--steps`` timed ones (between the Trainer's step begin and end, the weight push
included). Also recorded: generation time and tokens/s (generated tokens up to EOS, per rollout call), weight-push
seconds, the vLLM server's start-up. Writes results/rollout_speed_<tag>.json and .md and prints the table.

    OMP_NUM_THREADS=2 python benchmarks/rollout_speed.py --tag cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import ROOT, environment, format_table, write_text_atomically

CONFIGS = {
    "off-policy": {"lmbda": 0.0},
    "on-policy transformers": {"lmbda": 1.0},
    "on-policy vllm": {"lmbda": 1.0, "use_vllm": True},
}


def student_folder(teacher_path: Path, out: Path) -> Path:
    """The 10-layer student (layers 0, 3, ..., 27), written once under ``out``."""
    from hf_kd.assets import make_layer_pruned_student

    folder = out / "student-10-layers"
    if not (folder / "config.json").is_file():
        make_layer_pruned_student(teacher_path, list(range(0, 30, 3)), folder)
    return folder


def run(name: str, overrides: dict, paths: tuple[Path, Path], args: argparse.Namespace, out: Path) -> dict:
    """One configuration: its step times, generation calls and weight pushes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.data import load_bundled_dataset
    from hf_kd.rollout.backend import rollout_outputs

    teacher_path, student_path = paths
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    config = DistillationConfig(
        output_dir=str(out / name.replace(" ", "-")), per_device_train_batch_size=args.batch, learning_rate=1e-5,
        max_steps=args.warmup + args.steps, max_new_tokens=args.new_tokens, max_length=args.max_length,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, kd_loss="jsd",
        vllm_python=args.python if overrides.get("use_vllm") else None, vllm_sync_steps=args.sync_steps, **overrides,
    )  # fmt: skip
    rows = load_bundled_dataset("train").select(range(args.batch * (args.warmup + args.steps)))
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    start = time.perf_counter()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=rows, processing_class=tokenizer
    )
    setup = time.perf_counter() - start
    record = {"setup_seconds": round(setup, 1), "steps": [], "generation": [], "sync_seconds": []}
    backend = trainer.rollout_backend
    generate = backend.generate

    def timed_generate(model, prompts, mask, generation_config):
        began = time.perf_counter()
        sequences = generate(model, prompts, mask, generation_config)
        seconds = time.perf_counter() - began
        tokens = int(rollout_outputs(sequences, mask, generation_config)[1][:, prompts.shape[1] :].sum())
        record["generation"].append({"seconds": seconds, "tokens": tokens})
        return sequences

    backend.generate = timed_generate

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.began = time.perf_counter()

        def on_step_end(self, *a, **k):
            record["steps"].append(time.perf_counter() - self.began)
            if getattr(backend, "syncer", None) is not None:
                record["sync_seconds"].append(backend.syncer.seconds)

    trainer.add_callback(StepTimes())  # after the weight-sync callback: a step's time includes its push
    try:
        trainer.train()
    finally:
        backend.close()
    timed = record["steps"][args.warmup :]
    generated = record["generation"][args.warmup :]
    record["step_seconds_median"] = statistics.median(timed)
    record["step_seconds_mean"] = statistics.mean(timed)  # with pushes every N steps, the median misses them
    if generated:
        record["generation_seconds_median"] = statistics.median(g["seconds"] for g in generated)
        record["tokens_per_second"] = sum(g["tokens"] for g in generated) / sum(g["seconds"] for g in generated)
    if record["sync_seconds"]:
        record["sync_seconds_median"] = statistics.median(record["sync_seconds"][args.warmup :])
    return record


def table(results: dict) -> str:
    base = results["configs"]["off-policy"]
    rows = []
    for name, r in results["configs"].items():
        rows.append(
            [
                name,
                f"{r['step_seconds_median']:.2f}",
                f"{r['step_seconds_mean']:.2f}",
                f"{r['step_seconds_mean'] / base['step_seconds_mean']:.2f}x",
                f"{r['generation_seconds_median']:.2f}" if "generation_seconds_median" in r else "-",
                f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else "-",
                f"{r['sync_seconds_median']:.2f}" if "sync_seconds_median" in r else "-",
            ]
        )
    head = ["configuration", "step s (median)", "step s (mean)", "mean vs off-policy", "generation s"]
    head += ["generated tokens/s", "weight push s"]
    return format_table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sync-steps", type=int, default=1, help="vllm_sync_steps: push weights every N steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "hf_kd-rollout-speed"))
    args = parser.parse_args()

    import torch

    from hf_kd.assets import load_real_model

    torch.set_num_threads(args.threads)
    out = Path(args.work)
    teacher_path = load_real_model("smollm2-135m-instruct")
    paths = (teacher_path, student_folder(teacher_path, out))
    results = {
        "command": f"OMP_NUM_THREADS={args.threads} python benchmarks/rollout_speed.py "
        f"--batch {args.batch} --sync-steps {args.sync_steps} --tag {args.tag}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("python", "work")},
        "environment": environment(),
        "configs": {},
    }
    stem = ROOT / "benchmarks" / "results" / f"rollout_speed_{args.tag}"
    for name in args.configs:
        results["configs"][name] = run(name, CONFIGS[name], paths, args, out)
        write_text_atomically(stem.with_suffix(".json"), json.dumps(results, indent=2))
        print(name, json.dumps({k: v for k, v in results["configs"][name].items() if k.endswith("median")}))
    if "off-policy" in results["configs"]:
        write_text_atomically(stem.with_suffix(".md"), table(results))
        print(table(results))


if __name__ == "__main__":
    main()
