#!/usr/bin/env bash
# Verify the GPU lane on a CUDA machine: the daemon finds the GPUs itself (nvidia-smi), gives each
# inference stage its GPU in CUDA_VISIBLE_DEVICES, and hides GPUs from the evaluation lane.
#   scripts/gpu_lane_check.sh [PYTHON_WITH_TORCH]   -> prints a JSON report; exit 1 on any mismatch
# Uses one python (with torch) for daemon and both stages; the daemon side needs pydantic, watchdog,
# apscheduler, filelock, pyyaml importable.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# whole Megatron saves: an iter dir counts only with a non-empty mp_rank_*/model_optim_rng.pt (the daemon then
# waits watch.settle_seconds after the tracker before starting anything)
for it in 1000 2000 3000; do
  mkdir -p "$WORK/ckpt/iter_000${it}/mp_rank_00"
  printf 'weights' > "$WORK/ckpt/iter_000${it}/mp_rank_00/model_optim_rng.pt"
done
echo 3000 > "$WORK/ckpt/latest_checkpointed_iteration.txt"
cat > "$WORK/stage.py" <<'PY'
import json, os, sys, time
import torch
stage, out = sys.argv[1], sys.argv[2]
info = {"stage": stage, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
if stage == "infer" and torch.cuda.is_available():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        b = a @ a
    torch.cuda.synchronize()
    info["device_name"] = torch.cuda.get_device_name(0)
    info["bf16_tflops"] = round(20 * 2 * 4096 ** 3 / (time.perf_counter() - t) / 1e12, 1)
    open(os.path.join(out, "predictions.jsonl"), "w").write(json.dumps(info) + "\n")
json.dump(info, open(os.path.join(out, f"{stage}_env.json"), "w"))
if stage == "eval":
    json.dump({"metrics": {"gpu_visible_in_eval": float(torch.cuda.is_available())}}, open(os.path.join(out, "metrics.json"), "w"))
PY
cat > "$WORK/cfg.yaml" <<YAML
auto_eval:
  project_name: gpu-check
  model_name: gpu
  cache_dir: $WORK/cache
  watch: {paths: [$WORK/ckpt], layout: megatron, iteration_interval: 1000}
  envs: {inference: $PY, evaluation: $PY}
  benchmarks:
    - name: lane
      inference: "{python} $WORK/stage.py infer {output_dir}"
      evaluation: "{python} $WORK/stage.py eval {output_dir}"
YAML
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
unset CUDA_VISIBLE_DEVICES
"$PY" "$ROOT/tools/evaluator.py" --config "$WORK/cfg.yaml" --once 2>&1 | grep -E "daemon started|started \(pid|recorded" || true
"$PY" - "$WORK" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
rows = []
for d in sorted(glob.glob(f"{work}/cache/results/gpu/iter_*/lane")):
    rows.append({"iteration": int(d.split("iter_")[1].split("/")[0]),
                 "infer": json.load(open(f"{d}/infer_env.json")), "eval": json.load(open(f"{d}/eval_env.json"))})
ok = len(rows) == 3 and all(r["infer"]["cuda_available"] and r["infer"]["CUDA_VISIBLE_DEVICES"] not in (None, "")
                            and r["infer"]["device_count"] == 1 and not r["eval"]["cuda_available"]
                            and r["eval"]["CUDA_VISIBLE_DEVICES"] == "" for r in rows)
print(json.dumps({"ok": ok, "checkpoints": rows}, indent=1))
sys.exit(0 if ok else 1)
PY
