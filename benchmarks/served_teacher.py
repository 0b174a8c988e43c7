"""A served teacher on vLLM: start-up time, scoring time and bytes per token on the wire.

Starts vLLM's OpenAI-compatible server (the environment made by scripts/setup_vllm.sh) with SmolLM2-135M-Instruct
in fp32, then scores the same batch of real chat tokens (``--batch`` sequences of ``--length`` tokens, cut from the
bundled conversations) at each ``--ks`` with ``ServedTeacher``: one warm-up request, then ``--repeats`` timed ones.
Writes results/served_teacher_<tag>.json and prints it.

    OMP_NUM_THREADS=2 python benchmarks/served_teacher.py --tag cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transformers import AutoTokenizer

from hf_kd.data import load_bundled_dataset
from hf_kd.real_models import load_real_model
from hf_kd.teachers import ServedTeacher
from hf_kd.vllm_server import VLLMServer

ROOT = Path(__file__).resolve().parents[1]


def token_batch(tokenizer, batch: int, length: int) -> list[list[int]]:
    """``batch`` sequences of exactly ``length`` tokens, cut from the bundled conversations in order."""
    stream: list[int] = []
    for row in load_bundled_dataset("train"):
        stream += tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        if len(stream) >= batch * length:
            return [stream[i * length : (i + 1) * length] for i in range(batch)]
    raise ValueError(f"The bundled conversations hold fewer than {batch * length} tokens.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()

    teacher_path = load_real_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    batch = token_batch(tokenizer, args.batch, args.length)
    tokens = args.batch * args.length
    server = VLLMServer(teacher_path, args.python, max_logprobs=max(args.ks), startup_timeout=900)
    start = time.perf_counter()
    with server:
        results = {"start_seconds": round(time.perf_counter() - start, 1), "batch": args.batch, "length": args.length}
        for k in args.ks:
            teacher = ServedTeacher(server.url, top_k=k)
            teacher.check(tokenizer, model_name=str(teacher_path))
            teacher.score(batch)  # warm-up
            seconds = []
            for _ in range(args.repeats):
                before = teacher.bytes_received
                tick = time.perf_counter()
                teacher.score(batch)
                seconds.append(time.perf_counter() - tick)
            results[f"k{k}"] = {
                "score_seconds_median": round(statistics.median(seconds), 2),
                "score_seconds": [round(s, 2) for s in seconds],
                "response_bytes_per_token": round((teacher.bytes_received - before) / tokens),
            }
    out = ROOT / "benchmarks" / "results" / f"served_teacher_{args.tag}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
