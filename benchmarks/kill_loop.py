"""Kill -9 at random moments, then resume: does hf_kd finish with the right result or refuse clearly every time?

Two jobs on the tiny smoke models (hf_kd.smoke), each run first without interruption as the reference:
* ``cache``: ``cache_teacher`` with one-row shards; after each kill the same call resumes, and the finished cache
  must load (every check of ``load_teacher_cache``) with rows equal to the reference cache's.
* ``train``: training that saves a checkpoint every step; after each kill ``resume_from_checkpoint=True`` must
  reach ``max_steps`` with the student equal to the uninterrupted run's, or refuse with a clear error.

    python benchmarks/kill_loop.py --job cache --trials 6
    python benchmarks/kill_loop.py --job train --trials 6

Prints one line per trial and a summary; exits non-zero when a trial neither finished correctly nor refused. A kill
after the last checkpoint but before the script's own result file resumes from that final checkpoint, where
transformers' Trainer (5.23, plain Trainer too) runs one more step at learning rate 0: the student is unchanged, the
global step reads one higher, and the line says so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 30
CACHE_ROWS = 24


def _cache(folder: str) -> None:
    from hf_kd import smoke
    from hf_kd.teacher_cache import cache_teacher

    setup = smoke.build_smoke_setup(num_examples=CACHE_ROWS)
    cache_teacher(setup.teacher, setup.tokenizer, setup.train_dataset, folder, top_k=8, batch_size=1, shard_size=1)


def _train(folder: str, resume: bool) -> None:
    import torch

    from hf_kd import DistillationConfig, DistillationTrainer, smoke

    setup = smoke.build_smoke_setup(num_examples=48)
    args = DistillationConfig(
        output_dir=folder,
        kd_loss="0.5*ce+0.5*dac_kl",  # dac_kl trains a helper module: checkpoints hold its state too
        lmbda=0.0,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    trainer = DistillationTrainer(
        model=setup.student,
        teacher_model=setup.teacher,
        args=args,
        train_dataset=setup.train_dataset,
        processing_class=setup.tokenizer,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    Path(folder, "final.json").write_text(json.dumps({"step": trainer.state.global_step, "sum": float(weights.sum())}))


def _child(job: str, folder: str, resume: bool) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", job, "--folder", folder] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _run(job: str, folder: str, resume: bool) -> tuple[int, str]:
    process = _child(job, folder, resume)
    _, err = process.communicate()
    return process.returncode, err


def _cache_rows(folder: str) -> list:
    from hf_kd.teacher_cache import load_teacher_cache

    return load_teacher_cache(folder).to_list()


def _outcome(job: str, folder: str, reference: str, rc: int, err: str) -> str:
    if rc != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
        clear = any(word in last for word in ("ValueError", "FileNotFoundError", "RuntimeError"))
        return f"refused: {last[:160]}" if clear else f"FAILED: {last[:160]}"
    if job == "cache":
        return "finished, rows equal" if _cache_rows(folder) == _cache_rows(reference) else "FAILED: rows differ"
    got = json.loads(Path(folder, "final.json").read_text())
    want = json.loads(Path(reference, "final.json").read_text())
    if abs(got["sum"] - want["sum"]) > 1e-6 * max(1.0, abs(want["sum"])):
        return f"FAILED: {got} != {want}"
    skipped = [line.split(":")[0].split("/")[-1] for line in err.splitlines() if line.startswith("Not resuming from")]
    if skipped:
        return f"finished, student equal, skipped the half-saved {', '.join(skipped)}"
    if got["step"] != want["step"]:  # transformers' Trainer, resuming a finished run, takes one more step at lr 0
        return f"finished, student equal (global step {got['step']} against {want['step']})"
    return "finished, student equal"


def _wait_for_progress(process: subprocess.Popen, folder: Path, job: str, rng: random.Random) -> str:
    """Wait until the run has saved a random number of checkpoints (train) or shards (cache), then a random
    fraction of a second more, so that kills land in training, between saves and in the middle of saves."""
    total = STEPS if job == "train" else CACHE_ROWS
    target = rng.randint(1, total - 1)
    pattern = "checkpoint-*" if job == "train" else "data/*.parquet"
    while process.poll() is None and len(list(folder.glob(pattern))) < target:
        time.sleep(0.01)
    extra = rng.uniform(0.0, 0.3)
    time.sleep(extra)
    return f"after {target} {'checkpoints' if job == 'train' else 'shards'} + {extra:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=["cache", "train"], default="cache")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["cache", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _cache(args.folder) if args.child == "cache" else _train(args.folder, args.resume)
        return 0

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="hf_kd_kill_loop_"))
    try:
        reference = str(root / "reference")
        start = time.perf_counter()
        rc, err = _run(args.job, reference, resume=False)
        if rc != 0:
            raise SystemExit(f"The uninterrupted reference run failed:\n{err}")
        duration = time.perf_counter() - start
        print(f"reference {args.job} run: {duration:.1f} s")
        failures = 0
        for trial in range(args.trials):
            folder = str(root / f"trial-{trial}")
            process = _child(args.job, folder, resume=False)
            delay = _wait_for_progress(process, Path(folder), args.job, rng)
            killed = process.poll() is None
            if killed:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            rc, err = _run(args.job, folder, resume=True)
            outcome = _outcome(args.job, folder, reference, rc, err)
            failures += outcome.startswith("FAILED")
            print(f"trial {trial}: kill {delay} ({'killed' if killed else 'had finished'}) -> {outcome}")
        print(f"{args.trials - failures} of {args.trials} trials finished correctly or refused clearly")
        return 1 if failures else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
