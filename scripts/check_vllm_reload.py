#!/usr/bin/env python
"""Does vLLM's in-place weight reload give what a fresh engine on the new checkpoint gives? (issue 13)

    .venvs/daemon/bin/python scripts/check_vllm_reload.py [--model DIR] [--output vllm_reload.json] [--eager]

Why it matters: a warm vllm worker could keep its engine across checkpoints and only reload weights
(`LLM.collective_rpc("reload_weights", kwargs={"weights_path": ...})` + `reset_prefix_cache()`, vLLM 0.16), saving
the engine start (10-60 s here, minutes for a large model on a GPU) per checkpoint. The project does that only if
the reloaded engine is the fresh one, number for number. This script measures it on the real model:
checkpoint A (the model), checkpoint B (every weight scaled by 1 + 2% noise), one engine on A, reload B,
teacher-forced log-probabilities of a fixed text, and every parameter's checksum; then a fresh engine on B, the same.
Writes `reload_equals_fresh`, `max_abs_logprob_diff_reload_vs_fresh` (and the same against A), the parameters whose
values differ from the fresh load, and the seconds of the reload and of an engine start.
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
    from evaluator.stages.checkpoint_compat import checkpoint_view

    tmp = tempfile.mkdtemp(prefix="vllm-reload-")
    try:
        a, b = make_checkpoints(args.model, tmp)
        va, vb = checkpoint_view(a), checkpoint_view(b)  # transformers 4.57 reads the 5.x config through a view
        engine = dict(seed=0, max_model_len=1024, dtype="float32", enforce_eager=args.eager)
        t0 = time.perf_counter()
        llm = vllm.LLM(model=va, **engine)
        start_s = time.perf_counter() - t0
        lp_a = logprobs(llm)
        t0 = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": vb})
        llm.reset_prefix_cache()  # KV computed with A's weights must not serve B
        reload_s = time.perf_counter() - t0
        lp_reload, sums_reload = logprobs(llm), llm.collective_rpc(checksums)[0]
        del llm
        import gc
        gc.collect()
        fresh = vllm.LLM(model=vb, **engine)
        lp_fresh, sums_fresh = logprobs(fresh), fresh.collective_rpc(checksums)[0]
        del fresh
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
              "parameters": len(sums_fresh), "parameters_differing_after_reload": differing,
              "reload_s": round(reload_s, 3), "engine_start_s": round(start_s, 3)}
    result["reload_equals_fresh"] = result["max_abs_logprob_diff_reload_vs_fresh"] <= 1e-5 and not differing
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "parameters_differing_after_reload"}, indent=2))
    print(f"parameters differing from a fresh load after the reload: {len(differing)} of {len(sums_fresh)}: "
          f"{differing[:8]}{' ...' if len(differing) > 8 else ''}")
    print(f"-> written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
