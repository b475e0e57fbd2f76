"""Stages for the toy trainer's checkpoints (used by config/demo.yaml through `type: command`).

    toy_stage.py infer --checkpoint DIR --out DIR   -> predictions.jsonl (one row per test sample)
    toy_stage.py eval  --out DIR                    -> metrics.json (accuracy and its standard error)
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_trainer import make_data  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["infer", "eval"])
    p.add_argument("--checkpoint")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.stage == "infer":
        with open(os.path.join(a.checkpoint, "mp_rank_00", "model_optim_rng.json")) as f:
            w = json.load(f)["weights"]
        with open(os.path.join(a.out, "predictions.jsonl"), "w") as f:
            for i, ((x1, x2), y) in enumerate(make_data(500, seed=2)):  # held out: another seed
                z = w[0] * x1 + w[1] * x2 + w[2]
                f.write(json.dumps({"sample_id": str(i), "prediction": int(z > 0), "target": y}) + "\n")
        return
    with open(os.path.join(a.out, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    correct = [r["prediction"] == r["target"] for r in rows]
    acc = sum(correct) / len(correct)
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump({"metrics": {"accuracy": acc}, "n": len(rows),
                   "stderr": {"accuracy": math.sqrt(acc * (1 - acc) / len(rows))}}, f)


if __name__ == "__main__":
    main()
