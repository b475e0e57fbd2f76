"""The `command` stage module, run as the daemon runs it: `python -m evaluator.stages.command --job`."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from evaluator.common.contracts import COMMAND_PLACEHOLDERS, StageJob, scratch_dir
from conftest import ROOT, venvs  # noqa: F401


def run_stage(python, tmp_path, stage, template, checkpoint="/ckpt/iter 1", name="qa", extra=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    job = StageJob(stage=stage, run="tiny", iteration=1000, checkpoint=checkpoint,
                   benchmark={"name": name, "type": "command", stage: template}, output_dir=str(out), tokens_b=2.0,
                   extra=extra or {})
    job.write(str(out / "job.json"))
    proc = subprocess.run([python, "-m", "evaluator.stages.command", "--job", str(out / "job.json")],
                          capture_output=True, text=True, cwd=str(tmp_path))
    return proc, out


def writes_metrics(text: str) -> str:
    """A command template writing `text` to metrics.json (its braces doubled, as a template needs)."""
    return "echo '" + text.replace("{", "{{").replace("}", "}}") + "' > metrics.json"


def test_placeholders_are_shell_quoted_so_paths_with_spaces_survive(tmp_path, venvs):
    proc, out = run_stage(venvs["inference"], tmp_path, "inference",
                          "{python} -c 'import sys; open(\"args.json\", \"w\").write(repr(sys.argv[1:]))' "
                          "{checkpoint} {iteration} {run} {benchmark} {tokens_b}")
    assert proc.returncode == 0, proc.stderr
    assert (out / "args.json").read_text() == repr(["/ckpt/iter 1", "1000", "tiny", "qa", "2.0"])
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["iteration"] == 1000 and meta["stage"] == "command"


def test_the_command_runs_with_the_stage_venv_first_on_path(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation",
                          "python -c 'import sys, json; json.dump({{\"py\": 1.0}}, open(\"metrics.json\", \"w\")); "
                          "open(\"which\", \"w\").write(sys.executable)'")
    assert proc.returncode == 0, proc.stderr
    assert os.path.dirname((out / "which").read_text()) == os.path.dirname(venvs["evaluation"])


def test_a_flat_metrics_object_is_wrapped_into_the_contract(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation", "echo '{{\"acc\": 0.25}}' > metrics.json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    header = {k: m.get(k) for k in ("benchmark", "benchmark_type", "run", "iteration", "tokens_b", "checkpoint")}
    assert m["metrics"] == {"acc": 0.25}
    assert header == {"benchmark": "qa", "benchmark_type": "command", "run": "tiny", "iteration": 1000,
                      "tokens_b": 2.0, "checkpoint": "/ckpt/iter 1"}


def test_the_commands_metric_order_is_kept_so_its_first_metric_is_the_headline(tmp_path, venvs):
    """The rewrite into the contract form sorted the keys: `status` headlined `torn`, not the `weights_hash` the
    command wrote first (README: the headline is main_metric, else the first metric in metrics.json)."""
    from evaluator.daemon.status import headline

    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation",
                          writes_metrics('{"weights_hash": 7, "torn": 0, "acc": 0.5}'))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["metrics"]) == ["weights_hash", "torn", "acc"]
    assert headline(doc, None).metric == "weights_hash"


def test_a_flat_n_is_the_sample_count_not_a_metric(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation",
                          writes_metrics('{"accuracy": 0.5, "n": 100, "stderr": {"accuracy": 0.05}}'))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert (m["metrics"], m["n"], m["stderr"]) == ({"accuracy": 0.5}, 100, {"accuracy": 0.05})


def test_the_full_form_keeps_its_own_fields(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation",
                          writes_metrics('{"metrics": {"n": 3}, "n": 10, "notes": "harness v2"}'))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert (m["metrics"], m["n"], m["notes"]) == ({"n": 3}, 10, "harness v2")  # in the full form `n` may be a metric


def test_an_evaluation_command_that_writes_no_metrics_fails_the_stage(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation", "true")
    assert proc.returncode == 1 and "wrote no" in proc.stderr


@pytest.mark.parametrize("value", ['"high"', "[0.5]", "true", "null", '{"x": 1}'])
def test_a_flat_value_that_is_not_a_number_fails_for_good_naming_the_key_and_file(tmp_path, venvs, value):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation",
                          writes_metrics(f'{{"acc": 0.5, "judge": {value}}}'))
    assert proc.returncode == 2, proc.stderr  # exit 2: the daemon does not retry what cannot change
    assert f"{out / 'metrics.json'}: 'judge' is " in proc.stderr and "not a number" in proc.stderr


@pytest.mark.parametrize("doc", ['{"acc": NaN}', '{"metrics": {"acc": Infinity}}'])
def test_a_nan_or_infinite_metric_fails_the_stage(tmp_path, venvs, doc):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation", writes_metrics(doc))
    assert proc.returncode == 2 and "metrics.acc: expected a finite number" in proc.stderr


@pytest.mark.parametrize("fields, message", [
    ({"n": 99.5}, "n: expected a count"), ({"n": True}, "n: expected a count"),
    ({"n_error": -1}, "n_error: expected a count"), ({"stderr": [0.1]}, "stderr: expected an object"),
    ({"stderr": {"acc": float("nan")}}, "stderr.acc: expected a finite"),
    ({"per_category": {"music": 0.5}}, "per_category.music: expected an object"),
])
def test_reserved_metrics_fields_of_the_wrong_type_are_refused_naming_the_key(fields, message):
    from evaluator.common.contracts import validate_metrics
    with pytest.raises(ValueError, match=f"^m.json: {re.escape(message)}"):
        validate_metrics({"metrics": {"acc": 0.5}, **fields}, "m.json")


def test_a_metrics_file_of_another_iteration_fails_the_stage(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation",
                          writes_metrics('{"acc": 0.5, "iteration": 2000}'))
    assert proc.returncode == 2 and "iteration is 2000 but this job's is 1000" in proc.stderr


def test_scratch_dir_is_rendered_quoted_and_created_before_the_command_runs(tmp_path, venvs):
    scratch = scratch_dir(str(tmp_path / "cache dir"), "tiny", 1000, "qa")
    proc, out = run_stage(venvs["inference"], tmp_path, "inference", "test -d {scratch_dir} && touch {scratch_dir}/hf",
                          extra={"scratch_dir": scratch})
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(os.path.join(scratch, "hf"))


def test_scratch_dir_lies_outside_the_results_tree_per_run_iteration_and_benchmark():
    assert scratch_dir("/c", "run-a", 2000, "ppl") == "/c/scratch/run-a/iter_0002000/ppl"


def test_scratch_dir_in_a_job_spec_without_it_fails_for_good(tmp_path, venvs):
    proc, out = run_stage(venvs["inference"], tmp_path, "inference", "touch {scratch_dir}/hf")
    assert proc.returncode == 2 and "gives no extra.scratch_dir" in proc.stderr


def test_doubled_braces_reach_the_command_as_literal_braces(tmp_path, venvs):
    proc, out = run_stage(venvs["inference"], tmp_path, "inference", "printf %s {{x}}{{{iteration}}} > braces.txt")
    assert proc.returncode == 0, proc.stderr
    assert (out / "braces.txt").read_text() == "{x}{1000}"


def test_every_placeholder_is_documented_in_the_command_contract():
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
        section = f.read().split("## The `command` benchmark contract", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `\{(\w+)\}`", section, flags=re.M))
    assert documented == set(COMMAND_PLACEHOLDERS)


def test_the_exit_code_of_the_command_is_the_stage_exit_code(tmp_path, venvs):
    proc, out = run_stage(venvs["inference"], tmp_path, "inference", "exit 75")
    assert proc.returncode == 75
    assert not (out / "run_metadata.json").exists()  # no "done" marker for a stage that did not finish


def test_format_specs_in_templates_work_and_values_stay_quoted():
    from evaluator.common.contracts import render_template
    out = render_template("--load {checkpoint} --it iter_{iteration:07d} --tok {tokens_b:.1f}",
                          {"checkpoint": "/a b/c", "iteration": 2000, "tokens_b": 2.25})
    assert out == "--load '/a b/c' --it iter_0002000 --tok 2.2"
