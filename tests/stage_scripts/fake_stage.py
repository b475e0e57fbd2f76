"""A stage command for tests: behaves as told, and writes down what it saw.

    fake_stage.py infer|eval --out DIR --checkpoint PATH --iteration N [--mode MODE] [--sleep S]
      [--manifest FILE] [--weights REL]

Every invocation appends one line to DIR/invocations.log (stage, pid, CUDA_VISIBLE_DEVICES, start, end),
so tests can count how many times a stage really ran and what it was given.
Modes: ok, crash (exit 3), tempfail (exit 75), hang (ignore SIGTERM, leave a child that sleeps too,
write their pids to DIR/hang.pids), needs_checkpoint (fail if the checkpoint is gone after sleeping).
--manifest: a JSON {relative file: final size} written by the checkpoint writer; the stage records
whether the checkpoint matched it when the stage started (it must always, or we started too early).
--weights: inference reads this file of the checkpoint after its sleep (exit 1 if it is gone) and keeps its
content; evaluation then adds the metric `weights_ok`: 1 when that content is `weights <iteration>`, as
scripts/chaos_kill9.py writes it (a result taken from another checkpoint's weights shows as 0).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("stage", choices=["infer", "eval"])
p.add_argument("--out", required=True)
p.add_argument("--checkpoint", default="")
p.add_argument("--iteration", type=int, default=0)
p.add_argument("--mode", default="ok")
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--manifest", default="")
p.add_argument("--weights", default="")
a = p.parse_args()

start = time.time()
seen = {}
if a.manifest and a.stage == "infer":
    with open(a.manifest) as f:
        want = json.load(f)[str(a.iteration)]
    have = {}
    for rel in want:
        full = os.path.join(a.checkpoint, rel)
        have[rel] = os.path.getsize(full) if os.path.exists(full) else None
    seen = {"complete_at_start": have == want, "have": have, "want": want}


def log_invocation(end=None):
    with open(os.path.join(a.out, "invocations.log"), "a") as f:
        f.write(json.dumps({"stage": a.stage, "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "start": start, "end": end, "python": sys.executable}) + "\n")


if a.mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
    with open(os.path.join(a.out, "hang.pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}\n")
    log_invocation()
    time.sleep(3600)
time.sleep(a.sleep)
if a.mode == "crash":
    log_invocation(time.time())
    print("fake stage: crashing on purpose", file=sys.stderr)
    sys.exit(3)
if a.mode == "tempfail":
    log_invocation(time.time())
    print("fake stage: resource busy, retry later", file=sys.stderr)
    sys.exit(75)
if a.mode == "needs_checkpoint" and not os.path.exists(a.checkpoint):
    log_invocation(time.time())
    print(f"fake stage: checkpoint {a.checkpoint} is gone", file=sys.stderr)
    sys.exit(1)
weights = None
if a.weights and a.stage == "infer":
    try:
        with open(os.path.join(a.checkpoint, a.weights), errors="replace") as f:
            weights = f.read()
    except OSError as e:
        log_invocation(time.time())
        print(f"fake stage: cannot read the weights: {e}", file=sys.stderr)
        sys.exit(1)
if a.stage == "infer":
    with open(os.path.join(a.out, "predictions.jsonl"), "w") as f:
        row = {"sample_id": "0", "checkpoint": a.checkpoint, "seen": seen}
        if a.weights:
            row["weights"] = weights
        f.write(json.dumps(row) + "\n")
else:
    with open(os.path.join(a.out, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # a metric that depends on the input, so a mixed-up result would show
    metrics = {"rows": len(rows), "iteration_k": a.iteration / 1000}
    if a.weights:
        metrics["weights_ok"] = int(all(r.get("weights") == f"weights {a.iteration}" for r in rows))
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(metrics, f)
log_invocation(time.time())
