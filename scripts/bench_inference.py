#!/usr/bin/env python
"""Benchmark the hf inference backend: batched generation vs a per-sample loop (batch_size 1).

    python scripts/bench_inference.py [--output FILE] [--samples 64] [--batch-size 16] [--audio]

Any python can start it: without torch it re-executes itself in .venvs/inference. It builds a tiny
random Llama with a chat template (tests/stage_scripts/make_tiny_lm.py) and a dataset of N prompts of mixed
lengths, then times HFBackend.run() on the same samples twice in one process: batched (--batch-size) and one
sample at a time. Every sample generates exactly --new-tokens tokens (min_new_tokens = max_new_tokens), so
both runs do the same work and an early end token cannot flatter either. A warm-up run comes first; each
setting is timed --repeats times and the best run counts (the median is kept too), since a shared machine is
noisy. Both runs must produce identical texts (greedy) on the text model; the script fails otherwise. With
CUDA it repeats both on the GPU. --audio adds the same comparison on a tiny Qwen2-Audio checkpoint and N
synthetic 1-3 s clips.
Prints a table and writes every number to --output as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from bench_venv import ensure_torch  # scripts/ is on sys.path (run as a script, or imported by tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "Hi", "What is two plus two?", "Tell me a story about a fox and a dog that bark at night under the blue sky.",
    "The cat sat on the mat.", "one two three four five six seven eight nine ten eleven twelve",
    "Describe the sound.", "Question: what colour is the sea? Answer:", "(A) red (B) blue (C) green",
    "A dog barks at night. The cat sat on the mat. The sky is blue. Grass is green. Hello, how are you today?",
]


def progress(msg: str) -> None:
    print(f"[bench-inference] {msg}", file=sys.stderr, flush=True)


def text_samples(n: int) -> list:
    from evaluator.benchmarks.dataset import Sample
    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)] + (" again" * (i % 5))  # lengths vary within a batch
        out.append(Sample(id=f"t{i:03d}", messages=[{"role": "user", "content": prompt}]))
    return out


def audio_samples(n: int, root: str) -> list:
    import numpy as np
    import soundfile
    from evaluator.benchmarks.dataset import Sample
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        seconds = 1.0 + 2.0 * (i % 7) / 6
        t = np.arange(int(16000 * seconds)) / 16000
        path = os.path.join(root, f"clip{i:03d}.wav")
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)).astype(np.float32), 16000)
        out.append(Sample(id=f"a{i:03d}", messages=[{"role": "user", "content": [
            {"type": "audio", "path": path}, {"type": "text", "text": "What do you hear?"}]}]))
    return out


def timed_run(model: str, samples: list, batch_size: int, device: str, new_tokens: int, repeats: int) -> dict:
    from evaluator.stages.inference.backends.hf import HFBackend
    from evaluator.stages.inference.params import GenerationParams, Progress
    params = GenerationParams.from_dict({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    backend = HFBackend(model, {"batch_size": batch_size, "device": device}, params, seed=0)
    backend.load()
    quiet = Progress(10 ** 9, every=1e9, out=open(os.devnull, "w"))
    backend.run(samples[:batch_size], "bench", quiet)  # warm-up: first-call allocations, kernels
    times = []
    for _ in range(repeats):  # a shared machine is noisy: report the best and the median of a few runs
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = backend.run(samples, "bench", quiet)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    backend.close()
    bad = [r.sample_id for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} samples failed in the batch_size={batch_size} run: {bad[:5]}")
    tokens = sum(r.response["usage"]["completion_tokens"] for r in results)
    median = sorted(times)[len(times) // 2]
    return {"batch_size": batch_size, "seconds": round(seconds, 4), "median_seconds": round(median, 4),
            "repeats": repeats, "samples_per_s": round(len(samples) / seconds, 3),
            "completion_tokens_per_s": round(tokens / seconds, 1), "texts": [r.text for r in results]}


def compare(name: str, model: str, samples: list, batch_size: int, device: str, new_tokens: int,
            repeats: int) -> dict:
    progress(f"{name} on {device}: batched (batch_size {batch_size})")
    batched = timed_run(model, samples, batch_size, device, new_tokens, repeats)
    progress(f"{name} on {device}: per-sample loop (batch_size 1)")
    single = timed_run(model, samples, 1, device, new_tokens, repeats)
    same = batched.pop("texts") == single.pop("texts")
    if not same and name == "text":
        raise SystemExit("batched and per-sample greedy outputs differ on the text model")
    return {"model": name, "device": device, "samples": len(samples), "new_tokens_per_sample": new_tokens,
            "batched": batched, "per_sample": single, "identical_outputs": same,
            "speedup": round(batched["samples_per_s"] / single["samples_per_s"], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", help="write the figures here as JSON")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best counts")
    ap.add_argument("--audio", action="store_true", help="also a tiny Qwen2-Audio checkpoint on synthetic clips")
    args = ap.parse_args()
    ensure_torch(__file__)
    sys.path.insert(0, ROOT)
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        model = os.path.join(tmp, "llama")
        progress("building a tiny random Llama with a chat template")
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_lm.py"), model,
                        "--arch", "llama", "--chat-template"], check=True, capture_output=True)
        samples = text_samples(args.samples)
        for device in devices:
            runs.append(compare("text", model, samples, args.batch_size, device, args.new_tokens, args.repeats))
        if args.audio:
            audio_model = os.path.join(tmp, "qwen2_audio")
            progress("building a tiny random Qwen2-Audio")
            subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_audio_models.py"),
                            audio_model, "qwen2_audio"], check=True, capture_output=True)
            clips = audio_samples(args.samples, tmp)
            for device in devices:
                runs.append(compare("qwen2_audio", audio_model, clips, args.batch_size, device, args.new_tokens,
                                    args.repeats))
    report = {"benchmark": "hf backend: batched generate vs per-sample loop", "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "cpu_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": runs}
    print(f"{'model':12s} {'device':6s} {'n':>4s} {'batched/s':>10s} {'loop/s':>8s} {'speedup':>8s} identical")
    for r in runs:
        print(f"{r['model']:12s} {r['device']:6s} {r['samples']:4d} {r['batched']['samples_per_s']:10.2f} "
              f"{r['per_sample']['samples_per_s']:8.2f} {r['speedup']:7.2f}x {r['identical_outputs']}")
    if not torch.cuda.is_available():
        print("(no CUDA here: GPU figures not measured)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
