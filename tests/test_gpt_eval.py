"""Data-Juicer's GPT evaluation: the gpt_eval loader, the llm_judge metric against a scripted judge and a real
`transformers serve` judge, and the daemon's `--eval-type gpt` end to end on a tiny checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import ROOT, VENVS, run_cli, venvs  # noqa: F401  (venvs: a fixture)

from evaluator.benchmarks.dataset import DatasetError
from evaluator.benchmarks.registry import load_benchmark
from evaluator.common.errors import EvaluatorError
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.judge import parse_scores

JUDGE_SERVER = os.path.join(ROOT, "tests", "stage_scripts", "judge_server.py")
MAKE_TINY_LM = os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_lm.py")
TEMPLATE = "Q: {question}\nA1: {answer_1}\nA2: {answer_2}\n{prompt}"


# ---- fixtures ------------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def dj_files(root, questions=None, layout="dir"):
    """Data-Juicer's four files; baseline answers are `base-<id>` so a scripted judge can tell the order."""
    questions = questions or [("1", "writing"), ("2", "math"), ("3", "writing"), ("4", "coding"), ("5", "math"),
                              ("6", "writing")]
    write_jsonl(root / "question.jsonl", [{"question_id": int(q), "text": f"question {q}?", "category": c}
                                          for q, c in questions])
    # baseline rows in another order than the questions: matched by question_id, not by line
    write_jsonl(root / "answer" / "openai" / "gpt-3.5-turbo.jsonl",
                [{"question_id": int(q), "model_id": "baseline-model", "text": f"base-{q}"} for q, _ in reversed(questions)])
    write_jsonl(root / "prompt.jsonl", [
        {"category": "general", "system_prompt": "You judge.", "prompt_template": TEMPLATE,
         "defaults": {"prompt": "general rules"}, "description": "general"},
        {"category": "math", "system_prompt": "You judge math.", "prompt_template": TEMPLATE,
         "defaults": {"prompt": "math rules"}, "description": "math"}])
    write_jsonl(root / "reviewer.jsonl", [
        {"category": "general", "metadata": {"temperature": 0.2, "max_tokens": 64, "model": "judge-model"}},
        {"category": "math", "metadata": {"temperature": 0.0, "max_tokens": 32, "model": "judge-model"}}])
    return root


class JudgeServer:
    def __init__(self, tmp_path, script: dict):
        self.script_path = tmp_path / f"judge_script_{id(self)}.json"
        self.script_path.write_text(json.dumps(script))
        self.log_path = tmp_path / f"judge_requests_{id(self)}.jsonl"
        self.proc = subprocess.Popen([sys.executable, JUDGE_SERVER, str(self.script_path), "--log", str(self.log_path)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), f"judge server did not start: {line!r}"
        self.base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def requests(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def judge_server(tmp_path):
    started = []

    def start(script):
        server = JudgeServer(tmp_path, script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def judge_input(dataset, predictions, **options) -> MetricInput:
    return MetricInput(predictions=predictions, samples=dataset.samples, ok=[True] * len(predictions),
                       options={"llm_judge": options}, cache_dir="")


FAST = {"retry_backoff": 0.01, "max_retries": 2, "timeout": 10}

# first order: the answer is Assistant 1 ("A2: base-q" follows it); swapped: the baseline is Assistant 1
SCRIPT = {"rules": [
    {"contains": "A2: base-1", "replies": ["8 6\nbecause the first answer is better"]},  # 1: 8 vs 6, swapped 8 vs 6
    {"contains": "A1: base-1", "replies": ["6,8"]},
    {"contains": "A2: base-2", "replies": ["7 7"]},  # 2: tie
    {"contains": "A1: base-2", "replies": ["Evaluation evidence: equally good.\n7, 7"]},
    {"contains": "A2: base-3", "replies": ["3 9"]},  # 3: loss
    {"contains": "A1: base-3", "replies": ["**9 3**\nthe baseline wins"]},
    {"contains": "A2: base-4", "replies": ["I cannot decide which one is better."]},  # 4: unparsed -> not judged
    {"contains": "A1: base-4", "replies": ["5 5"]},
    {"contains": "A2: base-5", "replies": [{"status": 500}, "5 4"]},  # 5: a 500, retried -> 5 vs 4: win
    {"contains": "A1: base-5", "replies": [{"status": 503}, {"status": 429}, "4 5"]},
    {"contains": "A2: base-6", "replies": [{"status": 500}]},  # 6: always 500 -> an error, not judged
    {"contains": "A1: base-6", "replies": ["6 6"]},
]}


# ---- reply parsing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, expected", [
    ("8 6\nBoth answers are relevant, the first one more detailed.", (8.0, 6.0)),  # FastChat: first line
    ("Evaluation evidence: the second is vague.\n9,4", (9.0, 4.0)),  # Data-Juicer: last line, comma
    ("8, 6", (8.0, 6.0)),
    ("  **7.5 8**  \n", (7.5, 8.0)),
    ("Scores: 10 9", (10.0, 9.0)),
    ("<think>maybe 1 2</think>\n3 4\nreason", (3.0, 4.0)),  # a reasoning judge's thoughts are not the verdict
    ("Assistant 1 gets 8 and Assistant 2 gets 6.", None),  # numbers inside a sentence are not a score line
    ("8\n6", None),
    ("8 6 5", None),
    ("", None),
    ("the sea? one two three", None),
])
def test_judge_reply_scores_come_from_a_line_of_exactly_two_numbers(reply, expected):
    assert parse_scores(reply) == expected


# ---- the loader ----------------------------------------------------------------------------------------------
def test_loader_reads_data_juicer_files_and_picks_prompt_and_reviewer_by_category(tmp_path):
    root = dj_files(tmp_path / "gpt")
    ds = load_benchmark("gpt_eval", str(root))
    assert [s.id for s in ds.samples] == ["1", "2", "3", "4", "5", "6"]
    s2, s4 = ds.by_id()["2"], ds.by_id()["4"]
    assert s2.messages == [{"role": "user", "content": "question 2?"}] and s2.category == "math"
    assert s2.metadata["baseline"] == {"text": "base-2", "model_id": "baseline-model"}  # matched by question_id
    assert s2.metadata["judge"]["defaults"] == {"prompt": "math rules"}
    assert (s2.metadata["judge"]["temperature"], s2.metadata["judge"]["max_tokens"]) == (0.0, 32)
    # "coding" has neither prompt nor reviewer: Data-Juicer falls back to "general"
    assert s4.metadata["judge"]["defaults"] == {"prompt": "general rules"}
    assert s4.metadata["judge"]["system_prompt"] == "You judge." and s4.metadata["judge"]["max_tokens"] == 64
    assert ds.metadata["baseline_model"] == "baseline-model" and ds.metadata["metrics"] == ["llm_judge"]


def test_loader_takes_files_named_in_options_and_fastchat_turns(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 81, "category": "writing", "turns": ["first turn", "second"]}])
    write_jsonl(tmp_path / "base.jsonl", [{"question_id": 81, "answer_id": "x", "model_id": "gpt-4",
                                           "choices": [{"index": 0, "turns": ["a baseline", "b"]}]}])
    write_jsonl(tmp_path / "prompts" / "p.jsonl", [{"prompt_id": 7, "system_prompt": "s", "prompt_template": TEMPLATE,
                                                    "defaults": {"prompt": "p7"}}])
    write_jsonl(tmp_path / "prompts" / "r.jsonl", [{"reviewer_id": "r", "prompt_id": 7, "category": "general",
                                                    "metadata": {"temperature": 0.1, "max_tokens": 10}}])
    ds = load_benchmark("gpt_eval", str(tmp_path / "q.jsonl"),
                        {"baseline_file": "base.jsonl", "prompt_file": "prompts/p.jsonl", "reviewer_file": "prompts/r.jsonl"})
    (sample,) = ds.samples
    assert sample.prompt_text() == "first turn" and sample.metadata["baseline"]["text"] == "a baseline"
    assert sample.metadata["judge"]["defaults"] == {"prompt": "p7"}  # the reviewer's prompt_id, FastChat style


def test_loader_reports_every_question_without_a_baseline_answer_with_its_line(tmp_path):
    root = dj_files(tmp_path / "gpt")
    write_jsonl(root / "answer" / "openai" / "gpt-3.5-turbo.jsonl", [{"question_id": 1, "text": "base-1"}])
    with pytest.raises(DatasetError) as e:
        load_benchmark("gpt_eval", str(root))
    assert "question.jsonl:2: question_id '2' has no answer" in str(e.value) and "5 problem(s)" in str(e.value)


def test_loader_rejects_a_prompt_template_with_an_unknown_field(tmp_path):
    root = dj_files(tmp_path / "gpt")
    write_jsonl(root / "prompt.jsonl", [{"category": "general", "prompt_template": "{question} {answer} {answer_2}",
                                         "defaults": {}}])
    with pytest.raises(DatasetError, match=r"prompt.jsonl:1: prompt_template does not format .*'answer'"):
        load_benchmark("gpt_eval", str(root))


# ---- the judge metric against a scripted judge ---------------------------------------------------------------
def test_win_tie_loss_rates_count_both_orders_retries_and_unparsed_replies_exactly(tmp_path, judge_server, monkeypatch):
    server = judge_server(SCRIPT)
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt")))
    reviews = tmp_path / "reviews.jsonl"
    inp = judge_input(ds, [f"answer-{s.id}" for s in ds.samples], base_url=server.base_url, api_key_env="MY_JUDGE_KEY",
                      reviews_file=str(reviews), **FAST)
    result = compute(["llm_judge"], inp)
    # judged: 1 win (8 vs 6), 2 tie, 3 loss (3 vs 9), 5 win after retries (5 vs 4); 4 unparsed, 6 failed
    v = result.values
    assert (v["win_rate"], v["tie_rate"], v["loss_rate"]) == (0.5, 0.25, 0.25)
    assert v["score"] == pytest.approx((8 + 7 + 3 + 5) / 4) and v["baseline_score"] == pytest.approx((6 + 7 + 9 + 4) / 4)
    assert (v["judged"], v["judge_unparsed"], v["judge_errors"]) == (4, 1, 1)
    assert result.stderr["win_rate"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sample sd of [1, 0, 0, 1] / sqrt(4)
    assert result.per_category["math"] == {"n": 2, "judged": 2, "judge_unparsed": 0, "judge_errors": 0,
                                           "win_rate": 0.5, "tie_rate": 0.5, "loss_rate": 0.0, "score": 6.0,
                                           "baseline_score": 5.5}
    assert result.per_category["writing"]["judged"] == 2 and result.per_category["writing"]["judge_errors"] == 1
    assert result.per_category["coding"] == {"n": 1, "judged": 0, "judge_unparsed": 1, "judge_errors": 0}
    log = server.requests()
    per_rule = [sum(1 for r in log if r["rule"] == i) for i in range(len(SCRIPT["rules"]))]
    assert per_rule == [1, 1, 1, 1, 1, 1, 1, 1, 2, 3, 3, 1]  # max_retries 2: three attempts for the lasting 500
    first = next(r for r in log if r["rule"] == 2)  # question 2 is math: its prompt and reviewer
    assert first["messages"] == [{"role": "system", "content": "You judge math."},
                                 {"role": "user", "content": "Q: question 2?\nA1: answer-2\nA2: base-2\nmath rules"}]
    assert (first["model"], first["temperature"], first["max_tokens"]) == ("judge-model", 0.0, 32)
    assert first["authorization"] == "Bearer sk-test"
    rows = {r["sample_id"]: r for r in map(json.loads, reviews.read_text().splitlines())}
    assert rows["1"]["result"] == "win" and rows["4"]["result"] is None and rows["6"]["reviews"][0]["error"]


def test_every_judge_request_failing_leaves_no_metric_rather_than_a_number(tmp_path, judge_server):
    server = judge_server({"rules": [{"contains": "", "replies": [{"status": 503}]}]})
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt")))
    result = compute(["llm_judge"], judge_input(ds, ["x"] * 6, base_url=server.base_url, **FAST))
    assert result.values == {}
    assert result.unavailable["llm_judge"].startswith("all 12 judge request(s) failed after retries; first error: HTTP 503")


def test_a_judge_that_refuses_the_request_is_not_retried(tmp_path, judge_server):
    server = judge_server({"rules": [{"contains": "", "replies": [{"status": 401}]}]})
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt", questions=[("1", "writing")])))
    result = compute(["llm_judge"], judge_input(ds, ["x"], base_url=server.base_url, **FAST))
    assert "HTTP 401" in result.unavailable["llm_judge"] and len(server.requests()) == 2  # one per order


def test_only_unparseable_replies_give_counts_and_no_win_rate(tmp_path, judge_server):
    server = judge_server({"rules": [{"contains": "", "replies": ["what a lovely day"]}]})
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt")))
    result = compute(["llm_judge"], judge_input(ds, ["x"] * 6, base_url=server.base_url, swap=False, **FAST))
    assert result.values == {"judged": 0, "judge_unparsed": 6, "judge_errors": 0}
    assert len(server.requests()) == 6  # swap: false -> one order per question


def test_unreachable_judge_counts_as_errors_after_retries(tmp_path):
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt", questions=[("1", "writing")])))
    inp = judge_input(ds, ["x"], base_url="http://127.0.0.1:9/v1", **FAST)  # port 9 (discard): nothing listens
    result = compute(["llm_judge"], inp)
    assert "cannot reach http://127.0.0.1:9/v1/chat/completions" in result.unavailable["llm_judge"]


def test_evaluation_stage_fails_with_the_judge_error_when_no_request_got_through(tmp_path, venvs):
    from evaluator.common.contracts import StageJob
    from evaluator.common.records import RunResult, write_results

    root = dj_files(tmp_path / "gpt", questions=[("1", "writing"), ("2", "math")])
    out = tmp_path / "out"
    write_results(str(out / "predictions.jsonl"), [RunResult(sample_id=q, dataset_id="gpt", backend="hf", run_config={},
                                                             request_messages=[], response={"text": "hi"}) for q in "12"])
    job = StageJob(stage="evaluation", run="tiny", iteration=1, checkpoint="/ckpt", output_dir=str(out),
                   benchmark={"name": "gpt", "type": "gpt_eval", "dataset": str(root), "metrics": ["llm_judge"],
                              "metric_options": {"llm_judge": {"base_url": "http://127.0.0.1:9/v1", **FAST}}})
    job.write(str(out / "eval.job.json"))
    proc = subprocess.run([venvs["evaluation"], "-m", "evaluator.stages.evaluation", "--job", str(out / "eval.job.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and not (out / "metrics.json").exists()
    assert "no metric could be computed: llm_judge: all 4 judge request(s) failed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_judge_option_is_a_user_error(tmp_path):
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt", questions=[("1", "writing")])))
    with pytest.raises(EvaluatorError, match="unknown option.*max_concurrancy"):
        compute(["llm_judge"], judge_input(ds, ["x"], max_concurrancy=2))


# ---- --eval-type gpt: the gpt_evaluation: section becomes a gpt_eval benchmark ----------------------------------
def dj_config(tmp_path, judge_url, **extra) -> str:
    dj_files(tmp_path / "gpt")
    cfg = {"auto_eval": {
        "project_name": "proj", "model_name": "tiny", "cache_dir": str(tmp_path / "cache"),
        "megatron": {"max_tokens": 8},
        "watch": {"paths": [str(tmp_path / "ckpt")], "layout": "huggingface", "settle_seconds": 0.2,
                  "poll_seconds": 0.5},
        "executor": {"gpus": [], "max_attempts": 1, "backoff_seconds": 0.1},
        "gpt_evaluation": {"openai_api_key": "sk-from-config", "question_file": "gpt/question.jsonl",
                           "baseline_file": "gpt/answer/openai/gpt-3.5-turbo.jsonl",
                           "prompt_file": "gpt/prompt.jsonl", "reviewer_file": "gpt/reviewer.jsonl",
                           "answer_file": "unused.jsonl", "result_file": "unused_reviews.jsonl",
                           "base_url": judge_url, "worker_num": 2, "max_retry": 2, **extra}}}
    path = tmp_path / "dj.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_eval_type_gpt_turns_the_gpt_evaluation_section_into_one_gpt_eval_benchmark(tmp_path):
    from evaluator.daemon.config import load_config
    from evaluator.daemon.eval_types import JUDGE_API_KEY_ENV, apply_eval_type

    cfg = load_config(dj_config(tmp_path, "http://judge.example/v1"))
    saved = os.environ.pop(JUDGE_API_KEY_ENV, None)
    try:
        apply_eval_type(cfg, "gpt")
        assert os.environ[JUDGE_API_KEY_ENV] == "sk-from-config"
    finally:
        os.environ.pop(JUDGE_API_KEY_ENV, None)
        if saved is not None:
            os.environ[JUDGE_API_KEY_ENV] = saved
    (bench,) = cfg.benchmarks
    assert (bench.name, bench.type, bench.dataset) == ("gpt_eval", "gpt_eval", str(tmp_path / "gpt" / "question.jsonl"))
    assert bench.options["baseline_file"] == str(tmp_path / "gpt" / "answer" / "openai" / "gpt-3.5-turbo.jsonl")
    assert bench.generation == {"max_new_tokens": 8} and bench.metrics == ["llm_judge"]
    judge = bench.metric_options["llm_judge"]
    assert judge == {"reviews_file": "judge_reviews.jsonl", "max_concurrency": 2, "max_retries": 2,
                     "base_url": "http://judge.example/v1", "api_key_env": JUDGE_API_KEY_ENV}
    assert "sk-from-config" not in json.dumps(bench.model_dump())  # the key never lands in a job file


def test_eval_type_gpt_without_its_files_is_a_one_line_error(tmp_path):
    cfg = dj_config(tmp_path, "http://judge.example/v1", question_file="gpt/nope.jsonl")
    proc = run_cli("--config", cfg, "--eval-type", "gpt", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "auto_eval.gpt_evaluation.question_file: no such file" in proc.stderr


# ---- real judges and the whole daemon path (slow) -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny-chat"
    subprocess.run([os.path.join(VENVS, "inference", "bin", "python"), MAKE_TINY_LM, str(out), "--arch", "llama",
                    "--chat-template", "--train-steps", "30"], check=True, capture_output=True, timeout=300)
    return str(out)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_replies_of_a_real_tiny_judge_behind_transformers_serve_are_counted_unparsed(tmp_path, tiny_chat_lm):
    """A tiny random chat model served by `transformers serve` answers gibberish: every review is a real reply,
    parsed by the same rule, counted as unparsed, and the metric says so instead of scoring it."""
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([os.path.join(VENVS, "inference", "bin", "transformers"), "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", tiny_chat_lm],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not get healthy"
            time.sleep(0.5)
        ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt", questions=[("1", "writing"), ("2", "math")])))
        reviews = tmp_path / "reviews.jsonl"
        inp = judge_input(ds, ["The sky is blue.", "Four."], base_url=f"http://127.0.0.1:{port}/v1",
                          model=tiny_chat_lm, max_tokens=12, max_concurrency=1, reviews_file=str(reviews), **FAST)
        result = compute(["llm_judge"], inp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    replies = [rv for row in map(json.loads, reviews.read_text().splitlines()) for rv in row["reviews"]]
    assert len(replies) == 4 and all(rv["error"] is None and isinstance(rv["reply"], str) for rv in replies)
    assert [rv["scores"] for rv in replies] == [list(parse_scores(rv["reply"]) or []) or None for rv in replies]
    unparsed = sum(rv["scores"] is None for rv in replies)
    assert result.values["judge_unparsed"] == unparsed and result.values["judge_errors"] == 0
    assert unparsed == 4 and "win_rate" not in result.values  # gibberish is never turned into a score


def hf_checkpoint(tmp_path, model_dir, step=1000) -> str:
    dst = tmp_path / "ckpt" / f"checkpoint-{step}"
    shutil.copytree(model_dir, dst)
    return str(dst)


@pytest.mark.slow
def test_daemon_eval_type_gpt_scores_a_tiny_checkpoint_against_the_baseline(tmp_path, tiny_chat_lm, judge_server, venvs):
    # the scripted judge prefers the checkpoint on questions 1-3 in both orders, ties 4 and 5, and never parses 6
    rules = []
    for q, (a, b) in {"1": (8, 5), "2": (9, 2), "3": (6, 4), "4": (5, 5), "5": (3, 3)}.items():
        rules += [{"contains": f"A2: base-{q}", "replies": [f"{a} {b}\nreason"]},
                  {"contains": f"A1: base-{q}", "replies": [f"{b},{a}"]}]
    rules.append({"contains": "base-6", "replies": ["no idea"]})
    server = judge_server({"rules": rules})
    hf_checkpoint(tmp_path, tiny_chat_lm)
    cfg = dj_config(tmp_path, server.base_url)
    run_cli("--config", cfg, "--eval-type", "gpt", "--once", timeout=300, check=0)
    out = tmp_path / "cache" / "results" / "tiny" / "iter_0001000" / "gpt_eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == "gpt_eval" and metrics["iteration"] == 1000 and metrics["n"] == 6
    m = metrics["metrics"]
    assert (m["win_rate"], m["tie_rate"], m["loss_rate"]) == (0.6, 0.4, 0.0)
    assert (m["judged"], m["judge_unparsed"], m["judge_errors"]) == (5, 2, 0)
    assert m["score"] == pytest.approx((8 + 9 + 6 + 5 + 3) / 5) and "win_rate" in metrics["stderr"]
    assert set(metrics["per_category"]) == {"writing", "math", "coding"}
    # the checkpoint answered every question itself; the judge saw its answers and the baseline's
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(p["status"] == "ok" for p in predictions)
    answer_of = {p["sample_id"]: p["response"]["text"] for p in predictions}
    seen = [r for r in server.requests() if r["rule"] == 0]
    assert seen[0]["messages"][-1]["content"] == f"Q: question 1?\nA1: {answer_of['1']}\nA2: base-1\ngeneral rules"
    assert all(r["authorization"] == "Bearer sk-from-config" for r in server.requests())
    reviews = [json.loads(line) for line in (out / "judge_reviews.jsonl").read_text().splitlines()]
    assert [r["result"] for r in reviews] == ["win", "win", "win", "tie", "tie", None]
    assert "sk-from-config" not in (out / "eval.job.json").read_text()
    history = [json.loads(line) for line in (tmp_path / "cache" / "results" / "tiny" / "history.jsonl").read_text().splitlines()]
    assert history[0]["metrics"]["win_rate"] == 0.6


def test_mostly_unjudged_questions_report_counts_but_no_rates(tmp_path, judge_server):
    """4 of 6 questions judged is fine at the default limit (0.5); at 0.2 the rates would describe a biased
    remainder, so only the counts are reported."""
    server = judge_server(SCRIPT)
    ds = load_benchmark("gpt_eval", str(dj_files(tmp_path / "gpt")))
    result = compute(["llm_judge"], judge_input(ds, [f"answer-{s.id}" for s in ds.samples], base_url=server.base_url,
                                                max_failure_rate=0.2, **FAST))
    assert "win_rate" not in result.values and "score" not in result.values
    assert (result.values["judged"], result.values["judge_unparsed"], result.values["judge_errors"]) == (4, 1, 1)
    assert "33% of the questions could not be judged" in result.unavailable["llm_judge"]
