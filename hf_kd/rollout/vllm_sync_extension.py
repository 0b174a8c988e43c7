"""A vLLM worker extension that reloads the served model's weights from a folder (the student's, after a step).

It runs inside the vLLM server's worker, in vLLM's own environment: it imports neither hf_kd nor anything vLLM's
environment lacks. Start the server with this file's folder on ``PYTHONPATH`` (hf_kd copies it next to the
weights when it starts the server), ``--worker-extension-cls vllm_sync_extension.WeightSyncExtension`` and
``VLLM_SERVER_DEV_MODE=1`` (which opens ``POST /collective_rpc``); the trainer then calls
``{"method": "hf_kd_reload_weights", "kwargs": {"weights_path": folder}}``.

``reload_weights`` alone leaves the output layer of a tied model on vLLM's CPU build sampling from a packed copy of
the old embedding (silently wrong); re-running each embedding module's ``process_weights_after_loading`` after the
reload repacks it. The answer's ``sum`` lets the trainer check that the engine computes with the weights it wrote:
each linear layer (the output layer included) applied to a row of ones through the kernel it generates with (so
the packed copies on CPU are what is read), plus every other parameter (embeddings, norms) summed, in float64.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``--worker-extension-cls``): ``self`` is the worker."""

    def hf_kd_reload_weights(self, weights_path: str) -> dict:
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        refreshed = 0
        for module in model.modules():
            if isinstance(module, VocabParallelEmbedding):
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
        dtype = next(model.parameters()).dtype
        name = str(dtype).removeprefix("torch.")
        return {"sum": _fingerprint(model), "dtype": name, "embeddings_refreshed": refreshed}


def _fingerprint(model) -> float:
    """Sum of every linear layer's output for a row of ones (its weights' sum, plus its bias, as computed by its
    kernel) and of every other parameter, in float64."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    dtype = next(model.parameters()).dtype
    total, seen = 0.0, set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LinearBase, ParallelLMHead)):
                width = module.embedding_dim if isinstance(module, ParallelLMHead) else module.input_size
                device = next(module.parameters()).device
                ones = torch.ones(1, width, dtype=dtype, device=device)
                total += float(module.quant_method.apply(module, ones, getattr(module, "bias", None)).double().sum())
                continue
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    total += float(parameter.detach().double().sum())
    return total
