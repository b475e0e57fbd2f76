"""In-place weight reload for the vllm backend's warm workers (option `weight_reload`), run inside vLLM's workers.

vLLM loads this class into each of its workers (`vllm.LLM(worker_extension_cls=...)`); the backend calls
`LLM.collective_rpc("evaluator_reload_weights", args=(folder,))`. Imported by vLLM's worker processes only, never
by the daemon or the stages themselves.

What it does: vLLM's own `reload_weights` (layerwise: each layer's tensors are loaded and processed, then copied into
the storage the engine was built with, so compiled graphs and CUDA graphs see the new values), then one repair. A
layer that loads no tensor of its own is not processed again; on vLLM 0.16's CPU build that leaves a tied `lm_head`
(it shares the input embedding's tensor, which the checkpoint holds once) computing logits with the packed oneDNN
copy of the OLD embedding made when the engine was built, while the input embedding uses the new one: measured
0.59 nats off a fresh engine on the real SmolLM2 (scripts/check_vllm_reload.py). Every unquantized embedding-style
layer (embeddings, lm heads) keeps its full tensor, so its packing is redone from it here; on a GPU this
processing is a no-op (the kernels read the tensor itself). With the repair the reloaded engine's
log-probabilities equal a fresh engine's exactly, compiled and eager (scripts/check_vllm_reload.py).
"""
from __future__ import annotations


class ReloadExtension:
    """Methods vLLM adds to its worker class (so `self` is the worker: self.model_runner)."""

    def evaluator_reload_weights(self, folder: str) -> int:
        """Load the checkpoint folder's weights into the running model in place; returns how many embedding-style
        layers were packed again. The caller has checked that the folder's tensors are, by name and shape, those
        the engine was built from (vLLM would only warn about a tensor left unloaded)."""
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
        self.model_runner.reload_weights(weights_path=folder)
        repacked = 0
        for module in self.model_runner.get_model().modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
                repacked += 1
        return repacked
