#!/usr/bin/env python
"""Does vLLM's in-place weight reload give what a fresh engine on the new checkpoint gives? (issue 13)

    .venvs/daemon/bin/python scripts/check_vllm_reload.py [--model DIR] [--output vllm_reload.json] [--eager]

Why it matters: a warm vllm worker with `weight_reload: true` keeps its engine across checkpoints and only reloads
the weights (evaluator/stages/inference/backends/vllm.py `swap`: vLLM 0.16's `reload_weights` through a worker
extension, vllm_reload.py, then `reset_prefix_cache()`), saving the engine start (10-60 s here, minutes for a large
model on a GPU) per checkpoint. That is right only if the reloaded engine is the fresh one, number for number. This
script measures exactly the backend's path on the real model: checkpoint A (the model), checkpoint B (every weight
scaled by 1 + 2% noise); an engine on A, swap to B, teacher-forced log-probabilities of a fixed text and every
parameter's checksum (on the CPU build a linear layer keeps only its packed copy, so its parameter is empty and its
checksum says nothing: the log-probabilities are the test); swap back to A (must give the first engine's numbers);
then a fresh engine on B, the same. Writes `reload_equals_fresh` (true only when every difference is <= 1e-5),
`max_abs_logprob_diff_reload_vs_fresh`, `max_abs_logprob_diff_reloaded_back_vs_first_engine` (and the differences
against A, which show the checkpoints do differ), the parameters whose checksums differ from the fresh load, and
the seconds of the reload and of an engine start. Run it on a GPU before turning `weight_reload` on there.
Measured on vLLM 0.16's CPU build: vLLM's reload_weights alone was 0.59 nats off a fresh engine (a tied lm_head kept
its packed copy of the old embedding); with vllm_reload.py's repair the difference is 0.0, compiled and eager.
Runs in a vLLM venv (started by another python, it re-executes itself in .venvs/inference-vllm-cpu, the CPU build:
`make setup-vllm-cpu`); VLLM_CPU_KVCACHE_SPACE defaults to 1 (GiB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, ".venvs", "inference-vllm-cpu", "bin", "python")
sys.path.insert(0, ROOT)
DEFAULT_MODEL = os.path.join(ROOT, ".venvs", "models", "smollm2-135m-instruct")
TEXT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "The capital of France is Paris. It is known for the Eiffel Tower and its museums.")


def make_checkpoints(model: str, tmp: str) -> tuple[str, str]:
    import torch
    from safetensors.torch import load_file, save_file
    out = []
    for name, noise in (("A", 0.0), ("B", 0.02)):
        dest = os.path.join(tmp, name)
        shutil.copytree(model, dest, ignore=shutil.ignore_patterns("model.safetensors", "SOURCE.md", ".*"))
        tensors = load_file(os.path.join(model, "model.safetensors"))
        if noise:
            g = torch.Generator().manual_seed(1)
            tensors = {k: (v * (1 + noise * torch.randn(v.shape, generator=g))).contiguous()
                       for k, v in tensors.items()}
        save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
        out.append(dest)
    return out[0], out[1]


def logprobs(llm) -> list[float]:
    import vllm
    out = llm.generate([TEXT], vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]


def checksums(worker) -> dict:
    """Runs in the engine's worker (collective_rpc): every parameter's float64 sum."""
    return {name: float(p.detach().double().sum()) for name, p in worker.model_runner.model.named_parameters()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--output", default="vllm_reload.json")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    args = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:  # started by another python (make bench: the daemon venv's): run in the vLLM venv
        if not os.path.isfile(VLLM_PY):
            print(f"no vLLM here and no {VLLM_PY}: run `make setup-vllm-cpu` first", file=sys.stderr)
            return 2
        os.execv(VLLM_PY, [VLLM_PY, os.path.abspath(__file__), *sys.argv[1:]])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(checksums): a local function
    import vllm
    from evaluator.stages.inference.backends.vllm import VLLMBackend
    from evaluator.stages.inference.params import GenerationParams

    tmp = tempfile.mkdtemp(prefix="vllm-reload-")
    try:
        a, b = make_checkpoints(args.model, tmp)
        engine = dict(max_model_len=1024, dtype="float32", enforce_eager=args.eager)
        t0 = time.perf_counter()
        backend = VLLMBackend(a, {**engine, "weight_reload": True}, GenerationParams(), seed=0)
        backend.load()  # the engine on A, as a warm worker builds it
        start_s = time.perf_counter() - t0
        lp_a = logprobs(backend.llm)
        t0 = time.perf_counter()
        swapped = backend.swap(b)  # the warm worker's path: B's weights reloaded in place
        reload_s = time.perf_counter() - t0
        lp_reload, sums_reload = logprobs(backend.llm), backend.llm.collective_rpc(checksums)[0]
        swapped_back = backend.swap(a)
        lp_back = logprobs(backend.llm)
        backend.close()
        import gc
        gc.collect()
        fresh = VLLMBackend(b, engine, GenerationParams(), seed=0)
        fresh.load()
        lp_fresh, sums_fresh = logprobs(fresh.llm), fresh.llm.collective_rpc(checksums)[0]
        fresh.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def diff(x, y):
        return max(abs(p - q) for p, q in zip(x, y))

    differing = sorted(n for n in sums_fresh if abs(sums_fresh[n] - sums_reload.get(n, float("nan"))) > 1e-6
                       or n not in sums_reload)
    from vllm.platforms import current_platform
    result = {"vllm": vllm.__version__, "device": str(current_platform.device_type), "model": args.model,
              "enforce_eager": args.eager, "tokens_scored": len(lp_fresh),
              "max_abs_logprob_diff_reload_vs_fresh": diff(lp_reload, lp_fresh),
              "max_abs_logprob_diff_reload_vs_old_checkpoint": diff(lp_reload, lp_a),
              "max_abs_logprob_diff_fresh_vs_old_checkpoint": diff(lp_fresh, lp_a),
              "max_abs_logprob_diff_reloaded_back_vs_first_engine": diff(lp_back, lp_a),
              "swapped": swapped, "swapped_back": swapped_back,
              "parameters": len(sums_fresh), "parameters_differing_after_reload": differing,
              "reload_s": round(reload_s, 3), "engine_start_s": round(start_s, 3)}
    result["reload_equals_fresh"] = (swapped and swapped_back and not differing
                                     and result["max_abs_logprob_diff_reload_vs_fresh"] <= 1e-5
                                     and result["max_abs_logprob_diff_reloaded_back_vs_first_engine"] <= 1e-5)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "parameters_differing_after_reload"}, indent=2))
    print(f"parameters differing from a fresh load after the reload: {len(differing)} of {len(sums_fresh)}: "
          f"{differing[:8]}{' ...' if len(differing) > 8 else ''}")
    print(f"-> written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
