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


def test_common_imports_only_the_standard_library_and_itself():
    allowed = set(sys.stdlib_module_names) | {"evaluator", "yaml"}
    bad = [(f, m) for f in files("evaluator/common") for m in imports_of(f) if m.split(".")[0] not in allowed]
    assert not bad, bad


def test_stages_never_import_the_daemon():
    bad = [(f, m) for f in files("evaluator/stages") for m in imports_of(f)
           if m.startswith("evaluator.daemon") or m.startswith("recorder")]
    assert not bad, bad


@pytest.mark.parametrize("package", ["evaluator/benchmarks", "evaluator/bench.py",
                                     "evaluator/stages/inference/params.py", "evaluator/stages/inference/backends/__init__.py"])
def test_loaders_and_bench_cli_are_standard_library_only(package):
    """Benchmark loaders and tools/bench.py run under any python (the daemon's, the user's), so no third-party
    imports beyond yaml (pyarrow: optional, imported inside a try for MMAU-Pro's parquet files)."""
    allowed = set(sys.stdlib_module_names) | {"evaluator", "yaml", "pyarrow"}
    paths = [os.path.join(ROOT, package)] if package.endswith(".py") else files(package)
    bad = [(f, m) for f in paths for m in imports_of(f) if m.split(".")[0] not in allowed]
    assert not bad, bad
