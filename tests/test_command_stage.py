"""The `command` stage module, run as the daemon runs it: `python -m evaluator.stages.command --job`."""
from __future__ import annotations

import json
import os
import subprocess

from evaluator.common.contracts import StageJob
from conftest import venvs  # noqa: F401


def run_stage(python, tmp_path, stage, template, checkpoint="/ckpt/iter 1", name="qa"):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    job = StageJob(stage=stage, run="tiny", iteration=1000, checkpoint=checkpoint,
                   benchmark={"name": name, "type": "command", stage: template}, output_dir=str(out), tokens_b=2.0)
    job.write(str(out / "job.json"))
    proc = subprocess.run([python, "-m", "evaluator.stages.command", "--job", str(out / "job.json")],
                          capture_output=True, text=True, cwd=str(tmp_path))
    return proc, out


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
    assert m == {"metrics": {"acc": 0.25}, "benchmark": "qa", "iteration": 1000, "tokens_b": 2.0}


def test_an_evaluation_command_that_writes_no_metrics_fails_the_stage(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation", "true")
    assert proc.returncode == 1 and "wrote no" in proc.stderr


def test_a_metric_that_is_not_a_number_fails_the_stage(tmp_path, venvs):
    proc, out = run_stage(venvs["evaluation"], tmp_path, "evaluation", "echo '{{\"acc\": \"high\"}}' > metrics.json")
    assert proc.returncode == 1 and "metrics.acc: expected a number" in proc.stderr


def test_the_exit_code_of_the_command_is_the_stage_exit_code(tmp_path, venvs):
    proc, out = run_stage(venvs["inference"], tmp_path, "inference", "exit 75")
    assert proc.returncode == 75
    assert not (out / "run_metadata.json").exists()  # no "done" marker for a stage that did not finish


def test_format_specs_in_templates_work_and_values_stay_quoted():
    from evaluator.common.contracts import render_template
    out = render_template("--load {checkpoint} --it iter_{iteration:07d} --tok {tokens_b:.1f}",
                          {"checkpoint": "/a b/c", "iteration": 2000, "tokens_b": 2.25})
    assert out == "--load '/a b/c' --it iter_0002000 --tok 2.2"
