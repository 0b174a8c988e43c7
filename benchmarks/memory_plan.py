"""What each GPU holds when a 70B teacher is distilled into an 8B student on 8 x 80 GB, computed from the shapes.

Shapes are Llama-3-70B (teacher) and Llama-3.1-8B (student): same 128256-token vocabulary, untied heads. The
student trains in bf16 mixed precision with AdamW (fp32 master weights, fp32 gradients, two fp32 moments: 16
bytes per parameter); the teacher is frozen in bf16 (2 bytes per parameter, no gradients, no optimizer state).
Activations are counted as the layer-boundary checkpoints of gradient checkpointing (bf16 hidden states, one per
layer) plus the largest layer's unsharded weights, which FSDP2/ZeRO-3 gather one layer at a time. Prints a
markdown table; ``docs/scaling.md`` quotes it. Usage: ``python benchmarks/memory_plan.py [--seq 4096 --batch 1]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import format_table  # noqa: E402  (also puts this checkout's hf_kd first)

from hf_kd.losses.core import DEFAULT_CHUNK_ELEMENTS  # noqa: E402  (rows per loss chunk = this // vocabulary)

GB = 1e9
LIVE_CHUNK_TEMPORARIES = 8  # [rows, V] float32 buffers a loss term keeps alive at once: at most 8 (chunk_buffers.py)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.heads * head_dim + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.head_params + self.hidden  # embeddings, head, final norm


TEACHER = Shape("Llama-3-70B", 8192, 80, 64, 8, 28672, 128256)
STUDENT = Shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256)


def per_rank(ranks: int, sharded: bool, fused: bool, batch: int, seq: int) -> dict[str, float]:
    """GB per GPU for one configuration (``sharded``: FSDP2/ZeRO-3 over ``ranks``, else DDP replicas)."""
    share = ranks if sharded else 1
    tokens = batch * seq
    rows = {
        "student weights (fp32 master)": 4 * STUDENT.params / share,
        "student gradients (fp32)": 4 * STUDENT.params / share,
        "student AdamW moments (fp32)": 8 * STUDENT.params / share,
        "teacher weights (bf16)": 2 * TEACHER.params / share,
        "gathered layer (bf16, largest)": 2 * TEACHER.layer_params if sharded else 0.0,
        "activation checkpoints (bf16)": 2 * tokens * (STUDENT.hidden * STUDENT.layers),
    }
    if fused:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // STUDENT.vocab)
        rows["loss chunk temporaries (fp32)"] = 4 * LIVE_CHUNK_TEMPORARIES * chunk_rows * STUDENT.vocab
        if sharded:  # gathered around the loss: student head + its full gradient (fp32), teacher head (bf16)
            rows["gathered heads"] = 8 * STUDENT.head_params + 2 * TEACHER.head_params
    else:  # student and teacher logits, log-softmaxes and the logits' gradient, [tokens, V] float32 each
        rows["full logits and their temporaries (fp32)"] = 5 * 4 * tokens * STUDENT.vocab
    return {k: v / GB for k, v in rows.items()}


def table(ranks: int, batch: int, seq: int, memory_gb: float) -> str:
    configs = {
        "DDP, fused": (False, True),
        "FSDP2/ZeRO-3, unfused": (True, False),
        "FSDP2/ZeRO-3, fused": (True, True),
    }
    results = {name: per_rank(ranks, sharded, fused, batch, seq) for name, (sharded, fused) in configs.items()}
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    lines = [
        f"{TEACHER.name} teacher ({TEACHER.params / 1e9:.1f}B parameters) -> {STUDENT.name} student "
        f"({STUDENT.params / 1e9:.2f}B), {ranks} GPUs of {memory_gb:.0f} GB, {batch} x {seq} tokens per GPU; "
        "GB per GPU.",
        "",
    ]
    rows = [[key, *(f"{r.get(key, 0.0):.1f}" for r in results.values())] for key in keys]
    totals = {name: sum(r.values()) for name, r in results.items()}
    rows.append(["**total**", *(f"**{t:.1f}**" for t in totals.values())])
    rows.append([f"fits in {memory_gb:.0f} GB", *("yes" if t < memory_gb else "no" for t in totals.values())])
    return "\n".join(lines) + "\n" + format_table(["held by each GPU", *configs], rows).rstrip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--memory_gb", type=float, default=80)
    args = parser.parse_args()
    print(table(args.ranks, args.batch, args.seq, args.memory_gb))


if __name__ == "__main__":
    main()
