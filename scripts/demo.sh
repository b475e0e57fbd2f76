#!/usr/bin/env bash
# `make demo`: two toy training runs write Hugging Face checkpoints while the daemon (config/demo.yaml)
# evaluates each complete one -- inference in .venvs/inference, evaluation in .venvs/evaluation, lanes
# overlapping -- and records the curves (history.jsonl, curves.png, a W&B offline run).
# Stops once both trainers are done and every checkpoint is recorded; then prints iteration x metric tables.
# Environment: DEMO_TIMEOUT (seconds, default 1200); LM_ARGS / CAPTIONER_ARGS (extra trainer flags);
# DEMO_DIR (default demo/: runs, data, cache; another folder gets its own copy of config/demo.yaml).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=$ROOT/.venvs/daemon/bin/python
IPY=$ROOT/.venvs/inference/bin/python
D=${DEMO_DIR:-demo}
CONFIG=config/demo.yaml
if [ "$D" != demo ]; then
  mkdir -p "$D"
  D=$(cd "$D" && pwd)
  sed "s#\.\./demo/#$D/#g" config/demo.yaml > "$D/demo.yaml"
  CONFIG=$D/demo.yaml
fi
TIMEOUT=${DEMO_TIMEOUT:-1200}
STARTED=$(date +%s)
say() { echo "[demo $(( $(date +%s) - STARTED ))s] $*"; }

rm -rf "$D/runs" "$D/cache" "$D/data"
mkdir -p "$D/runs/toy-lm" "$D/runs/toy-captioner"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

say "starting the toy trainers (CPU, one thread each): a tiny GPT-2 learning addition, a tiny Whisper captioner"
# shellcheck disable=SC2086
"$IPY" scripts/train_toy_lm.py --out "$D/runs/toy-lm" --data-out "$D/data/toy-lm" ${LM_ARGS:-} 2>&1 &
LM_PID=$!
PIDS+=("$LM_PID")
# shellcheck disable=SC2086
"$IPY" scripts/train_toy_captioner.py --out "$D/runs/toy-captioner" --data-out "$D/data/toy-clotho" \
  ${CAPTIONER_ARGS:-} 2>&1 &
CAP_PID=$!
PIDS+=("$CAP_PID")

# the benchmarks' datasets are written by the trainers before they train; the config checks they exist
for f in "$D/data/toy-lm/metadata.json" "$D/data/toy-clotho/clotho_captions_evaluation.csv"; do
  for _ in $(seq 1 240); do
    [ -e "$f" ] && break
    kill -0 "$LM_PID" 2>/dev/null && kill -0 "$CAP_PID" 2>/dev/null || { echo "a trainer exited early" >&2; exit 1; }
    sleep 0.5
  done
done

say "starting the daemon: $CONFIG (inotify on both run folders; inference and evaluation lanes overlap)"
"$PY" tools/evaluator.py --config "$CONFIG" > >(sed -u 's/^/[daemon] /') 2>&1 &
DAEMON_PID=$!
PIDS+=("$DAEMON_PID")

# the operator's loop: wait for the trainers, then for every checkpoint on disk to be recorded
lm_code="" cap_code=""
while true; do
  if [ -z "$lm_code" ] && ! kill -0 "$LM_PID" 2>/dev/null; then wait "$LM_PID" && lm_code=0 || lm_code=$?; fi
  if [ -z "$cap_code" ] && ! kill -0 "$CAP_PID" 2>/dev/null; then wait "$CAP_PID" && cap_code=0 || cap_code=$?; fi
  if [ "${lm_code:-0}" != 0 ] || [ "${cap_code:-0}" != 0 ]; then
    echo "a trainer failed (toy-lm: ${lm_code:-running}, toy-captioner: ${cap_code:-running})" >&2; exit 1
  fi
  kill -0 "$DAEMON_PID" 2>/dev/null || { echo "the daemon exited unexpectedly" >&2; exit 1; }
  if [ -n "$lm_code" ] && [ -n "$cap_code" ]; then
    verdict=$("$PY" scripts/demo_report.py --config "$CONFIG" --check)
    case "$verdict" in
      done) break ;;
      failed*) echo "$verdict" >&2; exit 1 ;;
    esac
  fi
  if [ $(( $(date +%s) - STARTED )) -gt "$TIMEOUT" ]; then
    echo "demo: not finished after ${TIMEOUT}s" >&2
    "$PY" tools/evaluator.py status --config "$CONFIG" >&2 || true
    exit 1
  fi
  sleep 2
done

say "every checkpoint is recorded; stopping the daemon"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" || true
trap - EXIT
echo
"$PY" scripts/demo_report.py --config "$CONFIG"
say "done"
