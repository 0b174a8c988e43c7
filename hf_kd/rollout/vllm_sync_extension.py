"""A vLLM worker extension that reloads the served model's weights from a folder (the student's, after a step).

It runs inside the vLLM server's worker, in vLLM's own environment: it imports neither hf_kd nor anything vLLM's
environment lacks. Start the server with this file's folder on ``PYTHONPATH`` (``VLLMServer`` copies it into a
folder of its own), ``--worker-extension-cls vllm_sync_extension.WeightSyncExtension`` and
``VLLM_SERVER_DEV_MODE=1`` (which opens ``POST /collective_rpc``); the trainer then calls
``{"method": "hf_kd_reload_weights", "kwargs": {"weights_path": folder}}``.

``reload_weights`` alone leaves the output layer of a tied model on vLLM's CPU build sampling from a packed copy of
the old embedding (silently wrong); re-running each embedding module's ``process_weights_after_loading`` after the
reload repacks it. The answer's ``sum`` (all parameters in float64) and ``dtype`` let the trainer check that the
engine holds the weights it wrote.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``--worker-extension-cls``): ``self`` is the worker."""

    def hf_kd_reload_weights(self, weights_path: str) -> dict:
        import torch
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        refreshed = 0
        for module in model.modules():
            if isinstance(module, VocabParallelEmbedding):
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
        with torch.no_grad():
            total = sum(float(p.detach().double().sum()) for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {"sum": total, "dtype": dtype, "embeddings_refreshed": refreshed}
