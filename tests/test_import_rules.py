"""The import rule of docs/architecture.md, checked on the source (AST), so a violation fails CI."""
from __future__ import annotations

import ast
import glob
import os
import sys

import pytest

from conftest import ROOT

HEAVY = {"torch", "transformers", "vllm", "aac_metrics", "torchaudio", "torchvision", "sentence_transformers"}


def imports_of(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def files(package):
    return sorted(glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True))


@pytest.mark.parametrize("package", ["evaluator/daemon", "recorder", "evaluator/common"])
def test_daemon_side_never_imports_torch_or_model_libraries(package):
    bad = [(f, m) for f in files(package) for m in imports_of(f) if m.split(".")[0] in HEAVY]
    assert not bad, bad


def test_common_imports_only_the_standard_library_yaml_and_itself():
    """evaluator.common is the bottom layer every venv and both tools share."""
    allowed = set(sys.stdlib_module_names) | {"yaml"}
    bad = [(f, m) for f in files("evaluator/common") for m in imports_of(f)
           if m.split(".")[0] not in allowed and not (m == "evaluator.common" or m.startswith("evaluator.common."))]
    assert not bad, bad


def test_recorder_never_imports_the_daemon():
    """recorder/ is a leaf below the daemon (evaluator.common <- recorder <- evaluator.daemon): the config-to-sink
    wiring lives in evaluator/daemon/sink_setup.py, so config.py and recorder/sinks.py cannot import each other
    again. Every import counts, including those under `if TYPE_CHECKING:` and inside functions."""
    bad = [(f, m) for f in files("recorder") for m in imports_of(f) if m.startswith("evaluator.daemon")]
    assert not bad, bad


def top_level_imports(path):
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_backend_modules_import_nothing_heavy_at_module_level():
    """The daemon's config check reads each backend class's OPTIONS, so importing a backend module must not
    import torch or vLLM (they are imported when the model loads)."""
    allowed = set(sys.stdlib_module_names) | {"evaluator"}
    paths = files("evaluator/stages/inference/backends")
    bad = [(f, m) for f in paths for m in top_level_imports(f) if m.split(".")[0] not in allowed]
    assert not bad, bad


def test_stages_never_import_the_daemon():
    bad = [(f, m) for f in files("evaluator/stages") for m in imports_of(f)
           if m.startswith("evaluator.daemon") or m.startswith("recorder")]
    assert not bad, bad


@pytest.mark.parametrize("package", ["evaluator/benchmarks", "evaluator/bench.py", "evaluator/daemon/stages.py",
                                     "evaluator/stages/inference/params.py", "evaluator/stages/inference/backends/__init__.py"])
def test_loaders_and_bench_cli_are_standard_library_only(package):
    """Benchmark loaders and tools/bench.py run under any python (the daemon's, the user's), so no third-party
    imports beyond yaml (pyarrow: optional, imported inside a try for MMAU-Pro's parquet files)."""
    allowed = set(sys.stdlib_module_names) | {"evaluator", "yaml", "pyarrow"}
    paths = [os.path.join(ROOT, package)] if package.endswith(".py") else files(package)
    bad = [(f, m) for f in paths for m in imports_of(f) if m.split(".")[0] not in allowed]
    assert not bad, bad


# ---- the Python API (evaluator/api, issue 17) ---------------------------------------------------------------------
# what `import evaluator.api` may load: the light layers below it (stdlib + yaml; recorder's sinks import their SDKs
# lazily)
API_TOP_LEVEL = ("evaluator.api", "evaluator.common", "evaluator.benchmarks", "evaluator.daemon.config",
                 "evaluator.daemon.ledger", "evaluator.stages.evaluation.metrics", "recorder")
# imported inside functions only, so `import evaluator.api` stays light in a training script's environment
API_LAZY = {"torch", "transformers", "wandb", "mlflow", "pandas", "pydantic", "aac_metrics", "sentence_transformers"}


def test_importing_the_api_loads_only_the_layers_below_it():
    """At module level evaluator/api imports evaluator.common, recorder, the benchmark loaders, the metric registry
    and the daemon's config and ledger; the rest of the daemon (evaluate_checkpoint drives it) is imported inside
    the functions that need it."""
    bad = [(f, m) for f in files("evaluator/api") for m in top_level_imports(f)
           if m.split(".")[0] in ("evaluator", "recorder") and m != "evaluator"
           and not any(m == a or m.startswith(a + ".") for a in API_TOP_LEVEL)]
    assert not bad, bad


def test_the_api_never_imports_model_code():
    """The API runs a user's function in the user's environment; the stages' model code (inference backends,
    external harnesses) runs in the stage venvs, started as processes. Of the stages, only the evaluation stage's
    pure scoring (score(), the metric registry) is imported, to score in-process."""
    bad = [(f, m) for f in files("evaluator/api") for m in imports_of(f)
           if m.startswith("evaluator.stages") and not m.startswith("evaluator.stages.evaluation")]
    assert not bad, bad


def test_nothing_below_the_api_imports_it():
    bad = [(f, m) for package in ("evaluator/common", "evaluator/daemon", "evaluator/stages", "evaluator/benchmarks",
                                  "recorder")
           for f in files(package) for m in imports_of(f) if m == "evaluator.api" or m.startswith("evaluator.api.")]
    assert not bad, bad


def test_api_imports_heavy_libraries_only_inside_functions():
    bad = [(f, m) for f in files("evaluator/api") for m in top_level_imports(f) if m.split(".")[0] in API_LAZY]
    assert not bad, bad
