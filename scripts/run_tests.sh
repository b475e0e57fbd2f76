#!/usr/bin/env bash
# Run the test suite in the daemon venv. pytest's exit code 5 ("no tests collected") is a failure
# here too: a suite that collects nothing proves nothing.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
.venvs/daemon/bin/python -m pytest "$@"
code=$?
if [ "$code" = 5 ]; then echo "pytest collected no tests (exit 5): treating as failure" >&2; exit 1; fi
exit "$code"
