# The two first commands: `make demo` and `make test` (each sets up what it needs).
PY := .venvs/daemon/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

setup:  ## create/refresh .venvs/{daemon,inference,evaluation} (idempotent; seconds when nothing changed)
	bash scripts/setup_envs.sh

test: setup  ## the whole suite, slow tests included (what CI runs)
	bash scripts/run_tests.sh $(PYTEST_ARGS)

test-fast: setup  ## skip tests marked slow
	bash scripts/run_tests.sh -m "not slow" $(PYTEST_ARGS)

demo: setup  ## a toy training run watched by the daemon
	bash scripts/demo.sh

bench: setup  ## benchmark scripts; writes bench_results.json
	$(PY) scripts/bench_daemon.py --output bench_results.json

clean:
	rm -rf demo/runs demo/cache .pytest_cache bench_results.json
