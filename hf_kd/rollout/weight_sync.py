"""Push the student's weights into a vLLM engine: write them to a folder, have the server's workers reload them.

The student (LoRA adapters merged into a copy of the weights, the student itself unchanged) is written with
``save_pretrained`` as safetensors into ``folder``, which the server must be able to read (the same machine or a
shared disk). ``POST /collective_rpc`` then calls the worker method of ``vllm_sync_extension`` on every worker, which
reloads the folder and answers a sum over the weights it computes with (columns of each linear layer read through its
kernel, exact in fp32 and bf16 alike); the push fails unless every worker's sum equals that of what was written
(``fingerprint``, cast to the engine's dtype) within ``SUM_RTOL``: stale weights are an error, never silent. The
server's prefix cache (KV computed with the old weights) is reset after each push.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vllm_backend import VLLMRolloutError
from .vllm_sync_extension import probe_columns

METHOD = "hf_kd_reload_weights"
EXTENSION = "vllm_sync_extension.WeightSyncExtension"
SUM_RTOL = 1e-6


def merged_state_dict(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the plain model to save, its state dict): for a PEFT model, the base model and its weights with each active,
    unmerged adapter's delta added out of place (the student is not touched: merging and unmerging in place would
    drift its base weights by rounding at every sync), the adapter keys dropped and the wrapped names restored; any
    other model as it is (unwrapped from DDP by the caller)."""
    if not hasattr(model, "get_base_model"):
        return model, model.state_dict()
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        for adapter in module.active_adapters:
            if adapter not in getattr(module, "merged_adapters", []):
                delta = module.get_delta_weight(adapter)
                deltas[f"{name}.weight"] = deltas[f"{name}.weight"] + delta if f"{name}.weight" in deltas else delta
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue
        key = clean_key(key)
        state[key] = value + deltas[key].to(value.dtype) if key in deltas else value
    return base, state


def clean_key(key: str) -> str:
    """A PEFT model's parameter name as the plain model names it."""
    return key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def fingerprint(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, probe: int = 0) -> float:
    """What the engine's worker answers for these weights (``vllm_sync_extension``): the sum, in float64 of values
    cast to ``dtype``, of every linear layer's weight at its ``probe_columns`` and of its bias (a tied output layer
    counted as a layer of its own, as the engine applies it), and of every other tensor once (a tied embedding once).
    The engine fuses some layers (q/k/v, gate/up): they share their input width, hence their columns and this sum."""
    linear = {
        clean_key(f"{name}.{part}")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "lora_" not in name and ".original_module" not in name
        for part in ("weight", "bias")
    }
    seen, total = set(), 0.0
    for key, value in state.items():
        if key not in linear:
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
        elif key.endswith(".weight"):
            value = value[:, probe_columns(value.shape[1], probe)]
        total += float(value.detach().to(dtype).double().sum())
    return total


class WeightSync:
    """Writes the student into ``folder`` (None: a temporary folder, removed on ``close``) and makes the server
    reload it. ``seconds``: the time of the last push (writing and reloading); ``pushes``: how many were made (each
    push's fingerprint reads other weight columns)."""

    def __init__(self, folder: str | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="hf_kd-vllm-weights-") if folder is None else folder)
        # a temporary folder goes with this object (or the process) when nobody calls close()
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.folder), True) if folder is None else None
        self.seconds = 0.0
        self.pushes = 0

    def push(self, model: nn.Module, backend: Any) -> None:
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            plain, state = merged_state_dict(model)
            plain.save_pretrained(self.folder, state_dict=dict(state), safe_serialization=True)  # it empties the dict
            probe, self.pushes = self.pushes, self.pushes + 1
            payload = {"method": METHOD, "kwargs": {"weights_path": str(self.folder), "probe": probe}}
            answer = self._call(backend, "/collective_rpc", payload)
            results = answer.get("results") if isinstance(answer, dict) else None
            if not results or not all(isinstance(r, dict) and "sum" in r for r in results):
                raise VLLMRolloutError(
                    f"The vLLM server at {backend.url} answered the weight reload with {answer!r:.300}, not each "
                    f"worker's parameter sum: is it started with --worker-extension-cls {EXTENSION}?"
                )
            for result in results:
                dtype = getattr(torch, str(result.get("dtype")), None)
                expected = fingerprint(plain, state, dtype, probe) if isinstance(dtype, torch.dtype) else None
                if expected is None or abs(result["sum"] - expected) > SUM_RTOL * max(abs(expected), 1.0):
                    raise VLLMRolloutError(
                        f"The vLLM server at {backend.url} holds weights summing to {result['sum']!r} "
                        f"({result.get('dtype')}) after reloading {self.folder}, but the student written there sums "
                        f"to {expected!r}: its engine would sample from other weights than the student's. Does it "
                        "serve the student's architecture, and can it read that folder (vllm_sync_dir on a shared "
                        "disk)?"
                    )
        cache = self._call(backend, "/reset_prefix_cache", {})
        if not (isinstance(cache, dict) and cache.get("success")):
            raise VLLMRolloutError(
                f"The vLLM server at {backend.url} did not reset its prefix cache after the weight reload "
                f"({cache!r:.200}): cached prompts would keep the old weights' KV."
            )
        self.seconds = time.perf_counter() - start

    @staticmethod
    def _call(backend: Any, path: str, payload: dict[str, Any]) -> Any:
        """A development endpoint of the server; a 404 means it was started without them."""
        try:
            return backend.request(path, payload)
        except VLLMRolloutError as error:
            if "HTTP 404" in str(error):
                raise VLLMRolloutError(
                    f"{error}\nThe server has no {path}: start it with VLLM_SERVER_DEV_MODE=1 and "
                    f"--worker-extension-cls {EXTENSION} (this file's folder on its PYTHONPATH) to sync weights."
                ) from None
            raise

    def close(self) -> None:
        if self._remove is not None:
            self._remove()


__all__ = ["EXTENSION", "METHOD", "WeightSync", "fingerprint", "merged_state_dict"]
