#!/usr/bin/env python
"""Time CIDEr-D and METEOR through our registry (`compute`) against aac-metrics called directly.

    python scripts/bench_metrics.py [--output FILE] [--repeat N]

Same inputs on both sides: a synthetic Clotho-sized set (1045 candidates x 5 references). Both sides include
PTB tokenisation (aac-metrics' `evaluate(preprocess=True)` on the direct side). Python imports are done before
timing. Runs from any python: without aac_metrics it re-executes itself in .venvs/evaluation/bin/python.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATION_PY = os.path.join(ROOT, ".venvs", "evaluation", "bin", "python")
N = 1045


def synthetic_set(n: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    nouns = ["dog", "cat", "car", "bird", "man", "woman", "child", "train", "door", "rain", "engine", "crowd",
             "water", "bell", "wind", "machine", "baby", "horse", "truck", "clock", "phone", "river"]
    verbs = ["barks", "meows", "passes by", "sings", "talks", "laughs", "cries", "slams", "falls", "runs",
             "rings", "blows", "hums", "splashes", "whistles", "knocks", "honks", "ticks"]
    extras = ["loudly", "in the distance", "nearby", "while people talk", "on a busy street", "twice",
              "and then stops", "as birds chirp", "in a large room", "outside", "near a river", "at night",
              "repeatedly", "with an echo"]

    def sentence() -> str:
        words = [rng.choice(["a", "the", "A", "The", "some"]), rng.choice(nouns), rng.choice(verbs)]
        words += rng.sample(extras, rng.randint(0, 3))
        s = " ".join(words)
        if rng.random() < 0.3:
            s = s.replace(" ", ", ", 1)
        return s + rng.choice([".", "!", ",", "", "..."])

    refs = [[sentence() for _ in range(5)] for _ in range(n)]
    cands = [r[rng.randrange(5)] if rng.random() < 0.3 else sentence() for r in refs]
    return cands, refs


def interleaved(repeat: int, ours, direct) -> tuple[float, float, float, float]:
    """Run the two sides alternately (order flipped each round, so load drifts hit both) and keep each
    side's fastest time. Returns (ours_s, ours_value, direct_s, direct_value)."""
    times: dict = {"ours": [], "direct": []}
    values: dict = {}
    for round_ in range(repeat):
        sides = [("ours", ours), ("direct", direct)]
        for side, fn in (sides if round_ % 2 == 0 else sides[::-1]):
            start = time.perf_counter()
            values[side] = fn()
            times[side].append(time.perf_counter() - start)
    return min(times["ours"]), values["ours"], min(times["direct"]), values["direct"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="write the figures as JSON here")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest counts")
    args = parser.parse_args()

    from aac_metrics.functional.evaluate import evaluate
    from aac_metrics.utils import checks

    from evaluator.benchmarks.dataset import Sample
    from evaluator.stages.evaluation.metrics import MetricInput, compute
    from evaluator.stages.evaluation.metrics.caption import (MAX_JAVA_MAJOR_VERSION, default_cache_dir,
                                                              prepare_cache)

    cache_dir = default_cache_dir()
    prepare_cache(cache_dir)
    checks.MAX_JAVA_MAJOR_VERSION = max(checks.MAX_JAVA_MAJOR_VERSION, MAX_JAVA_MAJOR_VERSION)  # as ours does
    cands, refs = synthetic_set(N)
    samples = [Sample(id=str(i), messages=[{"role": "user", "content": "Describe the audio."}], references=r)
               for i, r in enumerate(refs)]
    inp = MetricInput(predictions=cands, samples=samples, ok=[True] * N, options={}, cache_dir=cache_dir)

    figures: dict = {"n": N, "references_per_sample": 5, "repeat": args.repeat}
    print(f"{'metric':<8} {'ours_s':>8} {'direct_s':>9} {'ratio':>6}  values (ours / direct)")
    for name in ("cider_d", "meteor"):
        ours_s, ours, direct_s, direct = interleaved(
            args.repeat, lambda: compute([name], inp).values[name],
            lambda: float(evaluate(cands, refs, metrics=[name], cache_path=cache_dir)[0][name]))
        figures[name] = {"ours_s": round(ours_s, 3), "direct_s": round(direct_s, 3),
                         "ratio": round(ours_s / direct_s, 3), "ours_value": ours, "direct_value": direct}
        print(f"{name:<8} {ours_s:8.2f} {direct_s:9.2f} {ours_s / direct_s:6.2f}  {ours!r} / {direct!r}")
        if ours != direct:
            print(f"  WARNING: {name} differs from aac-metrics by {ours - direct:.3g}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    if importlib.util.find_spec("aac_metrics") is None:
        if os.path.abspath(sys.prefix) == os.path.dirname(os.path.dirname(EVALUATION_PY)) \
                or not os.access(EVALUATION_PY, os.X_OK):
            sys.exit(f"aac_metrics is not importable and {EVALUATION_PY} is missing; run `make setup` first")
        os.execv(EVALUATION_PY, [EVALUATION_PY, os.path.abspath(__file__), *sys.argv[1:]])
    sys.path.insert(0, ROOT)
    sys.exit(main())
