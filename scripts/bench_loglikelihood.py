#!/usr/bin/env python
"""Benchmark loglikelihood multiple-choice scoring (`choice_scoring: loglikelihood` of the hf backend).

    python scripts/bench_loglikelihood.py [--model DIR] [--dataset DIR] [--questions 64] [--choices 4]
                                          [--batch-size 32] [--repeats 3] [--chat-template] [--no-float64]
                                          [--output FILE]

Any python can start it: without torch it re-executes itself in .venvs/inference, where lm-evaluation-harness
is installed too. One model load, then three scorers on the same requests, side by side in one process:
- `unbatched`: the rule the hf backend used before batching, one forward per choice (unbatched_choice_logprobs,
  also the reference of tests/test_hf_backend.py);
- `batched`: HFBackend.run() with choice_scoring=loglikelihood and --batch-size;
- `lm_eval`: lm-evaluation-harness's HFLM.loglikelihood on the same model object, the same
  (context, runner.continuation(choice)) requests (" " + choice, or the choice alone under a chat template, as
  lm-eval builds them) and the same batch size (skipped when lm_eval is not importable).
Each is warmed up once, then timed --repeats times; the best run counts (the median is kept too), since a
shared machine is noisy. Picks and log-likelihoods are compared with the unbatched rule and with lm-eval.
Then (unless --no-float64) the model is loaded again in float64 and each scorer runs once more, untimed: float32
sums of many tokens differ in their last bits with the batch shape (lm-eval against the unbatched rule is reported
as that noise floor), so the `float64_*` keys are where identical log-likelihoods are checked.

The model is a tiny random Llama (tests/stage_scripts/make_tiny_lm.py) unless --model names a checkpoint
folder, e.g. .venvs/models/smollm2-135m-instruct. The questions are synthetic (N contexts of 20-120 words,
choices of 1-12 words) unless --dataset names a canonical dataset folder whose test.jsonl rows have `choices`.
Prints a table and writes every number to --output as JSON (speedup_vs_unbatched = unbatched_s / batched_s,
ratio_vs_lm_eval = batched_s / lm_eval_s: below 1 is faster than lm-eval).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

from bench_venv import ensure_torch  # scripts/ is on sys.path (run as a script, or imported by tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a of water light energy plant animal cell earth sun moon rock heat cold force motion sound air "
         "which what why how when scientist student measured observed changed grows falls moves because most "
         "likely best explains result experiment temperature surface layer system mass speed small large "
         "increase decrease cause effect energy food chain river ocean weather cloud rain soil mineral").split()


def progress(msg: str) -> None:
    print(f"[bench-loglikelihood] {msg}", file=sys.stderr, flush=True)


def unbatched_choice_logprobs(runner, sample) -> list:
    """The hf backend's loglikelihood rule before batching: one forward of the whole encoded context+continuation
    per choice, the continuation's tokens being what follows the context's encoding; an empty context is eos."""
    import torch

    from evaluator.stages.inference.backends.text import log_softmax
    context = runner.prompt(sample)
    spaces = len(context) - len(context.rstrip())
    context, moved = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
    ctx_ids = runner.tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in sample.choices:
        whole = runner.tokenizer(context + moved + runner.continuation(choice),
                                 add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx_ids):]
        if not ctx_ids:
            whole, ctx_len = [runner.tokenizer.eos_token_id] + whole, 1
        else:
            ctx_len = len(ctx_ids)
        ids = torch.tensor([whole], device=runner.device)
        with torch.inference_mode():
            logprobs = log_softmax(runner.model(ids).logits[0, :-1])
        target = ids[0, ctx_len:]
        scores.append(float(logprobs[ctx_len - 1:ctx_len - 1 + len(cont)].gather(1, target[:, None]).sum()))
    return scores


def synthetic_samples(n: int, n_choices: int, seed: int = 0) -> list:
    from evaluator.benchmarks.dataset import Sample
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
        question = f"Question: {context.capitalize()}?\nAnswer:"
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n_choices)]
        out.append(Sample(id=f"q{i:04d}", messages=[{"role": "user", "content": question}], choices=choices))
    return out


def fit(samples: list, runner, max_length: int) -> list:
    """Synthetic questions shortened (first words dropped) until their prompt (chat template included) + longest
    choice fit the model, as lm-eval would otherwise cut them from the left and score something else."""
    def too_long(s) -> bool:
        return max(len(runner.tokenizer(runner.prompt(s) + runner.continuation(c))["input_ids"])
                   for c in s.choices) >= max_length

    for s in samples:
        words = s.messages[0]["content"].split(" ")
        while len(words) > 3 and too_long(s):
            words = words[:1] + words[2:]
            s.messages[0]["content"] = " ".join(words)
    return samples


def dataset_samples(root: str, n: int) -> list:
    from evaluator.benchmarks.dataset import Sample
    out = []
    with open(os.path.join(root, "test.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("choices"):
                out.append(Sample(id=str(row["id"]), messages=row["messages"], choices=row["choices"]))
            if len(out) == n:
                break
    if not out:
        raise SystemExit(f"{root}/test.jsonl has no rows with choices")
    return out


def tiny_model(tmp: str) -> str:
    out = os.path.join(tmp, "tiny-llama")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_lm.py"), out,
                    "--arch", "llama", "--chat-template"], check=True, capture_output=True, text=True)
    return out


def timed(scorers: dict, repeats: int) -> dict:
    """{name: (best seconds, median seconds, the last run's scores)}: one untimed warm-up call each, then
    `repeats` rounds that run every scorer once, in alternating order, so a busy spell hits all of them."""
    times = {name: [] for name in scorers}
    scores = {name: fn() for name, fn in scorers.items()}
    for r in range(repeats):
        names = list(scorers) if r % 2 == 0 else list(scorers)[::-1]
        for name in names:
            t0 = time.perf_counter()
            scores[name] = scorers[name]()
            times[name].append(time.perf_counter() - t0)
            progress(f"round {r + 1}/{repeats} {name}: {times[name][-1]:.3f}s")
    return {name: (min(t), statistics.median(t), scores[name]) for name, t in times.items()}


def pick(scores: list) -> int:
    return max(range(len(scores)), key=lambda k: scores[k])  # first best on ties, as numpy argmax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: a tiny random Llama built here)")
    ap.add_argument("--dataset", help="canonical dataset folder whose rows have choices (default: synthetic)")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="choices per forward, for both batched scorers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chat-template", action="store_true", help="render prompts with the checkpoint's template")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-float64", dest="float64", action="store_false",
                    help="skip the float64 pass (the scorers again on the model in float64: exactness, not speed)")
    ap.add_argument("--output", default="bench_loglikelihood.json")
    args = ap.parse_args()
    ensure_torch(__file__)
    sys.path.insert(0, ROOT)
    import torch
    import transformers
    from evaluator.stages.inference.backends.hf import HFBackend
    from evaluator.stages.inference.params import GenerationParams, Progress

    tmp = tempfile.TemporaryDirectory(prefix="bench-ll-")
    model = args.model or tiny_model(tmp.name)
    samples = (dataset_samples(args.dataset, args.questions) if args.dataset
               else synthetic_samples(args.questions, args.choices))
    n_choices = sum(len(s.choices) for s in samples)
    options = {"choice_scoring": "loglikelihood", "batch_size": args.batch_size, "device": args.device,
               "dtype": "float32", "chat_template": args.chat_template}
    backend = HFBackend(model, options, GenerationParams())
    t0 = time.perf_counter()
    info = backend.load()
    progress(f"loaded {model} in {time.perf_counter() - t0:.1f}s: {info}")
    runner = backend.runner
    config = runner.model.config
    max_length = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                       if getattr(config, k, None)), 2048)
    if not args.dataset:
        samples = fit(samples, runner, max_length)
    silent = Progress(len(samples))
    silent.update = lambda n=1: None  # no progress lines inside the timed runs

    def batched_scorer(backend):
        def batched():
            rows = backend.run(samples, "bench", silent)
            bad = [r for r in rows if r.status != "ok"]
            if bad:
                raise SystemExit(f"batched scoring failed: {bad[0].error}")
            return [r.response["choice_logprobs"] for r in rows]
        return batched

    def unbatched():
        return [unbatched_choice_logprobs(runner, s) for s in samples]

    progress(f"{len(samples)} questions, {n_choices} choices, batch size {args.batch_size}, "
             f"torch threads {torch.get_num_threads()}")
    scorers = {"batched": batched_scorer(backend), "unbatched": unbatched}
    lm_eval_version = None
    try:
        from importlib.metadata import version

        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        lm_eval_version = version("lm_eval")
    except ImportError as e:
        progress(f"lm_eval is not importable in {sys.executable} ({e}); its column is skipped")

    def harness_scorer(runner):
        """lm-eval's HFLM.loglikelihood on `runner`'s model object and the same requests."""
        lm = HFLM(pretrained=runner.model, tokenizer=runner.tokenizer, batch_size=args.batch_size,
                  device=args.device)
        requests, owners = [], []
        for q, s in enumerate(samples):
            context = runner.prompt(s)
            for k, choice in enumerate(s.choices):
                requests.append(Instance(request_type="loglikelihood", doc={},
                                         arguments=(context, runner.continuation(choice)), idx=k))
                owners.append(q)

        def harness():
            out = lm.loglikelihood(requests, disable_tqdm=True)
            scores = [[] for _ in samples]
            for q, (logprob, _) in zip(owners, out):
                scores[q].append(logprob)
            return scores
        return harness

    if lm_eval_version is not None:
        scorers["lm_eval"] = harness_scorer(runner)
    results = {name: {"best_s": best, "median_s": median, "scores": scores}
               for name, (best, median, scores) in timed(scorers, args.repeats).items()}

    def compare(a: list, b: list) -> tuple:
        diff = max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
        return diff, sum(pick(sa) == pick(sb) for sa, sb in zip(a, b))

    def relative(a: list, b: list) -> float:
        return max(abs(x - y) / max(abs(y), 1e-12) for sa, sb in zip(a, b) for x, y in zip(sa, sb))

    b_scores, u_scores = results["batched"]["scores"], results["unbatched"]["scores"]
    diff_u, same_u = compare(b_scores, u_scores)
    report = {
        "model": model if args.model else "tiny random Llama (make_tiny_lm.py)",
        "dataset": args.dataset or "synthetic", "questions": len(samples), "choices": n_choices,
        "batch_size": args.batch_size, "chat_template": args.chat_template, "device": args.device,
        "dtype": "float32", "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "python": sys.executable, "torch": torch.__version__, "transformers": transformers.__version__,
        "lm_eval": lm_eval_version, "machine": platform.machine(), "cpus": os.cpu_count(),
        "batched_s": round(results["batched"]["best_s"], 4),
        "batched_median_s": round(results["batched"]["median_s"], 4),
        "unbatched_s": round(results["unbatched"]["best_s"], 4),
        "unbatched_median_s": round(results["unbatched"]["median_s"], 4),
        "speedup_vs_unbatched": round(results["unbatched"]["best_s"] / results["batched"]["best_s"], 3),
        "max_abs_diff_logprob": diff_u, "identical_picks": same_u == len(samples),
        # a float32 sum of magnitude m is exact to about m * 6e-8 (half a unit in the last place)
        "max_rel_diff_logprob": relative(b_scores, u_scores),
        "max_abs_logprob": max(abs(x) for sc in u_scores for x in sc),
        "identical_picks_count": same_u,
    }
    if "lm_eval" in results:
        diff_l, same_l = compare(b_scores, results["lm_eval"]["scores"])
        report.update({
            "lm_eval_s": round(results["lm_eval"]["best_s"], 4),
            "lm_eval_median_s": round(results["lm_eval"]["median_s"], 4),
            "ratio_vs_lm_eval": round(results["batched"]["best_s"] / results["lm_eval"]["best_s"], 3),
            "max_abs_diff_logprob_vs_lm_eval": diff_l, "identical_picks_vs_lm_eval": same_l == len(samples),
            # how far the two references themselves are apart: the float32 noise floor of these sums
            "max_abs_diff_lm_eval_vs_unbatched": compare(results["lm_eval"]["scores"], u_scores)[0],
        })
    if args.float64:
        # the same scorers once more on the model loaded in float64: what is left between them is no longer float32
        # rounding, so a difference here would be a different computation (the 1e-5 target of issue 13)
        progress("float64 pass: batched and unbatched" + (" and lm_eval" if lm_eval_version else ""))
        exact = HFBackend(model, {**options, "dtype": "float64"}, GenerationParams())
        exact.load()
        runner64 = exact.runner
        b64 = batched_scorer(exact)()
        u64 = [unbatched_choice_logprobs(runner64, s) for s in samples]
        diff, same = compare(b64, u64)
        report.update({"float64_max_abs_diff_logprob": diff, "float64_identical_picks": same == len(samples),
                       "float64_identical_picks_vs_float32": compare(b64, b_scores)[1] == len(samples)})
        if lm_eval_version is not None:
            l64 = harness_scorer(runner64)()
            diff, same = compare(b64, l64)
            report.update({"float64_max_abs_diff_logprob_vs_lm_eval": diff,
                           "float64_identical_picks_vs_lm_eval": same == len(samples)})
        exact.close()
    print(f"{'scorer':<10} {'best s':>9} {'median s':>9}")
    for name in ("unbatched", "batched", "lm_eval"):
        if name in results:
            print(f"{name:<10} {results[name]['best_s']:>9.3f} {results[name]['median_s']:>9.3f}")
    print(f"speedup vs unbatched: {report['speedup_vs_unbatched']}x; max |diff| {diff_u:.2e}; "
          f"identical picks {same_u}/{len(samples)}")
    if "lm_eval" in results:
        print(f"batched / lm_eval time: {report['ratio_vs_lm_eval']} (below 1: faster than lm-eval); "
              f"max |diff| {report['max_abs_diff_logprob_vs_lm_eval']:.2e}; "
              f"identical picks {report['identical_picks_vs_lm_eval']}")
    if args.float64:
        print(f"float64: batched vs unbatched max |diff| {report['float64_max_abs_diff_logprob']:.2e}"
              + (f", vs lm_eval {report['float64_max_abs_diff_logprob_vs_lm_eval']:.2e}" if lm_eval_version else ""))
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")
    backend.close()


if __name__ == "__main__":
    main()
