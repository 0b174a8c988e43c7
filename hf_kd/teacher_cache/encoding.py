"""How one teacher distribution is stored: top-k ids, their log-probabilities, and the log of the tail mass.

For a response position with teacher distribution p (at the cache temperature T_c, by default 1) the cache
keeps the k most likely token ids, log p_i for each of them (in ``value_dtype``: float32, float16, bfloat16,
or ``uint8``, a fixed-point code of -log p_i in steps of 1/8 nat, floored at -255/8), and
log m with m = sum of p_j over the other V - k tokens (always float32, from a log-sum-exp over
the full row, so it is exact). Bytes per response token: k * (id bytes + value bytes) + 4.

Reconstruction (``TopKReconstruction``) gives a dense row the loss engine treats like teacher logits:
T_c * log p_i on the top-k and T_c * log(m / (V - k)) on every other token, i.e. the tail mass spread
evenly. A term at the cache temperature sees exactly the top-k probabilities plus a flat tail of the right
total mass (up to the rounding of ``value_dtype``); with k = V and float32 values it is the teacher
distribution itself. A term at another temperature T gets the top-k exactly up to a constant
(T_c log p_i / T = z_i / T - const) but a flat tail whose mass at T is far from the real tail's (for T > T_c
a flat tail has the largest possible sum of p_j ** (T_c / T)): on SmolLM2 the KL to the teacher grows from 0.03 to 0.85
nats at k = 64 (benchmarks/teacher_cache.py), so the trainer refuses such a term; cache at its temperature.
Even then a top-k cache is far less faithful at T > 1, where the tail holds more of the mass: 0.66 nats at
k = 64 for a cache and a term both at T = 2 on SmolLM2.

``tail="student"`` spreads the tail mass m in proportion to the student's own (detached) distribution over the
tail tokens instead: p_j = m q_j / q_tail. Within the tail the ratio p_j / q_j is then one constant, so every
f-divergence of p and q (fkl, rkl, jsd, sfkl, srkl, tvd) and AKL's |p - q| split equal their value between the two
(k + 1)-bucket distributions (top-k entries plus one tail bucket, as TRL's server trainers send them), gradient
included: the student is taught the teacher's top-k and the tail's total mass, and keeps its own shape inside the
tail instead of being pulled towards a flat one. ``dac_kl`` and ``span`` read the reconstructed row as it is (the
band's ranks and the adjacent-token products inside the tail then follow the student's tail shape).
How the two tails compare in training is measured by benchmarks/quality.py (docs/results/methods.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

VALUE_DTYPES = ("float32", "float16", "bfloat16", "uint8")
UINT8_STEPS_PER_NAT = 8  # uint8 codes: log p = -code / 8, so the rounding error is at most 1/16 nat


@dataclass(frozen=True)
class CacheEncoding:
    """The storage format of one cache: ``top_k`` entries per token, values in ``value_dtype``."""

    top_k: int
    vocab_size: int
    value_dtype: str = "float16"

    def __post_init__(self):
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}.")
        if not 1 <= self.top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={self.vocab_size}], got {self.top_k}.")

    @property
    def id_dtype(self) -> str:
        """uint16 while every id fits (V <= 65536), int32 beyond."""
        return "uint16" if self.vocab_size <= 1 << 16 else "int32"

    @property
    def bytes_per_token(self) -> int:
        id_bytes = 2 if self.id_dtype == "uint16" else 4
        value_bytes = {"float32": 4, "uint8": 1}.get(self.value_dtype, 2)
        return self.top_k * (id_bytes + value_bytes) + 4

    @property
    def stored_value_dtype(self) -> str:
        """The Arrow/Parquet type of the value column (16-bit floats are stored as their raw bits)."""
        return {"float32": "float32", "uint8": "uint8"}.get(self.value_dtype, "uint16")

    @property
    def column_dtypes(self) -> dict[str, str]:
        """The item type of each list column of a shard (what the writer stores and the reader checks)."""
        return {
            "input_ids": "int32",
            "labels": "int32",
            "teacher_ids": self.id_dtype,
            "teacher_values": self.stored_value_dtype,
            "teacher_log_tail": "float32",
        }

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "id_dtype": self.id_dtype,
            "tail_dtype": "float32",
            "bytes_per_token": self.bytes_per_token,
        }

    @classmethod
    def from_dict(cls, values: dict) -> CacheEncoding:
        return cls(top_k=int(values["top_k"]), vocab_size=int(values["vocab_size"]), value_dtype=values["value_dtype"])

    # ------------------------------------------------------------------ encode / decode
    def encode(self, logprobs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n, V] float32 log-probabilities -> (ids [n, k], stored values [n, k], log tail mass [n])."""
        if logprobs.shape[-1] != self.vocab_size:
            raise ValueError(f"Rows have {logprobs.shape[-1]} entries, the encoding expects {self.vocab_size}.")
        logprobs = logprobs.float()
        top, ids = logprobs.topk(self.top_k, dim=-1)
        rest = logprobs.scatter(-1, ids, float("-inf"))
        log_tail = torch.logsumexp(rest, dim=-1)
        return (
            ids.cpu().numpy().astype(self.id_dtype),
            self._quantise(top).cpu().numpy(),
            log_tail.cpu().numpy().astype(np.float32),
        )

    def _quantise(self, values: torch.Tensor) -> torch.Tensor:
        if self.value_dtype == "float32":
            return values
        if self.value_dtype == "uint8":
            return (-values * UINT8_STEPS_PER_NAT).round().clamp(0, 255).to(torch.uint8)
        bits = values.to(getattr(torch, self.value_dtype)).view(torch.int16)
        return bits.to(torch.int32) & 0xFFFF  # the uint16 bit pattern, as a non-negative integer

    def decode_values(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored values -> float32 log-probabilities."""
        stored = torch.as_tensor(np.asarray(stored))
        if self.value_dtype == "float32":
            return stored.float()
        if self.value_dtype == "uint8":
            return stored.float() / -UINT8_STEPS_PER_NAT
        as_int16 = stored.to(torch.int32).to(torch.int16)  # wraps 32768..65535 to the same bit pattern
        return as_int16.view(getattr(torch, self.value_dtype)).float()


def pack_rows(ids: torch.Tensor, values: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    """[..., k] ids, [..., k] float32 log-probs, [...] log tail -> [..., 2k + 1] float32 rows for the engine.

    Ids travel as float32, exact for ids below 2**24 (checked).
    """
    if ids.numel() and int(ids.max()) >= 1 << 24:
        raise ValueError("Token ids of 2**24 or more cannot be packed exactly into float32 rows.")
    return torch.cat([values.float(), ids.float(), log_tail.float().unsqueeze(-1)], dim=-1)


TAIL_SHAPES = ("flat", "student")


class TopKReconstruction(nn.Module):
    """A "head" for the loss engine: packed cache rows [n, 2k + 1] -> dense teacher logits [n, V].

    See the module docstring for what the dense row is (``tail``: "flat" or "student"). It has no parameters;
    the engine calls it one chunk of rows at a time, so dense teacher rows never exist beyond one chunk. With
    ``tail="student"`` the engine passes the chunk's student logits (``reads_student_logits``).
    """

    def __init__(self, vocab_size: int, top_k: int, temperature: float = 1.0, tail: str = "flat"):
        super().__init__()
        if tail not in TAIL_SHAPES:
            raise ValueError(f"tail must be one of {TAIL_SHAPES}, got {tail!r}.")
        self.vocab_size, self.top_k, self.temperature, self.tail = vocab_size, top_k, temperature, tail

    @property
    def reads_student_logits(self) -> bool:
        return self.tail == "student"

    def forward(self, rows: torch.Tensor, student_logits: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.top_k, self.vocab_size
        values = rows[..., :k].float()
        ids = rows[..., k : 2 * k].long()
        log_tail = rows[..., 2 * k].float()
        if v == k:
            dense = torch.empty(*rows.shape[:-1], v, device=rows.device)
        elif self.tail == "student":
            if student_logits is None:
                raise ValueError("tail='student' reconstructs the tail from the student's logits: pass them.")
            dense = student_logits[..., :v].detach().float() / self.temperature  # one fresh [n, V] buffer, reused
            dense.scatter_(-1, ids, float("-inf"))  # the tail tokens only
            torch.log_softmax(dense, dim=-1, out=dense).add_(log_tail.unsqueeze(-1))
        else:
            dense = (log_tail - math.log(v - k)).unsqueeze(-1).expand(*rows.shape[:-1], v).clone()
        dense.scatter_(-1, ids, values)
        return dense.mul_(self.temperature) if self.temperature != 1.0 else dense


def reconstruction_kl(logprobs: torch.Tensor, encoding: CacheEncoding) -> torch.Tensor:
    """KL(p || p_hat) per row between full teacher log-probs [n, V] and their encode -> decode round trip."""
    ids, stored, log_tail = encoding.encode(logprobs)
    rows = pack_rows(torch.as_tensor(ids.astype(np.int64)), encoding.decode_values(stored), torch.as_tensor(log_tail))
    rebuilt = torch.log_softmax(TopKReconstruction(encoding.vocab_size, encoding.top_k)(rows), dim=-1)
    log_p = logprobs.float()
    return (log_p.exp() * (log_p - rebuilt.clamp_min(torch.finfo(torch.float32).min))).sum(-1)
