"""A stand-in for HELM's `helm-run` / `helm-summarize` (crfm-helm is not installed for the tests).

    fake_helm.py run  --conf-paths SPEC --suite S -m N -n T -o OUT --local-path CACHE --enable-local-huggingface-models PATH
    fake_helm.py summarize --suite S -o OUT

`run` does what the evaluator relies on and nothing more: it reads the run entries' descriptions from the spec,
refuses a model that is not `huggingface/<folder name of PATH>` or a PATH without config.json (exit 1, as HELM
fails), and writes HELM's per-run layout OUT/runs/S/<run name>/{run_spec.json, stats.json} with a few stats of
each kind the converter must keep or skip. Every call is appended to OUT/fake_helm_calls.jsonl.
"""
import argparse
import hashlib
import json
import os
import re
import sys


def stat(name, mean, count=10, split="test", **extra):
    key = {"name": name, "split": split, **extra}
    # HELM's variance is the population variance of the per-instance values; for 0/1 values: m(1-m)
    variance = max(mean * (1 - mean), 0.0) if mean <= 1 else 0.0
    return {"name": key, "count": count, "sum": mean * count, "sum_squared": mean * mean * count, "min": 0,
            "max": max(mean, 1), "mean": mean, "variance": variance, "stddev": variance ** 0.5}


def run(args) -> int:
    with open(args.conf_paths, encoding="utf-8") as f:
        descriptions = re.findall(r'description:\s*"([^"]+)"', f.read())
    local = args.enable_local_huggingface_models
    model = f"huggingface/{os.path.basename(local.rstrip('/'))}"
    if not os.path.isfile(os.path.join(local, "config.json")):
        print(f"fake helm-run: {local}: not a Hugging Face model", file=sys.stderr)
        return 1
    for desc in descriptions:
        if f"model={model}" not in desc:
            print(f"fake helm-run: run entry {desc!r} does not use the enabled model {model}", file=sys.stderr)
            return 1
        run_name = desc.replace("/", "_")
        out = os.path.join(args.o, "runs", args.suite, run_name)
        os.makedirs(out, exist_ok=True)
        h = int(hashlib.sha256(desc.encode()).hexdigest(), 16)
        em = (h % 9 + 1) / 10  # 0.1 .. 0.9, fixed per run entry
        stats = [stat("exact_match", em), stat("quasi_exact_match", min(em + 0.1, 1.0)),
                 stat("exact_match", 0.0, split="valid"),  # another split: ignored
                 stat("exact_match", 0.05, perturbation={"name": "robustness", "computed_on": "worst"}),  # perturbed
                 stat("exact_match", 1.0, sub_split="hard"),  # split further: ignored
                 stat("num_instances", 10.0), stat("inference_runtime", 0.3)]  # bookkeeping: not a metric
        with open(os.path.join(out, "stats.json"), "w") as f:
            json.dump(stats, f)
        with open(os.path.join(out, "run_spec.json"), "w") as f:
            json.dump({"name": desc, "adapter_spec": {"model": model, "model_deployment": model,
                                                      "max_eval_instances": int(args.m)}}, f)
    _record(args.o, sys.argv[1:])
    return 0


def _record(out, argv):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fake_helm_calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")


def main():
    tool = sys.argv[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", required=True)
    ap.add_argument("-o", required=True)
    if tool == "run":
        ap.add_argument("--conf-paths", required=True)
        ap.add_argument("-m", required=True)
        ap.add_argument("-n", default="1")
        ap.add_argument("--local-path", required=True)
        ap.add_argument("--enable-local-huggingface-models", required=True)
        return run(ap.parse_args(sys.argv[2:]))
    args = ap.parse_args(sys.argv[2:])
    _record(args.o, sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
