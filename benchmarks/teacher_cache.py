"""Offline teacher: what a cached teacher costs (bytes per token), loses (reconstruction KL) and saves (time, memory).

On the real SmolLM2-135M-Instruct teacher and the bundled conversations (hf_kd/data):

1. fidelity: the teacher's next-token distributions on ``--tokens`` response tokens, encoded with top-k
   ids + k stored log-probabilities + the log tail mass (hf_kd.teacher_cache.encoding) for several k and value
   dtypes; bytes per token of the encoding and KL(p || p_hat) between the full distribution and the
   reconstructed one (top-k plus a flat tail), at temperature 1 and, through the reconstruction, at 2.
2. disk: ``hf_kd.cache_teacher`` on the same conversations; Parquet bytes on disk per response token (the
   token ids and labels of every example included).
3. speed: one training step of the same recipe (fkl, off-policy, fused loss) with the live teacher and from
   the cache, for SmolLM2-135M-Instruct -> its 10-layer student; each in a fresh process, so its peak resident
   memory is its own.

The quality of students trained from the cache and from the live teacher, with seeds and intervals, is measured
by benchmarks/quality.py (rows ``fkl`` and ``fkl-live``).

Usage::

    python benchmarks/teacher_cache.py                       # a few minutes on 2 CPU cores

Results: ``benchmarks/results/teacher_cache.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, format_table, write_text_atomically  # noqa: E402  (offline defaults, shared with the other benchmarks)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEACHER = "smollm2-135m-instruct"
KS = (8, 16, 32, 64, 128, 256)
VALUE_DTYPES = ("float32", "float16", "bfloat16", "uint8")
DISK_SETTINGS = ((32, "uint8"), (64, "uint8"), (64, "float16"), (128, "uint8"))
DEFAULT_SETTING = (64, "uint8")
TEMPERATURES = ((1.0, 1.0), (1.0, 2.0), (2.0, 2.0))  # (temperature of the cache, temperature of the loss term)


def _conversations(count: int):
    from hf_kd.data import load_bundled_dataset

    data = load_bundled_dataset("train")
    return data.select(range(min(count, len(data))))


def fidelity(tokens: int, max_length: int) -> tuple[list[dict[str, Any]], int, Any]:
    """Bytes/token and reconstruction KL for every (k, value dtype), on at least ``tokens`` response tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.utils import DataCollatorForChatML

    from hf_kd.real_models import load_real_model
    from hf_kd.teacher_cache import CacheEncoding, reconstruction_kl
    from hf_kd.teacher_cache.encoding import TopKReconstruction, pack_rows

    path = load_real_model(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)
    rows, used = [], 0
    data = _conversations(10_000)
    with torch.no_grad():
        while sum(r.shape[0] for r in rows) < tokens:
            batch = collator([data[i] for i in range(used, used + 4)])
            used += 4
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            rows.append(logits[batch["labels"][:, 1:] != -100].float())
    logits = torch.cat(rows)[:tokens]
    vocab = logits.shape[-1]
    results = []
    for cache_temperature, temperature in TEMPERATURES:
        logprobs = torch.log_softmax(logits / cache_temperature, -1)  # what the cache stores
        target = torch.log_softmax(logits / temperature, -1)  # what a term at this temperature wants
        for k in KS:
            for dtype in VALUE_DTYPES:
                encoding = CacheEncoding(k, vocab, dtype)
                ids, stored, tail = encoding.encode(logprobs)
                packed = pack_rows(
                    torch.as_tensor(ids.astype("int64")), encoding.decode_values(stored), torch.as_tensor(tail)
                )
                rebuilt = torch.log_softmax(TopKReconstruction(vocab, k, cache_temperature)(packed) / temperature, -1)
                kl = (target.exp() * (target - rebuilt)).sum(-1)
                if cache_temperature == temperature == 1.0:  # the library's own measure agrees
                    assert torch.allclose(kl, reconstruction_kl(logprobs, encoding), atol=1e-5)
                results.append(
                    {
                        "cache_temperature": cache_temperature,
                        "temperature": temperature,
                        "top_k": k,
                        "value_dtype": dtype,
                        "bytes_per_token": encoding.bytes_per_token,
                        "kl_mean": float(kl.mean()),
                        "kl_median": float(kl.median()),
                        "kl_max": float(kl.max()),
                    }
                )
    top1_mass = float(torch.softmax(logits, -1).max(-1).values.mean())
    return results, logits.shape[0], {"conversations_read": used, "mean_top1_probability": top1_mass}


def disk(conversations: int, max_length: int, workdir: Path) -> list[dict[str, Any]]:
    """``cache_teacher`` for each of DISK_SETTINGS: Parquet bytes per response token and caching time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd import cache_teacher
    from hf_kd.real_models import load_real_model

    path = load_real_model(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path)
    data = _conversations(conversations)
    results = []
    for k, dtype in DISK_SETTINGS:
        folder = workdir / f"cache-{k}-{dtype}"
        started = time.perf_counter()
        cache_teacher(
            teacher, tokenizer, data, folder, top_k=k, value_dtype=dtype, max_length=max_length, progress=False
        )
        manifest = json.loads((folder / "teacher_cache.json").read_text())
        tokens = sum(s["tokens"] for s in manifest["shards"])
        size = sum(s["bytes"] for s in manifest["shards"])
        results.append(
            {
                "top_k": k,
                "value_dtype": dtype,
                "encoding_bytes_per_token": manifest["encoding"]["bytes_per_token"],
                "parquet_bytes_per_response_token": size / tokens,
                "examples": len(data),
                "response_tokens": tokens,
                "cache_seconds": time.perf_counter() - started,
                "folder": folder.name,  # inside the run's temporary work folder
            }
        )
    return results


def speed_child(mode: str, student_dir: str, cache_dir: str, steps: int, batch: int, max_length: int) -> dict:
    """One run in this process: ``steps`` training steps (the first a warm-up), live teacher or cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer, load_teacher_cache
    from hf_kd.real_models import load_real_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    if mode == "live":
        teacher = AutoModelForCausalLM.from_pretrained(load_real_model(TEACHER), dtype=torch.float32)
        data = _conversations(steps * batch)
    else:
        teacher, data = None, load_teacher_cache(cache_dir)
        data = data.select(range(min(steps * batch, len(data))))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="kd_cache_speed_"),
        kd_loss="fkl",
        lmbda=0.0,
        max_steps=steps,
        per_device_train_batch_size=batch,
        max_length=max_length,
        learning_rate=1e-5,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    trainer.train()
    measured = times[1:]
    return {
        "mode": mode,
        "steps_measured": len(measured),
        "step_seconds_mean": sum(measured) / len(measured),
        "step_seconds": measured,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def speed(cache_dir: Path, workdir: Path, steps: int, batch: int, max_length: int) -> list[dict[str, Any]]:
    from hf_kd import load_real_model, make_layer_pruned_student

    student_dir = workdir / "student"
    if not student_dir.exists():
        make_layer_pruned_student(load_real_model(TEACHER), 10, student_dir)
    results = []
    for mode in ("live", "cache"):
        argv = [sys.executable, __file__, "--speed-child", mode, str(student_dir), str(cache_dir)]
        argv += ["--steps", str(steps), "--batch", str(batch), "--max-length", str(max_length)]
        output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Teacher cache: bytes, fidelity, speed",
        "",
        "Generated by `benchmarks/teacher_cache.py`; every number is measured.",
        "",
        f"- Command: `{results['command']}`"
        + (f"; fidelity table: `{results['fidelity_command']}`" if "fidelity_command" in results else ""),
        "- Machine: {cpu}, {cpu_count} CPU cores, {threads} thread(s); torch {torch}, transformers {transformers}, "
        "trl {trl}".format(**results["environment"]),
        f"- Teacher: SmolLM2-135M-Instruct (V = 49152), bundled conversations, {results['fidelity_tokens']} "
        "response tokens for the fidelity table (mean top-1 probability "
        f"{results['fidelity_info']['mean_top1_probability']:.3f}).",
        "- Encoding: per response token k ids (uint16 here) + k log-probabilities in the value dtype + the log tail "
        "mass (float32). Reconstruction: top-k exact, the tail mass spread evenly over the other V - k tokens.",
        "- Reference points: DistillKit stores about 300 B/token at its recommended setting and about 114 B at its "
        "budget setting; plain top-k with int32 ids and bf16 values costs 6 B x k.",
        "",
        "## Bytes per token vs reconstruction KL(p || p_hat), nats per token",
        "",
        "Columns: cache temperature -> temperature of the loss term. KL(p_T || p_hat_T) per response token, where "
        "p_T is the teacher at the term's temperature and p_hat_T the reconstruction the term sees.",
        "",
    ]
    fidelity = []
    by = {
        (r.get("cache_temperature", 1.0), r["temperature"], r["top_k"], r["value_dtype"]): r
        for r in results["fidelity"]
    }
    for (tc, t, k, dtype), r in by.items():
        if (tc, t) != (1.0, 1.0):
            continue
        others = [by.get((a, b, k, dtype)) for a, b in ((1.0, 2.0), (2.0, 2.0))]
        fidelity.append(
            [str(k), dtype, str(r["bytes_per_token"]), f"{r['kl_mean']:.4f}", f"{r['kl_median']:.4f}"]
            + [f"{r['kl_max']:.3f}", *(f"{o['kl_mean']:.4f}" if o else "-" for o in others)]
        )
    fidelity_head = ["k", "value dtype", "bytes/token", "KL mean 1->1", "median 1->1", "max 1->1", "KL mean 1->2"]
    lines += [format_table([*fidelity_head, "KL mean 2->2"], fidelity).rstrip("\n")]
    lines += ["", "## On disk (Parquet, `hf_kd.cache_teacher`)", ""]
    disk = [
        [str(r["top_k"]), r["value_dtype"], str(r["encoding_bytes_per_token"])]
        + [f"{r['parquet_bytes_per_response_token']:.1f}", str(r["examples"]), str(r["response_tokens"])]
        + [f"{r['cache_seconds']:.1f}"]
        for r in results["disk"]
    ]
    disk_head = ["k", "value dtype", "encoding B/token", "Parquet B/response token", "examples", "tokens", "cache s"]
    lines += [format_table(disk_head, disk).rstrip("\n")]
    lines += ["", "## One training step, live teacher vs cache (fkl, fused loss, off-policy)", ""]
    speed = [
        [r["mode"], f"{r['step_seconds_mean']:.2f}", str(r["steps_measured"]), f"{r['peak_rss_mib']:.0f}"]
        + [str(r["threads"])]
        for r in results["speed"]
    ]
    lines += [format_table(["teacher", "step s (mean)", "steps measured", "peak RSS MiB", "threads"], speed)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=400, help="Response tokens of the fidelity table.")
    parser.add_argument("--conversations", type=int, default=64, help="Conversations cached for the disk table.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="Training steps per speed run (the first is warm-up).")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only", choices=("fidelity",), help="Re-measure one part and update the existing results JSON."
    )
    parser.add_argument("--speed-child", nargs=3, metavar=("MODE", "STUDENT", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="Rewrite the markdown of an existing results JSON.")
    args = parser.parse_args()
    if args.speed_child:
        print(json.dumps(speed_child(*args.speed_child, args.steps, args.batch, args.max_length)))
        return
    if args.render:
        args.render.with_suffix(".md").write_text(render(json.loads(args.render.read_text())))
        return
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="kd_teacher_cache_"))
    if args.only == "fidelity":
        out = RESULTS_DIR / "teacher_cache.json"
        results = json.loads(out.read_text())
        results["fidelity"], results["fidelity_tokens"], results["fidelity_info"] = fidelity(
            args.tokens, args.max_length
        )
        results["fidelity_command"] = "python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:])
        write_text_atomically(out, json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(render(results))
        return
    results: dict[str, Any] = {"command": "python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:])}
    results["environment"] = environment() | {"threads": args.threads}
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "teacher_cache.json"

    def save() -> None:  # after every part, so an interrupted run keeps what it measured
        write_text_atomically(out, json.dumps(results, indent=2) + "\n")

    results["fidelity"], results["fidelity_tokens"], results["fidelity_info"] = fidelity(args.tokens, args.max_length)
    save()
    results["disk"] = disk(args.conversations, args.max_length, workdir)
    save()
    default = next(r for r in results["disk"] if (r["top_k"], r["value_dtype"]) == DEFAULT_SETTING)
    results["speed"] = speed(workdir / default["folder"], workdir, args.steps, args.batch, args.max_length)
    save()
    out.with_suffix(".md").write_text(render(results))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
