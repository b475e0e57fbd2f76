"""A command-benchmark stage for the alert tests: scores a checkpoint as a plan file says.

    scored_stage.py infer --out DIR
    scored_stage.py eval --out DIR --iteration N --plan PLAN.json

PLAN.json maps an iteration to the share of its N_SAMPLES samples answered right ({"1000": 0.8}); sample i is
right when i < share * N_SAMPLES, so a lower share breaks exactly the samples between. The evaluation writes
scores.jsonl (contracts.SCORES: exact_match per sample) and then metrics.json, as the evaluation stage does.
"""
import argparse
import json
import os

N_SAMPLES = 200

p = argparse.ArgumentParser()
p.add_argument("stage", choices=["infer", "eval"])
p.add_argument("--out", required=True)
p.add_argument("--iteration", type=int, default=0)
p.add_argument("--plan", default="")
a = p.parse_args()


def write(name: str, text: str) -> None:
    tmp = os.path.join(a.out, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(a.out, name))


if a.stage == "infer":
    write("predictions.jsonl", "".join(json.dumps({
        "sample_id": f"q{i}", "status": "ok", "response": {"text": "", "usage": {}},
        "request_messages": [{"role": "user", "content": f"question {i}"}]}) + "\n" for i in range(N_SAMPLES)))
else:
    with open(a.plan) as f:
        share = json.load(f)[str(a.iteration)]
    right = [1.0 if i < share * N_SAMPLES else 0.0 for i in range(N_SAMPLES)]
    write("scores.jsonl", "".join(json.dumps({
        "schema_version": 1, "sample_id": f"q{i}", "status": "ok", "category": None,
        "prediction": "A" if r else "B", "target": "A", "scores": {"exact_match": r}}) + "\n"
        for i, r in enumerate(right)))
    write("metrics.json", json.dumps({"metrics": {"exact_match": sum(right) / N_SAMPLES}, "n": N_SAMPLES,
                                      "per_sample": {"exact_match": "mean"}}))
