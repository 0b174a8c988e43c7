"""Rollout backends: what generates the completions of a batch of prompts (on-policy, seq_kd, SCRG's re-generation).

A backend takes left-padded prompts ([B, P] ids and mask) and the run's ``GenerationConfig`` (sampling temperature,
top-p, top-k 0, ``max_new_tokens``, EOS, the padded head rows in ``suppress_tokens``) and returns what
``generate`` returns: [B, P + N] sequences, the prompts followed by each completion padded with the pad id to the
longest one. ``rollout_outputs`` turns them into the (ids, attention mask, labels) a generated step trains on, as
TRL's ``GKDTrainer.generate_on_policy_outputs`` does. ``TransformersBackend`` (the default) calls ``generate``;
``hf_kd.rollout.vllm_backend.VLLMServerBackend`` asks a vLLM server whose weights follow the student's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig

from ..losses.core import IGNORE_INDEX


class RolloutBackend:
    """Generates completions; ``sync`` hands it the student's current weights (a no-op where it reads the model)."""

    name = "backend"

    def generate(
        self, model: nn.Module | None, prompts: torch.Tensor, prompt_mask: torch.Tensor, config: GenerationConfig
    ) -> torch.Tensor:
        """[B, P + N] sequences: ``prompts`` then each completion (up to and including EOS), padded to the longest."""
        raise NotImplementedError

    def sync(self, model: nn.Module) -> None:
        """Make the weights it samples from equal to ``model``'s."""

    def close(self) -> None:
        """Release what it started (a server)."""


class TransformersBackend(RolloutBackend):
    """transformers' ``generate`` on the model itself: always the current weights, nothing to sync."""

    name = "transformers"

    def generate(
        self, model: nn.Module | None, prompts: torch.Tensor, prompt_mask: torch.Tensor, config: GenerationConfig
    ) -> torch.Tensor:
        out = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=config)
        return getattr(out, "sequences", out)  # a tensor unless the config asks for a dict


def eos_ids(config: GenerationConfig) -> list[int]:
    """The generation config's EOS ids as a list (empty when it has none)."""
    eos = config.eos_token_id
    return [] if eos is None else [int(e) for e in ([eos] if isinstance(eos, int) else eos)]


def rollout_outputs(
    sequences: torch.Tensor, prompt_mask: torch.Tensor, config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) of generated sequences: the mask keeps the prompt's mask and each completion up
    to and including its first EOS; labels are the ids there and -100 on the prompt and after EOS."""
    prompt_length = prompt_mask.shape[1]
    completion = sequences[:, prompt_length:]
    stops = torch.tensor(eos_ids(config), dtype=completion.dtype, device=completion.device)
    is_eos = torch.isin(completion, stops)
    ends = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), completion.shape[1])
    positions = torch.arange(completion.shape[1], device=completion.device).unsqueeze(0)
    mask = torch.cat([prompt_mask.to(completion.dtype), (positions <= ends.unsqueeze(1)).to(completion.dtype)], 1)
    labels = sequences.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return sequences, mask, labels


__all__ = ["RolloutBackend", "TransformersBackend", "eos_ids", "rollout_outputs"]
