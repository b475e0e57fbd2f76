"""A toy training run that writes Megatron-style checkpoints the way a real trainer does.

Pure-Python logistic regression on a synthetic 2-class problem, trained with SGD. Every
--save-every steps it writes iter_%07d/mp_rank_00/model_optim_rng.json *non-atomically* (the file
grows in several writes with pauses, as a multi-GB shard would), and only then updates
latest_checkpointed_iteration.txt -- so the daemon's completeness rule is exercised for real.
(The toy LM and audio captioner of the full demo are separate scripts.)
"""
import argparse
import json
import math
import os
import random
import time


def make_data(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.random() < 0.5
        cx, cy = (1.0, 0.6) if y else (-0.6, -1.0)
        rows.append(((rng.gauss(cx, 1.0), rng.gauss(cy, 1.0)), int(y)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="checkpoint folder (the one the daemon watches)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--step-seconds", type=float, default=0.02, help="simulated compute per step")
    p.add_argument("--lr", type=float, default=0.01)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    data = make_data(2000, seed=1)
    w = [0.0, 0.0, -2.0]  # a bad start, so the curve has somewhere to go
    rng = random.Random(0)
    for step in range(1, a.steps + 1):
        (x1, x2), y = rng.choice(data)
        z = w[0] * x1 + w[1] * x2 + w[2]
        g = 1 / (1 + math.exp(-z)) - y
        w = [w[0] - a.lr * g * x1, w[1] - a.lr * g * x2, w[2] - a.lr * g]
        time.sleep(a.step_seconds)
        if step % a.save_every == 0:
            d = os.path.join(a.out, f"iter_{step:07d}", "mp_rank_00")
            os.makedirs(d, exist_ok=True)
            blob = json.dumps({"weights": w, "step": step, "padding": "x" * 20000})
            with open(os.path.join(d, "model_optim_rng.json"), "w") as f:
                for i in range(0, len(blob), 5000):  # a shard that takes a while to land
                    f.write(blob[i:i + 5000])
                    f.flush()
                    time.sleep(0.05)
            with open(os.path.join(a.out, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(step))
            print(f"[trainer] step {step}: saved iter_{step:07d}", flush=True)
    print("[trainer] done", flush=True)


if __name__ == "__main__":
    main()
