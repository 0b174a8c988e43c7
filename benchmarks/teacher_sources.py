"""Step time and peak memory of one recipe with a live, cached and served teacher, against TRL's GKDTrainer.

The same student (SmolLM2-135M-Instruct cut to ``--student-layers`` layers), the same batches of the bundled
conversations and the same loss (``jsd``, GKD's generalized JSD, beta 0.5): the teacher SmolLM2-135M-Instruct in fp32
as a model in the training process (live; TRL's GKDTrainer too), as a top-64 float32 teacher cache built beforehand,
or served by vLLM (the environment scripts/setup_vllm.sh makes) with its scores requested when the loss needs them
or while the previous step trains (``teacher_prefetch``). Off-policy (lmbda 0) and on-policy (lmbda 1; the cache
cannot score generated tokens). Each row runs in a fresh process: seconds per optimizer step (mean over the steps
after the first), that process's peak RSS (a served teacher's memory is the server's, reported apart), and for a
served teacher the response bytes per scored token.

    OMP_NUM_THREADS=2 python benchmarks/teacher_sources.py --tag cpu

Results go to results/teacher_sources_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import ROOT, environment, format_table, run_in_fresh_process, write_text_atomically

TEACHER = "smollm2-135m-instruct"
TOP_K = 64


@dataclass
class Spec:
    """One row: ``source`` live | cache | served | trl (TRL's GKDTrainer, live teacher)."""

    source: str
    lmbda: float
    prefetch: bool = False
    url: str = ""
    cache: str = ""
    student: str = ""
    steps: int = 6
    batch: int = 4
    max_length: int = 256
    max_new_tokens: int = 64

    @property
    def name(self) -> str:
        prefetch = " (prefetch)" if self.source == "served" and self.prefetch else ""
        return f"{self.source}{prefetch}, lmbda {self.lmbda:g}"


def rows(n: int):
    from hf_kd.data import load_bundled_dataset

    return load_bundled_dataset("train").select(range(n))


def step_times(trainer) -> list[float]:
    """Trains ``trainer`` and returns the wall time of each optimizer step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.times


def run_child(spec: Spec) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd import DistillationConfig, DistillationTrainer, load_teacher_cache
    from hf_kd.real_models import load_real_model
    from hf_kd.teachers import ServedTeacher

    torch.manual_seed(0)
    teacher_path = load_real_model(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=spec.batch, max_steps=spec.steps,
        learning_rate=1e-5, max_length=spec.max_length, max_new_tokens=spec.max_new_tokens, lmbda=spec.lmbda,
        beta=0.5, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(spec.student, dtype=torch.float32)
    data = rows(spec.batch * spec.steps)
    served = None
    if spec.source == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=GKDConfig(**common), train_dataset=data,
            processing_class=tokenizer,
        )  # fmt: skip
    else:
        args = DistillationConfig(**common, kd_loss="jsd", teacher_top_k=TOP_K, teacher_prefetch=spec.prefetch)
        if spec.source == "live":
            teacher, train = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32), data
        elif spec.source == "cache":
            teacher, train = None, load_teacher_cache(spec.cache)
        else:
            teacher = served = ServedTeacher(spec.url, top_k=TOP_K)
            train = data
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer
        )
    times = step_times(trainer)
    record = {
        "row": spec.name,
        "seconds_per_step": sum(times[1:]) / max(len(times) - 1, 1),
        "first_step_seconds": times[0],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if served is not None:
        record["bytes_per_token"] = served.bytes_received / served.tokens_scored
    return record


def server_rss_gib(pid: int) -> float:
    """Resident memory of a server's process group (its API server and engine processes)."""
    import os

    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pid:
                continue
            fields = (entry / "statm").read_text().split()
        except (OSError, ProcessLookupError):
            continue
        total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--child-out")
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    if args.child:
        record = run_child(Spec(**json.loads(args.child)))
        Path(args.child_out).write_text(json.dumps(record))
        return

    import torch
    from transformers import AutoTokenizer

    from hf_kd import cache_teacher, load_real_model, make_layer_pruned_student
    from hf_kd.vllm_server import VLLMServer

    teacher_path = load_real_model(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    work = Path(tempfile.mkdtemp())
    student = str(make_layer_pruned_student(teacher_path, args.student_layers, work / "student"))
    base = dict(student=student, steps=args.steps, batch=args.batch)
    start = time.perf_counter()
    cache = cache_teacher(
        str(teacher_path), tokenizer, rows(args.batch * args.steps), work / "cache", top_k=TOP_K,
        value_dtype="float32", max_length=Spec.max_length, dtype=torch.float32, device="cpu", progress=False,
    )  # fmt: skip
    cache_seconds = time.perf_counter() - start
    specs = [Spec("trl", 0, **base), Spec("live", 0, **base), Spec("cache", 0, cache=str(cache), **base)]
    specs += [Spec("trl", 1, **base), Spec("live", 1, **base)]
    results, server_gib = [], None
    for spec in specs:
        results.append(run_in_fresh_process(__file__, spec, args.threads, timeout=3600) | {"row": spec.name})
        print(json.dumps(results[-1]), flush=True)
    with VLLMServer(teacher_path, args.python, max_logprobs=TOP_K, startup_timeout=900) as server:
        for lmbda, prefetch in ((0, False), (0, True), (1, False)):
            spec = Spec("served", lmbda, prefetch=prefetch, url=server.url, **base)
            results.append(run_in_fresh_process(__file__, spec, args.threads, timeout=3600) | {"row": spec.name})
            print(json.dumps(results[-1]), flush=True)
        server_gib = server_rss_gib(server.pid)
    payload = {
        "command": " ".join(["python", "benchmarks/teacher_sources.py", *(argv or sys.argv[1:])]),
        "environment": environment(),
        "settings": {  # the student by its layers, not by the temporary folder it was written to
            **{k: v for k, v in asdict(Spec("", 0, **base)).items() if k not in ("student", "url", "cache")},
            "student_layers": args.student_layers,
            "top_k": TOP_K,
            "threads": args.threads,
        },
        "cache_build_seconds": cache_seconds,
        "server_rss_gib": server_gib,
        "results": results,
    }
    out = ROOT / "benchmarks" / "results"
    write_text_atomically(out / f"teacher_sources_{args.tag}.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomically(out / f"teacher_sources_{args.tag}.md", render(payload))
    print(render(payload))


def render(payload: dict) -> str:
    """The results page: one row per source, step time also as a ratio to TRL's GKDTrainer at the same lmbda."""
    trl = {r["row"].split("lmbda ")[1]: r.get("seconds_per_step") for r in payload["results"] if r["row"][:3] == "trl"}
    table = []
    for r in payload["results"]:
        if "error" in r and "seconds_per_step" not in r:
            table.append([r["row"], "error: " + r["error"][:80], "", "", ""])
            continue
        reference = trl.get(r["row"].split("lmbda ")[1])
        ratio = f"{r['seconds_per_step'] / reference:.2f}" if reference else ""
        wire = f"{r['bytes_per_token']:.0f}" if "bytes_per_token" in r else ""
        table.append([r["row"], f"{r['seconds_per_step']:.2f}", ratio, f"{r['peak_rss_gib']:.2f}", wire])
    settings = payload["settings"]
    return (
        f"Teacher sources, `{payload['command']}`: batch {settings['batch']} x up to {settings['max_length']} "
        f"tokens, {settings['steps']} steps (the first not counted), {settings['max_new_tokens']} new tokens on "
        f"policy, top-{settings['top_k']}, {settings['threads']} threads; {payload['environment']['cpu_count']} "
        f"cores shared with the vLLM server. Cache build {payload['cache_build_seconds']:.1f} s; server RSS "
        f"{payload['server_rss_gib'] or 0:.2f} GiB.\n\n"
        + format_table(["teacher, lmbda", "s / step", "x TRL", "peak RSS GiB", "bytes / token"], table)
    )


if __name__ == "__main__":
    main()
