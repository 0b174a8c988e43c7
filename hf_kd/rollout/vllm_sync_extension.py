"""A vLLM worker extension that reloads the served model's weights from a folder (the student's, after a step).

It runs inside the vLLM server's worker, in vLLM's own environment: it imports neither hf_kd nor anything vLLM's
environment lacks. Start the server with this file's folder on ``PYTHONPATH`` (hf_kd copies it next to the
weights when it starts the server), ``--worker-extension-cls vllm_sync_extension.WeightSyncExtension`` and
``VLLM_SERVER_DEV_MODE=1`` (which opens ``POST /collective_rpc``); the trainer then calls
``{"method": "hf_kd_reload_weights", "kwargs": {"weights_path": folder}}``.

``reload_weights`` alone leaves the output layer of a tied model on vLLM's CPU build sampling from a packed copy of
the old embedding (silently wrong); re-running each embedding module's ``process_weights_after_loading`` after the
reload repacks it. The answer's ``sum`` lets the trainer check that the engine computes with the weights it wrote:
each linear layer (the output layer included) is applied, through the kernel it generates with (so the packed copies
on CPU are what is read), to one-hot rows that pick ``PROBES`` of its input columns (``probe_columns``, shifted by
the push's ``probe`` number), which returns those weight columns exactly in any dtype (a row of ones would return
row sums rounded to bf16's 8 bits); these, the linear biases and every other parameter (embeddings, norms) are summed
in float64. The trainer computes the same sum from what it wrote (``hf_kd.rollout.weight_sync.fingerprint``).
"""

from __future__ import annotations

PROBES = 16


def probe_columns(width: int, probe: int, count: int = PROBES) -> list[int]:
    """``count`` distinct input columns of a ``width``-wide layer, evenly spread and shifted by ``probe`` (the push's
    number: successive pushes read other columns)."""
    count = min(count, width)
    return [((t * width) // count + probe * 7919) % width for t in range(count)]


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``--worker-extension-cls``): ``self`` is the worker."""

    def hf_kd_reload_weights(self, weights_path: str, probe: int = 0) -> dict:
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
        return {"sum": _fingerprint(model, probe), "dtype": name, "embeddings_refreshed": refreshed}


def _fingerprint(model, probe: int) -> float:
    """Sum of every linear layer's output for one-hot rows at its ``probe_columns`` (those columns of its weight, as
    its kernel reads them), of its bias, and of every other parameter, in float64."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    dtype = next(model.parameters()).dtype
    total, seen = 0.0, set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LinearBase, ParallelLMHead)):
                width = module.embedding_dim if isinstance(module, ParallelLMHead) else module.input_size
                columns = probe_columns(width, probe)
                one_hot = torch.zeros(len(columns), width, dtype=dtype, device=next(module.parameters()).device)
                one_hot[range(len(columns)), columns] = 1
                total += float(module.quant_method.apply(module, one_hot, None).double().sum())
                bias = getattr(module, "bias", None)
                total += float(bias.detach().double().sum()) if bias is not None else 0.0
                continue
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    total += float(parameter.detach().double().sum())
    return total
