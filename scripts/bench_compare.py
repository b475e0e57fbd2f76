#!/usr/bin/env python
"""The cost of comparing a scored checkpoint with the previous and the best one (docs/insight.md).

    .venvs/daemon/bin/python scripts/bench_compare.py [--output bench_compare.json] [--quick]
        [--sizes 500,2000,10000] [--repeats 3]

For each n, three text-qa results of n samples, written by the real evaluation stage (evaluator/stages/evaluation,
run in-process as tests/test_scores.py does: scores.jsonl, then metrics.json, beside the predictions.jsonl it
scored), each with exact_match (0/1: exact McNemar) and token_f1 (continuous: seeded paired bootstrap,
DEFAULT_RESAMPLES resamples). Every answer is four words; a wrong prediction repeats q = i % 4 of them, so its
token_f1 is q/4. What is planted:
  best   the run's best checkpoint: exact_match 0.60
  new    the result just scored: 10 points below best net (5 % of the samples fixed, 15 % broken)
  prev   the previous checkpoint: as good as new (5 % of the samples flip each way, matched in q, so both metrics'
         deltas are 0): the comparison vs prev must find nothing, the one vs best a significant drop

Figures (seconds, median of --repeats; the repeats interleave the figures, so each ratio is measured side by side):
  read_n{n}_s              read_scored_result of one folder (scores.jsonl, metrics.json, predictions.jsonl)
  mcnemar_n{n}_s           paired.compare_values on exact_match's paired values (exact McNemar + Newcombe CI)
  bootstrap_n{n}_s         paired.compare_values on token_f1's paired values (the paired bootstrap)
  compare_n{n}_s           one comparison end to end: compare_dirs(new, best) (both folders read, both tests, flips)
  per_checkpoint_n{n}_s    the daemon's overhead per scored result: insight.write_comparison, what its comparison
                           thread runs: compare_document vs prev and vs best (two comparisons, the new folder read
                           once) and compare.json written
  bootstrap_share_n{n}     bootstrap_n{n}_s / compare_n{n}_s: the part of a comparison the bootstrap takes
  compare_s_per_1k_samples         compare_n{N}_s / (N / 1000) at the largest n measured (N: per_1k_from_n)
  per_checkpoint_s_per_1k_samples  per_checkpoint_n{N}_s / (N / 1000), the same N
Checks (the timed comparisons found what was planted), from the compare.json the last repeat wrote:
  checks.n{n}.vs_prev / vs_best: {metric: {delta, p, method, significant, fixed, broken}}; checks_ok: every
  vs_best metric significant and no vs_prev metric significant (the script exits 1 when not).
`measurements` holds the timing figures as {value, unit, notes} rows for scripts/bench_all.py's table. Files are read
from the page cache (the daemon compares a result it has just written). Temp files live under /tmp and are removed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluator.benchmarks.registry import load_benchmark  # noqa: E402
from evaluator.common.compare import compare_dirs, read_scored_result  # noqa: E402
from evaluator.common.contracts import COMPARE, StageJob  # noqa: E402
from evaluator.common.paired import BOOTSTRAP, DEFAULT_RESAMPLES, MCNEMAR, compare_values  # noqa: E402
from evaluator.common.atomic import write_json_atomic  # noqa: E402
from evaluator.common.records import RunResult, write_results  # noqa: E402
from evaluator.daemon.insight import write_comparison  # noqa: E402
from evaluator.stages.evaluation import stage as evaluation_stage  # noqa: E402

RUN, BENCHMARK = "bench", "qa"
BINARY, CONTINUOUS = "exact_match", "token_f1"
BEST_ACCURACY, DROP, NOISE = 0.60, 0.10, 0.05  # fractions of n (see the docstring)
ITERATIONS = {"best": 1000, "prev": 2000, "new": 3000}
STARTED = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench_compare {time.monotonic() - STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- the planted results ----------------------------------------------------------------------------------
def answer(i: int) -> str:
    return f"alpha{i} bravo{i} charlie{i} delta{i}"


def prediction(i: int, correct: bool) -> str:
    """The answer itself, or q = i % 4 of its words and 4 - q wrong ones (token_f1 q/4, exact_match 0)."""
    if correct:
        return answer(i)
    words = answer(i).split()
    q = i % 4
    return " ".join(words[:q] + [f"wrong{k}" for k in range(4 - q)])


def planted_correctness(n: int, seed: int) -> dict[str, list[bool]]:
    """Which samples each checkpoint answers exactly (see the docstring): best, new (10 points lower net), prev
    (new with matched swaps: as many fixed as broken, pairwise of equal q, so both deltas vs new are 0)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    best = [False] * n
    for i in order[:round(BEST_ACCURACY * n)]:
        best[i] = True
    ones = [i for i in order if best[i]]
    zeros = [i for i in order if not best[i]]
    noise, net = round(NOISE * n), round(DROP * n)
    new = list(best)
    for i in ones[:noise + net]:
        new[i] = False
    for i in zeros[:noise]:
        new[i] = True
    prev = list(new)
    swaps = 0
    for q in range(4):  # pair a sample new answers with one it misses, of the same q: their token_f1 moves cancel
        right = [i for i in order if new[i] and i % 4 == q]
        wrong = [i for i in order if not new[i] and i % 4 == q]
        for a, b in zip(right, wrong):
            if swaps >= noise:
                break
            prev[a], prev[b] = False, True
            swaps += 1
    if swaps < noise:
        raise RuntimeError(f"n={n}: only {swaps} matched swaps for prev, {noise} wanted")
    return {"best": best, "prev": prev, "new": new}


def make_results(root: str, n: int, seed: int) -> dict[str, str]:
    """A text-qa dataset of n rows and, per checkpoint, its predictions.jsonl scored by the real evaluation stage;
    returns {checkpoint: result folder}."""
    os.makedirs(root)
    data = os.path.join(root, "qa.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"question": f"What are the four words of item {i}?", "answer": answer(i)}) + "\n"
                     for i in range(n))
    dataset = load_benchmark("text-qa", data, {})
    if len(dataset.samples) != n:
        raise RuntimeError(f"{data}: {len(dataset.samples)} samples loaded, {n} written")
    folders = {}
    for name, correct in planted_correctness(n, seed).items():
        out = os.path.join(root, "results", RUN, f"iter_{ITERATIONS[name]:07d}", BENCHMARK)
        os.makedirs(out)
        write_results(os.path.join(out, "predictions.jsonl"), [
            RunResult(sample_id=s.id, dataset_id=dataset.dataset_id, backend="hf", run_config={},
                      request_messages=s.messages, response={"text": prediction(i, correct[i]), "usage": {}})
            for i, s in enumerate(dataset.samples)])
        job = StageJob(stage="evaluation", run=RUN, iteration=ITERATIONS[name], checkpoint=f"/ckpt/{name}",
                       output_dir=out, benchmark={"name": BENCHMARK, "type": "text-qa", "dataset": data,
                                                  "metrics": [BINARY, CONTINUOUS]})
        code = evaluation_stage.run(job)
        if code != 0:
            raise RuntimeError(f"evaluation stage exited {code} for {out}")
        folders[name] = out
    return folders


# ---- timing -------------------------------------------------------------------------------------------------
def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn(*args, **kw)
    return time.perf_counter() - t0, value


def paired_values(new, old, metric: str) -> tuple[list[float], list[float]]:
    """The (old, new) values of `metric` on the samples both scored, as compare_results pairs them."""
    pairs = [(old.rows[sid]["scores"][metric], new.rows[sid]["scores"][metric]) for sid in new.rows if sid in old.rows]
    return [a for a, _ in pairs], [b for _, b in pairs]


def measure(folders: dict[str, str], repeats: int) -> tuple[dict, dict]:
    """{figure: median seconds} and the checks for one n; the figures interleave in every repeat."""
    new, best = read_scored_result(folders["new"]), read_scored_result(folders["best"])
    em_old, em_new = paired_values(new, best, BINARY)
    f1_old, f1_new = paired_values(new, best, CONTINUOUS)
    times: dict[str, list[float]] = {k: [] for k in ("read", "mcnemar", "bootstrap", "compare", "per_checkpoint")}
    doc: dict = {}
    for _ in range(repeats):
        times["read"].append(timed(read_scored_result, folders["new"])[0])
        seconds, entry = timed(compare_values, em_old, em_new)
        if entry["method"] != MCNEMAR:
            raise RuntimeError(f"{BINARY}: compared by {entry['method']}, expected {MCNEMAR}")
        times["mcnemar"].append(seconds)
        seconds, entry = timed(compare_values, f1_old, f1_new)
        if entry["method"] != BOOTSTRAP:
            raise RuntimeError(f"{CONTINUOUS}: compared by {entry['method']}, expected {BOOTSTRAP}")
        times["bootstrap"].append(seconds)
        times["compare"].append(timed(compare_dirs, folders["new"], folders["best"])[0])
        seconds, doc = timed(write_comparison, RUN, BENCHMARK, ITERATIONS["new"], 0, folders["new"],
                             (RUN, ITERATIONS["prev"], folders["prev"]), (RUN, ITERATIONS["best"], folders["best"]),
                             None)
        times["per_checkpoint"].append(seconds)
    with open(os.path.join(folders["new"], COMPARE)) as f:
        written = json.load(f)
    if written != json.loads(json.dumps(doc)):
        raise RuntimeError(f"{folders['new']}/{COMPARE}: not the document write_comparison returned")
    checks = {which: {metric: {k: entry[k] for k in ("delta", "p", "method", "significant", "fixed", "broken")}
                      for metric, entry in written["against"][which]["metrics"].items()}
              for which in ("prev", "best")}
    return {k: statistics.median(v) for k, v in times.items()}, {f"vs_{k}": v for k, v in checks.items()}


def checks_hold(checks: dict) -> bool:
    """Planted: a significant drop of both metrics vs best; nothing vs prev."""
    return (all(m["significant"] and m["delta"] < 0 for m in checks["vs_best"].values())
            and not any(m["significant"] for m in checks["vs_prev"].values())
            and set(checks["vs_best"]) == set(checks["vs_prev"]) == {BINARY, CONTINUOUS})


def report(sizes: list[int], doc: dict) -> str:
    head = (f"{'n':>6} {'read_s':>8} {'mcnemar_s':>10} {'bootstrap_s':>12} {'compare_s':>10} {'per_ckpt_s':>11} "
            f"{'boot share':>10}  p vs prev (em, f1)   p vs best (em, f1)")
    lines = [head, "-" * len(head)]
    for n in sizes:
        c = doc["checks"][f"n{n}"]
        p = {w: f"{c[w][BINARY]['p']:.2g}, {c[w][CONTINUOUS]['p']:.2g}" for w in ("vs_prev", "vs_best")}
        lines.append(f"{n:>6} {doc[f'read_n{n}_s']:>8.4f} {doc[f'mcnemar_n{n}_s']:>10.4f} "
                     f"{doc[f'bootstrap_n{n}_s']:>12.4f} {doc[f'compare_n{n}_s']:>10.4f} "
                     f"{doc[f'per_checkpoint_n{n}_s']:>11.4f} {doc[f'bootstrap_share_n{n}']:>10.2f}  "
                     f"{p['vs_prev']:<20} {p['vs_best']}")
    lines.append(f"compare: {doc['compare_s_per_1k_samples']:.4f} s per 1k samples, the daemon per checkpoint "
                 f"(vs prev and best): {doc['per_checkpoint_s_per_1k_samples']:.4f} s per 1k samples "
                 f"(at n={doc['per_1k_from_n']}); bootstrap: {DEFAULT_RESAMPLES} resamples; median of "
                 f"{doc['setup']['repeats']}")
    lines.append("planted: no difference vs prev, 10 points below best: "
                 + ("found" if doc["checks_ok"] else "NOT found (the timings are not of the comparison described)"))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=os.path.join(ROOT, "bench_compare.json"))
    p.add_argument("--quick", action="store_true", help="n = 500, 2000 (a smoke run; the figures at 10k need none)")
    p.add_argument("--sizes", default=None, help="sample counts, comma-separated (default 500,2000,10000)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per n, the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="which samples the planted flips take")
    a = p.parse_args()
    try:
        sizes = [int(s) for s in (a.sizes or ("500,2000" if a.quick else "500,2000,10000")).split(",")]
    except ValueError:
        p.error(f"--sizes: expected whole numbers separated by commas, got {a.sizes!r}")
    if any(n < 100 for n in sizes) or a.repeats < 1:
        p.error("--sizes: each n >= 100 (the planted flips are 5 % of n); --repeats >= 1")

    work = tempfile.mkdtemp(prefix="bench_compare_", dir="/tmp")
    doc: dict = {"checks": {}}
    generate_s = {}
    try:
        for n in sizes:
            progress(f"n={n}: three results through the evaluation stage")
            seconds, folders = timed(make_results, os.path.join(work, f"n{n}"), n, a.seed)
            generate_s[f"n{n}"] = round(seconds, 3)
            progress(f"n={n}: timing, {a.repeats} repeats")
            figures, checks = measure(folders, a.repeats)
            for name, value in figures.items():
                doc[f"{name}_n{n}_s"] = value
            doc[f"bootstrap_share_n{n}"] = figures["bootstrap"] / figures["compare"]
            doc["checks"][f"n{n}"] = checks
    finally:
        shutil.rmtree(work, ignore_errors=True)
    top = max(sizes)
    doc["per_1k_from_n"] = top
    doc["compare_s_per_1k_samples"] = doc[f"compare_n{top}_s"] / (top / 1000)
    doc["per_checkpoint_s_per_1k_samples"] = doc[f"per_checkpoint_n{top}_s"] / (top / 1000)
    doc["checks_ok"] = all(checks_hold(c) for c in doc["checks"].values())
    notes = {"read": "read_scored_result of one folder", "mcnemar": f"compare_values, {BINARY} (0/1)",
             "bootstrap": f"compare_values, {CONTINUOUS}, {DEFAULT_RESAMPLES} resamples",
             "compare": "compare_dirs(new, best), end to end",
             "per_checkpoint": "insight.write_comparison: vs prev and vs best, compare.json written"}
    measurements = {f"{name}_n{n}_s": {"value": doc[f"{name}_n{n}_s"], "unit": "s",
                                       "notes": f"{note}, median of {a.repeats}"}
                    for n in sizes for name, note in notes.items()}
    measurements["compare_s_per_1k_samples"] = {"value": doc["compare_s_per_1k_samples"], "unit": "s",
                                                "notes": f"compare_n{top}_s per 1,000 samples"}
    measurements["per_checkpoint_s_per_1k_samples"] = {"value": doc["per_checkpoint_s_per_1k_samples"], "unit": "s",
                                                       "notes": f"per_checkpoint_n{top}_s per 1,000 samples"}
    doc.update(measurements=measurements,
               setup={"sizes": sizes, "repeats": a.repeats, "seed": a.seed, "resamples": DEFAULT_RESAMPLES,
                      "benchmark": "text-qa through the evaluation stage (exact_match, token_f1)",
                      "planted": {"best_exact_match": BEST_ACCURACY, "new_vs_best_net_drop": DROP,
                                  "flips_each_way": NOISE, "prev": "as good as new, matched swaps"},
                      "generate_s": generate_s, "quick": a.quick},
               machine={"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
               timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(report(sizes, doc))
    write_json_atomic(a.output, doc)
    progress(f"wrote {a.output}")
    return 0 if doc["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
