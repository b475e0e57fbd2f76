#!/usr/bin/env bash
# `make demo`: a toy training run writes checkpoints while the daemon evaluates each complete one.
# Prints the iteration x metric table at the end. Takes about half a minute.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=.venvs/daemon/bin/python
RUN=demo/runs/toy-logreg
rm -rf demo/runs demo/cache
mkdir -p demo/runs
echo "[demo] starting the toy trainer: 600 steps, a Megatron-style checkpoint every 100 (written slowly, tracker last)"
"$PY" scripts/toy_trainer.py --out "$RUN" --steps 600 --save-every 100 &
TRAINER=$!
trap 'kill $TRAINER 2>/dev/null || true' EXIT
echo "[demo] starting the daemon: config/demo.yaml, stops once iteration 600 is recorded"
"$PY" tools/evaluator.py --config config/demo.yaml --begin-iteration 100 --end-iteration 600
wait "$TRAINER"
trap - EXIT
echo
"$PY" tools/evaluator.py status --config config/demo.yaml
echo
"$PY" - <<'PY'
import json
rows = [json.loads(l) for l in open("demo/cache/results/toy-logreg/history.jsonl")]
print(f"{'iteration':>10} {'tokens_b':>10} {'accuracy':>9} {'stderr':>7}")
for r in sorted(rows, key=lambda r: r["iteration"]):
    print(f"{r['iteration']:>10} {r['tokens_b']:>10.4f} {r['metrics']['accuracy']:>9.3f} {r['stderr']['accuracy']:>7.3f}")
first, last = min(rows, key=lambda r: r["iteration"]), max(rows, key=lambda r: r["iteration"])
print(f"\naccuracy {first['metrics']['accuracy']:.3f} at iteration {first['iteration']} -> "
      f"{last['metrics']['accuracy']:.3f} at {last['iteration']}")
print("results tree: demo/cache/results/toy-logreg/ (history.jsonl, iter_*/holdout/metrics.json)")
PY
