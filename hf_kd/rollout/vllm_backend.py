"""Rollouts from a vLLM server: completions of token-id prompts over HTTP, with the run's sampling.

Each prompt row is one ``POST /v1/completions`` (sent concurrently; vLLM batches them) with its ids as the prompt,
``return_token_ids`` (the generated ids exactly as sampled, never re-tokenized text) and a seed drawn from torch's
generator, so a run's rollouts are reproducible and resume exactly from a checkpoint (the Trainer restores that
generator). The sampling is the generation config's: temperature (greedy when ``do_sample`` is off), top-p, top-k
(0: off), ``max_new_tokens``, ``min_new_tokens``, stop at its EOS ids, and only the real vocabulary
(``allowed_token_ids``) when it suppresses padded head rows or ``vocab_size`` asks for it. ``sync`` pushes the
student's weights into the engine (``hf_kd.rollout.weight_sync``); a server for the teacher (seq_kd) is never synced.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from ..http_json import JsonServerClient
from .backend import RolloutBackend, eos_ids


class VLLMRolloutError(RuntimeError):
    """The vLLM rollout server could not be reached, refused a request, or answered something unusable."""


class VLLMServerBackend(RolloutBackend, JsonServerClient):
    """Generates with the model a vLLM server at ``url`` serves (``http://127.0.0.1:8000/v1``).

    ``model``: the served name to ask for (None: the only one it serves). ``vocab_size``: restrict sampling to the ids
    below it (a teacher whose head may be wider than the student's vocabulary). Each request waits ``timeout`` s;
    connection errors and 5xx answers are retried ``retries`` times with a doubling ``backoff``. ``syncer``
    (``WeightSync``) pushes the student's weights into the engine; None for a server that must not change (a teacher).
    ``server``: a ``VLLMServer`` this backend started and stops on ``close``.
    """

    name = "vllm"
    server_name = "vLLM server"
    error = VLLMRolloutError

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        vocab_size: int | None = None,
        timeout: float = 300.0,
        retries: int = 2,
        backoff: float = 0.5,
        syncer: Any = None,
        server: Any = None,
    ):
        JsonServerClient.__init__(self, url, timeout=timeout, retries=retries, backoff=backoff)
        self.model, self.vocab_size = model, vocab_size
        self.syncer, self.server = syncer, server

    def served_model(self) -> str:
        """The name to ask for: ``model``, or the only model ``GET /v1/models`` lists (checked once)."""
        if self.model is None:
            answer = self.request("/v1/models")
            names = [m.get("id") for m in answer.get("data", [])] if isinstance(answer, dict) else []
            if len(names) != 1:
                raise VLLMRolloutError(f"The vLLM server at {self.url} serves {names}: name one (model=...).")
            self.model = names[0]
        return self.model

    # ------------------------------------------------------------------ generation
    def sampling(self, config: GenerationConfig) -> dict[str, Any]:
        """The request fields that make vLLM sample as ``generate`` does with ``config``."""
        if config.max_new_tokens is None:
            raise ValueError("vLLM rollouts need generation_config.max_new_tokens.")
        greedy = not config.do_sample
        fields = {
            "max_tokens": int(config.max_new_tokens),
            "min_tokens": int(config.min_new_tokens or 0),
            "temperature": 0.0 if greedy else float(config.temperature if config.temperature is not None else 1.0),
            "top_p": 1.0 if greedy or config.top_p is None else float(config.top_p),
            "top_k": 0 if greedy or not config.top_k else int(config.top_k),
            "stop_token_ids": eos_ids(config),
        }
        suppressed = set(config.suppress_tokens or [])
        if suppressed or self.vocab_size is not None:
            limit = self.vocab_size if self.vocab_size is not None else min(suppressed)
            fields["allowed_token_ids"] = [i for i in range(limit) if i not in suppressed]
        return fields

    def generate(
        self, model: nn.Module | None, prompts: torch.Tensor, prompt_mask: torch.Tensor, config: GenerationConfig
    ) -> torch.Tensor:
        """Sequences as ``generate`` returns them (``model`` is not read: the server holds the weights)."""
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompts.cpu(), prompt_mask.cpu())]
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()  # torch's generator: restored on resume
        base = {"model": self.served_model(), **self.sampling(config), "n": 1}
        base.update({"return_token_ids": True, "add_special_tokens": False, "skip_special_tokens": False})
        with ThreadPoolExecutor(max_workers=max(len(rows), 1)) as pool:
            completions = list(
                pool.map(lambda r: self._complete({**base, "prompt": rows[r], "seed": seeds[r]}, r), range(len(rows)))
            )
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        width = max((len(c) for c in completions), default=0)
        tail = torch.full((len(rows), width), pad, dtype=prompts.dtype)
        for r, completion in enumerate(completions):
            tail[r, : len(completion)] = torch.tensor(completion, dtype=prompts.dtype)
        return torch.cat([prompts, tail.to(prompts.device)], dim=1)

    def _complete(self, payload: dict[str, Any], row: int) -> list[int]:
        """One row's generated ids, checked."""
        answer = self.request("/v1/completions", payload)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        ids = choices[0].get("token_ids") if isinstance(choices, list) and len(choices) == 1 else None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise VLLMRolloutError(
                f"The vLLM server at {self.url} answered row {row} without its generated token ids "
                f"(return_token_ids): {answer!r:.300}"
            )
        outside = self.vocab_size is not None and any(i >= self.vocab_size for i in ids)
        if len(ids) > payload["max_tokens"] or outside:
            raise VLLMRolloutError(
                f"The vLLM server at {self.url} answered row {row} with {len(ids)} ids for max_tokens "
                f"{payload['max_tokens']} or ids outside the vocabulary of {self.vocab_size}: {ids[:20]}"
            )
        return ids

    # ------------------------------------------------------------------ weights
    def sync(self, model: nn.Module) -> None:
        if self.syncer is not None:
            self.syncer.push(model, self)

    def close(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
        if self.server is not None:
            self.server.stop()


__all__ = ["VLLMRolloutError", "VLLMServerBackend"]
