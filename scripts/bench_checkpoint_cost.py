#!/usr/bin/env python
"""Per-checkpoint cost on a real pretrained model (issue 13): one process per stage vs sessions vs warm workers,
beside the limit, in one run.

    .venvs/daemon/bin/python scripts/bench_checkpoint_cost.py [--model DIR] [--checkpoints 4] [--ks 1,3,5]
                                                              [--samples 50] [--output bench_checkpoint_cost.json]
                                                              [--backend hf|vllm] [--vllm-eager]

The model: SmolLM2-135M-Instruct (Q4_1 dequantised), `make real-model` (.venvs/models/smollm2-135m-instruct).
`--checkpoints` copies of it (hardlinked: the same bytes, distinct checkpoint folders) form a Hugging Face run.
K benchmarks are taken in turn from: short-answer generation (exact match, max_new_tokens 8, batch 16) and
loglikelihood multiple choice (4 choices, accuracy), each `--samples` synthetic questions.
For each K, the real daemon (`--once`, local executor) evaluates every checkpoint with
  (a) executor.warm_workers: off         one process per (checkpoint x benchmark) stage, as before issue 13
  (b) executor.warm_workers: checkpoint  one worker per lane for a checkpoint's benchmarks (a session)
  (c) executor.warm_workers: on          workers kept across checkpoints, weights swapped in
and (d) the limit: in one already-warm inference process, one weight read per checkpoint plus the pure
generate/score time of all K benchmarks (scripts/bench_checkpoint_cost.py --limit-worker, in .venvs/inference).
Reported per checkpoint: the whole run's wall / checkpoints (every process and worker start counted), and the
steady state (the time between the first and the last checkpoint's last recorded result / (checkpoints - 1): what
each further checkpoint costs a daemon that is already up). `speedup_k<K>` = (a)/(c) on whole runs,
`speedup_k<K>_steady` the same in steady state, `speedup_bound_k<K>` = (a)/(d) (the most any (c) could reach),
`limit_ratio_k<K>` = (c) steady / (d), `limit_ratio_k<K>_whole_run` = (c) whole run / (d); and whether (a), (b),
(c) made identical predictions and metrics. Goals (issue 13): speedup_k5 >= 3, limit_ratio_k5 <= 1.15, (c) no
slower than (a) at K=1. Every number is measured in this run; nothing is filled in.

`--backend vllm` measures the same with real vLLM (.venvs/inference-vllm-cpu, `make setup-vllm-cpu`: its CPU
build; default output bench_checkpoint_cost_vllm.json): K short-answer generation benchmarks (vLLM generates only),
the engine's default torch.compile warm-up unless --vllm-eager, a 1 GiB KV cache, `weight_reload: true`. There
(b) pays one engine start per checkpoint, and (c) one engine for the run, each next checkpoint's weights reloaded
into it in place (verified equal to a fresh engine: scripts/check_vllm_reload.py); (d) is one read of the weight
file + the work in an engine built once.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON_PY = os.path.join(ROOT, ".venvs", "daemon", "bin", "python")
INFERENCE_PY = os.path.join(ROOT, ".venvs", "inference", "bin", "python")
VLLM_VENV = os.path.join(ROOT, ".venvs", "inference-vllm-cpu")
DEFAULT_MODEL = os.path.join(ROOT, ".venvs", "models", "smollm2-135m-instruct")
MODES = {"a": "off", "b": "checkpoint", "c": "on"}


# ---- data --------------------------------------------------------------------------------------------------
def write_dataset(root: str, kind: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        if kind == "qa":
            rows.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {a} plus {b}? "
                                                                                 "Answer with a number."}],
                         "target": str(a + b)})
        else:
            answer = a + b
            choices = [str(answer), str(answer + 1), str(answer - 2), str(answer + 10)]
            rng.shuffle(choices)
            rows.append({"id": f"m{i}", "messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                         "choices": choices, "target": str(answer)})
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump({"dataset_id": f"bench-{kind}-{seed}", "metrics": ["exact_match"] if kind == "qa" else ["accuracy"]},
                  f)
    return root


def benchmarks(tmp: str, k: int, n: int, backend: str = "hf", engine: dict | None = None) -> list[dict]:
    out = []
    for i in range(k):
        kind = "qa" if i % 2 == 0 or backend == "vllm" else "mc"
        data = write_dataset(os.path.join(tmp, "data", f"{kind}{i}"), kind, n, seed=i)
        b = {"name": f"{kind}{i}", "type": "dataset", "dataset": data, "batch_size": 16}
        if backend == "vllm":  # one vLLM call per benchmark (it batches inside); the same engine options for all
            # weight_reload: (c)'s warm worker keeps its engine across checkpoints; (a) and (b) start one per checkpoint
            b.update(backend="vllm", batch_size=256, backend_options={**(engine or {}), "weight_reload": True})
        if kind == "qa":
            b["generation"] = {"max_new_tokens": 8}
        else:
            b["backend_options"] = {"choice_scoring": "loglikelihood"}
        out.append(b)
    return out


def make_run(model: str, root: str, checkpoints: int) -> list[str]:
    paths = []
    for i in range(checkpoints):
        dest = os.path.join(root, f"checkpoint-{(i + 1) * 100}")
        shutil.copytree(model, dest, copy_function=os.link, ignore=shutil.ignore_patterns("SOURCE.md", ".*"))
        with open(os.path.join(dest, "trainer_state.json"), "w") as f:
            json.dump({"global_step": (i + 1) * 100}, f)
        paths.append(dest)
    return paths


# ---- (a) (b) (c): the daemon ---------------------------------------------------------------------------------
def run_daemon(tmp: str, run_root: str, benches: list[dict], mode: str, inference_venv: str | None = None
               ) -> tuple[float, dict]:
    import yaml

    cache = os.path.join(tmp, f"cache-{mode}")
    cfg = {"auto_eval": {"project_name": "bench", "model_name": "smollm2", "cache_dir": cache,
                         "watch": {"paths": [run_root], "layout": "huggingface", "iteration_interval": 100,
                                   "settle_seconds": 0.2, "snapshot": "none"},
                         "executor": {"warm_workers": mode, "gpus": []}, "benchmarks": benches}}
    if inference_venv:
        cfg["auto_eval"]["envs"] = {"inference": inference_venv}
    path = os.path.join(tmp, f"cfg-{mode}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.perf_counter()
    proc = subprocess.run([DAEMON_PY, os.path.join(ROOT, "tools", "evaluator.py"), "--config", path, "--once"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"daemon ({mode}) exit {proc.returncode}: {proc.stderr[-2000:]}")
    outputs = {}
    import sqlite3
    db = sqlite3.connect(os.path.join(cache, "ledger.sqlite3"))
    done = sorted(t for (t,) in db.execute(
        "SELECT MAX(ts) FROM events WHERE to_state='recorded' GROUP BY iteration"))
    db.close()
    # steady state: between the first and the last checkpoint's last result (one-time starts excluded)
    steady = (done[-1] - done[0]) / (len(done) - 1) if len(done) > 1 else None
    outputs["_steady_s"] = steady
    results = os.path.join(cache, "results", "smollm2")
    for it_dir in sorted(os.listdir(results)):
        if not it_dir.startswith("iter_"):
            continue
        for bench in sorted(os.listdir(os.path.join(results, it_dir))):
            d = os.path.join(results, it_dir, bench)
            with open(os.path.join(d, "predictions.jsonl")) as f:
                texts = [json.loads(line)["response"]["text"] for line in f]
            with open(os.path.join(d, "metrics.json")) as f:
                metrics = json.load(f)["metrics"]
            outputs[f"{it_dir}/{bench}"] = {"texts": texts, "metrics": metrics}
    return wall, outputs


# ---- (d): the limit, in one warm inference process -------------------------------------------------------------
def limit_worker(spec_path: str) -> None:
    """Runs in .venvs/inference: warm up once, then per checkpoint one weight read + the pure work of K benchmarks."""
    sys.path.insert(0, ROOT)
    from evaluator.benchmarks.registry import load_benchmark
    from evaluator.stages.inference.backends import backend_class
    from evaluator.stages.inference.params import GenerationParams, Progress
    from safetensors.torch import load_file

    with open(spec_path) as f:
        spec = json.load(f)
    backend = spec.get("backend", "hf")
    cls = backend_class(backend)
    benches = spec["benchmarks"]
    datasets = [load_benchmark("dataset", b["dataset"]) for b in benches]

    def params_of(b):
        return GenerationParams.from_dict(b.get("generation"), "generation", backend=backend)

    def options_of(b):
        return {**b.get("backend_options", {}), "batch_size": b["batch_size"]}

    warm = cls(spec["checkpoints"][0], options_of(benches[0]), params_of(benches[0]), 0)
    warm.load()  # imports, tokenizer, skeleton (vllm: the engine): paid once, outside the measurement
    warm.run(datasets[0].samples[:2], "warmup", Progress(2))
    per_checkpoint = []
    for ckpt in spec["checkpoints"]:
        t0 = time.perf_counter()
        if backend == "vllm":  # the one weight read (what (c) reloads in place, vllm_reload.py)
            with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
                while f.read(1 << 24):
                    pass
        else:
            state = load_file(os.path.join(ckpt, "model.safetensors"))  # the one weight read
            warm.runner.model.load_state_dict(state, strict=False)  # lm_head is tied: not in the file
        read_s = time.perf_counter() - t0
        work = 0.0
        for b, ds in zip(benches, datasets):
            warm.reconfigure(params_of(b), options_of(b))  # what a warm worker does between benchmarks
            t1 = time.perf_counter()
            warm.run(ds.samples, ds.dataset_id, Progress(len(ds.samples)))
            work += time.perf_counter() - t1
        per_checkpoint.append({"read_s": read_s, "work_s": work, "total_s": read_s + work})
    print(json.dumps(per_checkpoint))
    warm.close()


def measure_limit(tmp: str, checkpoints: list[str], benches: list[dict], backend: str = "hf") -> dict:
    spec = os.path.join(tmp, "limit.json")
    with open(spec, "w") as f:
        json.dump({"checkpoints": checkpoints, "benchmarks": benches, "backend": backend}, f)
    python = os.path.join(VLLM_VENV, "bin", "python") if backend == "vllm" else INFERENCE_PY
    proc = subprocess.run([python, os.path.abspath(__file__), "--limit-worker", spec], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"limit worker exit {proc.returncode}: {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"per_checkpoint_s": sum(r["total_s"] for r in rows) / len(rows),
            "weight_read_s": sum(r["read_s"] for r in rows) / len(rows),
            "work_s": sum(r["work_s"] for r in rows) / len(rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--ks", default="1,3,5")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--output", help="default: bench_checkpoint_cost.json (hf), bench_checkpoint_cost_vllm.json")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--vllm-eager", action="store_true", help="vllm: enforce_eager (no torch.compile warm-up)")
    p.add_argument("--limit-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.limit_worker:
        limit_worker(args.limit_worker)
        return 0
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"no model at {args.model}: run `make real-model` first", file=sys.stderr)
        return 2
    vllm = args.backend == "vllm"
    if vllm and not os.path.isfile(os.path.join(VLLM_VENV, "bin", "python")):
        print(f"no vLLM venv at {VLLM_VENV}: run `make setup-vllm-cpu` first", file=sys.stderr)
        return 2
    args.output = args.output or os.path.join(ROOT, "bench_checkpoint_cost_vllm.json" if vllm
                                              else "bench_checkpoint_cost.json")
    engine = {"max_model_len": 1024, **({"enforce_eager": True} if args.vllm_eager else {})} if vllm else None
    if vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the daemon and its stages inherit it
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 dequantised)", "backend": args.backend,
              "engine_options": engine, "checkpoints": args.checkpoints,
              "samples_per_benchmark": args.samples, "device": "cpu", "cpus": os.cpu_count(), "k": {}}
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_cost_") as tmp:
        run_root = os.path.join(tmp, "run")
        checkpoints = make_run(args.model, run_root, args.checkpoints)
        for k in [int(x) for x in args.ks.split(",")]:
            benches = benchmarks(tmp, k, args.samples, args.backend, engine)
            row, outputs = {}, {}
            for label, mode in MODES.items():
                wall, outputs[label] = run_daemon(tmp, run_root, benches, mode, VLLM_VENV if vllm else None)
                steady = outputs[label].pop("_steady_s")
                row[f"{label}_{mode}_per_checkpoint_s"] = round(wall / args.checkpoints, 2)
                row[f"{label}_{mode}_steady_per_checkpoint_s"] = round(steady, 2) if steady else None
                print(f"K={k} ({label}) warm_workers={mode}: {wall:.1f} s, {wall / args.checkpoints:.1f} s per "
                      f"checkpoint", flush=True)
            limit = measure_limit(tmp, checkpoints, benches, args.backend)
            row["d_limit_per_checkpoint_s"] = round(limit["per_checkpoint_s"], 2)
            row["d_weight_read_s"] = round(limit["weight_read_s"], 3)
            row["d_work_s"] = round(limit["work_s"], 2)
            a, c = row["a_off_per_checkpoint_s"], row["c_on_per_checkpoint_s"]
            row[f"speedup_k{k}"] = round(a / c, 2)  # whole runs: every start counted
            # the most any (c) could reach: (a) over the limit itself
            row[f"speedup_bound_k{k}"] = round(a / limit["per_checkpoint_s"], 2)
            row[f"limit_ratio_k{k}_whole_run"] = round(c / limit["per_checkpoint_s"], 2)
            steady_c = row["c_on_steady_per_checkpoint_s"]
            # a daemon runs for weeks: what each further checkpoint costs once the workers are up
            row[f"limit_ratio_k{k}"] = round(steady_c / limit["per_checkpoint_s"], 2) if steady_c else None
            steady_a = row["a_off_steady_per_checkpoint_s"]
            row[f"speedup_k{k}_steady"] = round(steady_a / steady_c, 2) if steady_a and steady_c else None
            row["identical_outputs_a_b_c"] = outputs["a"] == outputs["b"] == outputs["c"]
            print(f"K={k}: (d) limit {limit['per_checkpoint_s']:.1f} s per checkpoint; speedup (a)/(c) "
                  f"{row[f'speedup_k{k}']}x (steady {row[f'speedup_k{k}_steady']}x, at most (a)/(d) "
                  f"{row[f'speedup_bound_k{k}']}x); (c)/(d) steady "
                  f"{row[f'limit_ratio_k{k}']}, whole run {row[f'limit_ratio_k{k}_whole_run']}; identical outputs: "
                  f"{row['identical_outputs_a_b_c']}", flush=True)
            result["k"][str(k)] = row
            for key in (f"speedup_k{k}", f"speedup_k{k}_steady", f"speedup_bound_k{k}", f"limit_ratio_k{k}",
                        f"limit_ratio_k{k}_whole_run"):
                result[key] = row[key]
            for cleanup in ("off", "checkpoint", "on"):
                shutil.rmtree(os.path.join(tmp, f"cache-{cleanup}"), ignore_errors=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("speedup", "limit"))}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
