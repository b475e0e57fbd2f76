#!/usr/bin/env bash
# Create or refresh the three virtualenvs from the locks in thirdparty/envs/.
#   scripts/setup_envs.sh [daemon] [inference] [evaluation]   (default: all three)
# Idempotent: a venv whose lock file, Python and uv are unchanged is left alone (seconds).
# WITH_VLLM=1 builds the inference venv from inference-vllm.txt instead (vLLM, CUDA machines only;
# vLLM pins torch and caps transformers, so it is a lock of its own, not an add-on).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${EVAL_VENVS_DIR:-$ROOT/.venvs}
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
ENVS=${*:-daemon inference evaluation}
# The uv cache sits beside the venvs so installs are hardlinks: torch is stored once on disk.
# Bytecode is compiled at install (uv does not by default): a stage process otherwise compiles torch and
# transformers from source at every start wherever .pyc files cannot be written (PYTHONDONTWRITEBYTECODE=1, as in
# many container images, or a read-only venv): 6.8 s instead of 3.4 s to import them, per stage process.
export UV_CACHE_DIR=${UV_CACHE_DIR:-$VENVS/.uv-cache}
mkdir -p "$VENVS"

UV=$VENVS/.tools/bin/uv
if ! [ -x "$UV" ] || [ "$("$UV" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  echo "[setup] bootstrapping uv $UV_VERSION into $VENVS/.tools"
  "$PYTHON" -m venv "$VENVS/.tools"
  "$VENVS/.tools/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
fi

for env in $ENVS; do
  lock=$ROOT/thirdparty/envs/$env.txt
  if [ "$env" = inference ] && [ "${WITH_VLLM:-0}" = 1 ]; then lock=$ROOT/thirdparty/envs/inference-vllm.txt; fi
  [ -f "$lock" ] || { echo "[setup] unknown env '$env' (no $lock)" >&2; exit 2; }
  # the checkout's path is in the stamp: the project is installed editable, pointing at $ROOT
  stamp=$( { cat "$lock"; "$PYTHON" --version; echo "$UV_VERSION"; echo "$ROOT"; echo bytecode; } | sha256sum | cut -d' ' -f1)
  dir=$VENVS/$env
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ] && [ -x "$dir/bin/python" ]; then
    echo "[setup] $env: up to date ($dir)"
    continue
  fi
  echo "[setup] $env: installing from ${lock#$ROOT/} (first time: minutes; torch is ~3 GB of downloads)"
  start=$(date +%s)
  rm -f "$dir/.stamp"
  [ -x "$dir/bin/python" ] || "$UV" venv -q --python "$PYTHON" "$dir"
  # sync, not install: a venv switched between locks (WITH_VLLM) must not keep the other's packages
  "$UV" pip sync -q --compile-bytecode --python "$dir/bin/python" "$lock"
  "$UV" pip install -q --compile-bytecode --python "$dir/bin/python" --no-deps -e "$ROOT"
  # vLLM's CPU wheel writes a `vllm` dist-info (version +cpu) into site-packages at its first import: vLLM's platform
  # detection reads it. Done here, so a read-only venv or two stages importing it at once never race over it
  if [ "$env" = inference-vllm-cpu ] && ! "$dir/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "[setup] $env: \`import vllm\` fails in $dir (run it there to see why)" >&2; exit 1
  fi
  echo "$stamp" > "$dir/.stamp"
  echo "[setup] $env: ready in $(( $(date +%s) - start )) s, $(du -sh "$dir" 2>/dev/null | cut -f1) ($dir)"
done
