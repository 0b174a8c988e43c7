"""Rollout time of transformers' ``generate`` variants against the way ``TransformersBackend`` calls it.

The student is the real SmolLM2-135M-Instruct pruned to 10 layers (layers 0, 3, ..., 27, as rollout_speed.py builds
it), fp32; the prompts are bundled training conversations collated as the trainer collates them (chat template,
left-padded), and the ``GenerationConfig`` is the one ``DistillationTrainer`` builds for on-policy steps (sampling at
temperature 0.9, top-k 0, top-p 1.0, ``max_new_tokens``, EOS, padded head rows suppressed), or its greedy copy.
Variants, each a change to the default call (the model in train mode, as during a training step; dynamic cache):

* ``eval``: the model in eval mode;
* ``inference_mode``: under ``torch.inference_mode()`` (``generate`` itself runs under ``no_grad``);
* ``static``: ``cache_implementation="static"``, not compiled (transformers compiles only on GPUs by default);
* ``static+compile``: the static cache and ``torch.compile`` of the decoding forward (``CompileConfig`` forced on
  every device, inductor's default mode), its first call timed apart, and the graphs compiled by each call counted;
* ``eager-attention``: the eager attention implementation instead of SDPA;
* ``prefill-only``: not a variant, the share of a call that is the prompts' forward (``generate``'s first step).

The variants run interleaved (A B C ... A B C ...) for ``--rounds`` rounds after one warm-up round, each round on the
next of ``--prompt-batches`` prompt batches (so prompt lengths change between calls, as between training steps), and
every call starts from the same seed. Medians and ratios to ``default``; ratios survive a loaded machine better than
seconds do. Also recorded: whether each variant returns the default's tokens (greedy, and sampled from the same seed).
Writes results/generate_variants_<tag>.json and .md and prints the table.

    OMP_NUM_THREADS=1 python benchmarks/generate_variants.py --tag cpu-1thread
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ROOT, environment, format_table, write_text_atomically
from rollout_speed import student_folder

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "eval": {"eval": True},
    "inference_mode": {"inference_mode": True},
    "static": {"cache": "static"},
    "static+compile": {"cache": "static", "compile": True},
    "eager-attention": {"attention": "eager"},
    "prefill-only": {"prefill_only": True},
}


def setup(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The trainer's student, its on-policy ``GenerationConfig`` and ``--prompt-batches`` collated prompt batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.assets import load_real_model
    from hf_kd.data import load_bundled_dataset

    teacher_path = load_real_model("smollm2-135m-instruct")
    student_path = student_folder(teacher_path, Path(args.work))
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    config = DistillationConfig(
        output_dir=str(Path(args.work) / "generate-variants"), per_device_train_batch_size=args.batch, lmbda=1.0,
        max_new_tokens=args.new_tokens, max_length=args.max_length, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=0, kd_loss="jsd",
    )  # fmt: skip
    rows = load_bundled_dataset("train").select(range(args.batch * args.prompt_batches))
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32),
        args=config,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    keys = ("prompts", "prompt_attention_mask")
    collated = [
        trainer.data_collator([rows[i] for i in range(b * args.batch, (b + 1) * args.batch)])
        for b in range(args.prompt_batches)
    ]
    batches = [{key: batch[key].to(trainer.model.device) for key in keys} for batch in collated]
    return trainer.model, trainer.generation_config, batches


def call(model: Any, batch: dict[str, Any], config: Any, variant: dict[str, Any]) -> Any:
    """One rollout of ``batch``'s prompts with ``variant``'s changes to the backend's ``generate`` call."""
    import torch
    from transformers import CompileConfig

    from hf_kd.rollout.backend import TransformersBackend

    config = copy.deepcopy(config)
    if "cache" in variant:
        config.cache_implementation = variant["cache"]
    if variant.get("compile"):
        config.compile_config = CompileConfig(mode="default")
        config.compile_config._compile_all_devices = True
    model.train(not variant.get("eval"))
    model.set_attn_implementation(variant.get("attention", "sdpa"))
    mode = torch.inference_mode() if variant.get("inference_mode") else contextlib.nullcontext()
    with mode:
        if variant.get("prefill_only"):
            with torch.no_grad():
                model(input_ids=batch["prompts"], attention_mask=batch["prompt_attention_mask"], logits_to_keep=1)
            return batch["prompts"]
        return TransformersBackend().generate(model, batch["prompts"], batch["prompt_attention_mask"], config)


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(model: Any, config: Any, batches: list[dict], names: list[str], rounds: int) -> dict:
    """Interleaved rounds of every variant; per variant its call times, graphs compiled and equality to default."""
    import torch

    record: dict[str, dict[str, Any]] = {name: {"seconds": [], "graphs": [], "same_as_default": []} for name in names}
    for round_index in range(rounds + 1):  # round 0 warms up (and compiles)
        outputs: dict[str, torch.Tensor] = {}
        b = round_index % len(batches)
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:  # rotated: no fixed order
            torch.manual_seed(round_index)
            graphs, began = graphs_compiled(), time.perf_counter()
            sequences = call(model, batches[b], config, VARIANTS[name])
            if sequences.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            entry = record[name]
            entry["seconds"].append(seconds)
            entry["graphs"].append(graphs_compiled() - graphs)
            outputs[name] = sequences
            print(f"round {round_index} batch {b} {name}: {seconds:.2f} s, {sequences.shape[1]} positions, "
                  f"{entry['graphs'][-1]} graphs compiled", flush=True)  # fmt: skip
        for name in names:
            if name not in ("default", "prefill-only") and "default" in outputs:
                record[name]["same_as_default"].append(bool(torch.equal(outputs[name], outputs["default"])))
    for entry in record.values():
        timed = entry["seconds"][1:]
        entry["first_call_seconds"] = entry["seconds"][0]
        entry["median_seconds"] = statistics.median(timed)
        entry["graphs_first_call"] = entry["graphs"][0]
        entry["graphs_after_first_call"] = sum(entry["graphs"][1:])
    if "default" in record:
        for entry in record.values():
            entry["ratio_to_default"] = entry["median_seconds"] / record["default"]["median_seconds"]
            entry["round_ratios"] = [s / d for s, d in zip(entry["seconds"][1:], record["default"]["seconds"][1:])]
            entry["median_round_ratio"] = statistics.median(entry["round_ratios"])
    return record


def table(results: dict) -> str:
    rows = []
    for sampling, record in results["modes"].items():
        for name, r in record.items():
            rows.append(
                [
                    sampling,
                    name,
                    f"{r['median_seconds']:.2f}",
                    f"{r['ratio_to_default']:.3f}" if "ratio_to_default" in r else "-",
                    f"{r['median_round_ratio']:.3f}" if "round_ratios" in r else "-",
                    f"{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}" if "round_ratios" in r else "-",
                    f"{r['first_call_seconds']:.1f}",
                    str(r["graphs_first_call"]),
                    str(r["graphs_after_first_call"]),
                    f"{sum(r['same_as_default'])}/{len(r['same_as_default'])}" if r["same_as_default"] else "-",
                ]
            )
    head = [
        "mode", "variant", "median s", "vs default (medians)", "vs default (median of rounds)", "per-round ratios",
        "first call s",
        "graphs compiled: first call", "later calls", "calls equal to default",
    ]  # fmt: skip
    return format_table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--greedy-rounds", type=int, default=2)
    parser.add_argument("--prompt-batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tag", default="cpu-1thread")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "hf_kd-rollout-speed"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model, sampling_config, batches = setup(args)
    greedy_config = copy.deepcopy(sampling_config)
    greedy_config.do_sample, greedy_config.temperature = False, None
    results = {
        "command": f"OMP_NUM_THREADS={args.threads} python benchmarks/generate_variants.py --tag {args.tag}",
        "settings": {k: v for k, v in vars(args).items() if k != "work"},
        "prompt_lengths": [int(b["prompts"].shape[1]) for b in batches],
        "environment": environment(),
        "modes": {},
    }
    stem = ROOT / "benchmarks" / "results" / f"generate_variants_{args.tag}"
    modes = {"greedy": (greedy_config, args.greedy_rounds), "sample": (sampling_config, args.rounds)}
    for sampling, (config, rounds) in modes.items():
        results["modes"][sampling] = measure(model, config, batches, args.variants, rounds)
        write_text_atomically(stem.with_suffix(".json"), json.dumps(results, indent=2))
    write_text_atomically(stem.with_suffix(".md"), table(results))
    print(table(results))


if __name__ == "__main__":
    main()
