"""The openai backend, end to end through tools/bench.py and the inference stage in its venv.

Two real servers: `transformers serve` of a tiny checkpoint (started by the backend itself, the self-serve
path) and tests/stage_scripts/fault_server.py, a stdlib HTTP server that answers 429/500/400, slowly or with
broken JSON on purpose and logs every request it receives (arrival time, headers, body).
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import wave

import pytest

from conftest import DAEMON_PY, ROOT, canonical_dataset, pid_alive, tiny_lm, venvs, wait_until  # noqa: F401

FAULT_SERVER = os.path.join(ROOT, "tests", "stage_scripts", "fault_server.py")
BENCH = os.path.join(ROOT, "tools", "bench.py")
API_KEY = "sk-test-5ecret-d0-not-leak"
FIELDS = {"sample_id", "dataset_id", "backend", "run_config", "request_messages", "response", "status",
          "latency_ms", "attempts", "error"}


class FaultServer:
    """fault_server.py in the background; stopped by PID at teardown."""

    def __init__(self, tmp, script: dict):
        self.log_path, port_file = str(tmp / "requests.jsonl"), str(tmp / "port")
        self.proc = subprocess.Popen([sys.executable, FAULT_SERVER, "--port-file", port_file, "--log", self.log_path,
                                      "--script", json.dumps(script)])
        port = wait_until(lambda: os.path.exists(port_file) and read(port_file), timeout=30, what="fault server port")
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def requests(self, marker=None) -> list:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r["path"].endswith("/chat/completions")]
        return [r for r in rows if marker is None or r["marker"] == marker]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fault_server(tmp_path):
    started = []

    def start(script: dict) -> FaultServer:
        server = FaultServer(tmp_path, script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run_openai(dataset: str, out_root, model="fault-model", options=None, params=None, env=None,
               max_error_rate=None, timeout=240):
    """tools/bench.py inference --backend openai; returns (process, output dir)."""
    cmd = [DAEMON_PY, BENCH, "inference", dataset, "--model", model, "--backend", "openai",
           "--output-root", str(out_root)]
    for key, value in (options or {}).items():
        cmd += ["--backend-opt", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    for key, value in (params or {}).items():
        cmd += ["--param", f"{key}={json.dumps(value)}"]
    if max_error_rate is not None:
        cmd += ["--max-error-rate", str(max_error_rate)]
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})
    name = os.path.basename(model.rstrip("/")) if os.path.isdir(model) else model
    return proc, os.path.join(str(out_root), name, os.path.basename(dataset))


def predictions(out_dir) -> list:
    with open(os.path.join(out_dir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def by_id(rows) -> dict:
    return {r["sample_id"]: r for r in rows}


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def write_wav(path, seconds=0.02, rate=8000) -> bytes:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * int(seconds * rate))
    with open(path, "rb") as f:
        return f.read()


def user(text):
    return [{"role": "user", "content": text}]


# --- a real `transformers serve` of a tiny checkpoint, started and stopped by the backend ------------------------

SERVED_ROWS = [
    {"id": "single", "messages": user("What is two plus two?")},
    {"id": "multi", "messages": [{"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": "Hi there!"},
                                 {"role": "user", "content": "What is two plus two?"}]},
    {"id": "system", "messages": [{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]},
    {"id": "plain", "messages": user("The cat sat on the")},
]


@pytest.fixture(scope="module")
def served_run(tiny_lm, tmp_path_factory):
    model = tiny_lm("llama", chat=True)
    tmp = tmp_path_factory.mktemp("served")
    dataset = canonical_dataset(tmp / "toy", SERVED_ROWS)
    proc, out = run_openai(dataset, tmp / "out", model=model, options={"max_concurrency": 2},
                           params={"max_new_tokens": 8})
    return {"proc": proc, "out": out, "model": model, "dataset": dataset, "tmp": tmp}


@pytest.mark.slow
def test_self_served_checkpoint_answers_single_and_multi_turn_rows(served_run):
    proc, out = served_run["proc"], served_run["out"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = predictions(out)
    assert [r["sample_id"] for r in rows] == [r["id"] for r in SERVED_ROWS]
    for row, source in zip(rows, SERVED_ROWS):
        assert set(row) == FIELDS
        assert row["status"] == "ok" and row["attempts"] == 1 and row["error"] is None
        assert row["request_messages"] == source["messages"]
        usage = row["response"]["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert row["response"]["trace_id"] == f"eval-{row['sample_id']}-1"
        assert row["run_config"]["model"] == served_run["model"]
    rows = by_id(rows)
    # the whole history reached the model: the same last question costs more prompt tokens after two turns
    assert rows["multi"]["response"]["usage"]["prompt_tokens"] > rows["single"]["response"]["usage"]["prompt_tokens"]


@pytest.mark.slow
def test_self_served_server_is_stopped_when_the_stage_ends(served_run):
    assert served_run["proc"].returncode == 0, served_run["proc"].stderr[-4000:]
    meta = json.loads(read(os.path.join(served_run["out"], "run_metadata.json")))
    info = meta["backend_info"]
    assert info["served_by"] == "transformers serve" and info["base_url"].startswith("http://127.0.0.1:")
    assert not pid_alive(info["server_pid"])
    assert meta["usage"]["prompt_tokens"] > 0 and meta["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_self_served_greedy_answers_match_the_hf_backend(served_run):
    """Same checkpoint, same chat template, greedy: `transformers serve` over HTTP and in-process generate()
    give the same text and token counts."""
    assert served_run["proc"].returncode == 0, served_run["proc"].stderr[-4000:]
    out_root = served_run["tmp"] / "hf"
    proc = subprocess.run([DAEMON_PY, BENCH, "inference", served_run["dataset"], "--model", served_run["model"],
                           "--backend", "hf", "--param", "max_new_tokens=8", "--output-root", str(out_root)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hf_rows = predictions(os.path.join(str(out_root), "model", "toy"))
    served = predictions(served_run["out"])
    assert [r["response"]["text"] for r in served] == [r["response"]["text"] for r in hf_rows]
    assert [r["response"]["usage"] for r in served] == [r["response"]["usage"] for r in hf_rows]


@pytest.mark.slow
def test_a_killed_stage_takes_its_server_down(tiny_lm, tmp_path):
    """The daemon's timeout SIGKILLs the stage's process group; the server (in its own group) must follow."""
    rows = [{"id": str(i), "messages": user(f"Tell me a story {i}")} for i in range(200)]
    dataset = canonical_dataset(tmp_path / "toy", rows)
    cmd = [DAEMON_PY, BENCH, "inference", dataset, "--model", tiny_lm("llama", chat=True), "--backend", "openai",
           "--param", "max_new_tokens=64", "--output-root", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    stage = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env=env)
    log = os.path.join(str(tmp_path / "out"), "model", "toy", "infer.stderr.log")
    try:
        found = wait_until(lambda: os.path.exists(log) and re.search(r"'server_pid': (\d+)", read(log)),
                           timeout=180, what="the served model")
        server_pid = int(found.group(1))
        assert pid_alive(server_pid)
    finally:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()
    wait_until(lambda: not pid_alive(server_pid), timeout=30, what=f"server pid {server_pid} to exit")
    os.unlink(re.search(r"\(log (\S+)\)", read(log)).group(1))  # close() never ran to remove it


@pytest.mark.slow
def test_a_server_that_dies_fails_the_load_with_its_log_tail(tiny_lm, tmp_path):
    dataset = canonical_dataset(tmp_path / "toy", [{"id": "a", "messages": user("hi")}])
    proc, out = run_openai(dataset, tmp_path / "out", model=tiny_lm("llama", chat=True),
                           options={"serve_args": "--no-such-flag", "serve_timeout": 120})
    assert proc.returncode == 1
    message = proc.stderr.split("transformers serve exited with code", 1)[1]
    log_path = re.search(r"last lines of (\S+):", message).group(1)
    last_line = read(log_path).strip().splitlines()[-1]
    assert last_line.strip() and last_line in message  # the server's own last words, kept on disk
    assert not os.path.exists(os.path.join(out, "run_metadata.json"))
    os.unlink(log_path)


# --- the fault server: retries, timeouts, trace ids, the key, rate limit ----------------------------------------

SCRIPT = {
    "[429]": [429, "ok"],
    "[5xx]": [500, 502, "ok"],
    "[malformed]": ["malformed", "ok"],
    "[slow]": ["slow:3", "ok"],
    "[bad]": [400, "ok"],
    "[dead]": [503, 503, 503, 503, 503],
}
OPTIONS = {"max_retries": 2, "retry_backoff": 0.05, "timeout": 1.0, "max_concurrency": 4, "trace_prefix": "tp"}


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory, venvs):
    """One stage run against the fault server: 12 samples, 3 of which cannot succeed."""
    tmp = tmp_path_factory.mktemp("scripted")
    server = FaultServer(tmp, SCRIPT)
    wav = tmp / "data" / "beep.wav"
    os.makedirs(wav.parent)
    wav_bytes = write_wav(wav)
    subprocess.run([venvs["inference"], "-c", "import soundfile, numpy; "
                    f"soundfile.write({str(tmp / 'data' / 'beep.flac')!r}, numpy.zeros(160), 8000)"], check=True)
    (tmp / "data" / "broken.ogg").write_bytes(b"not audio at all")
    rows = [{"id": marker.strip("[]"), "messages": user(f"question {marker}")} for marker in SCRIPT]
    rows += [{"id": "ok", "messages": user("plain question")},
             {"id": "multi", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hello"},
                                          {"role": "assistant", "content": "Hi!"},
                                          {"role": "user", "content": "And now?"}]},
             {"id": "audio", "messages": [{"role": "user", "content": [{"type": "audio", "path": "beep.wav"},
                                                                       {"type": "text", "text": "Describe it."}]}]},
             {"id": "flac", "messages": [{"role": "user", "content": [{"type": "text", "text": "Flac?"},
                                                                      {"type": "audio", "path": "beep.flac"}]}]},
             {"id": "broken-audio", "messages": [{"role": "user",
                                                  "content": [{"type": "audio", "path": "broken.ogg"}]}]},
             {"id": "id with spaces/é", "messages": user("odd id")}]
    try:
        dataset = canonical_dataset(tmp / "data", rows)
        proc, out = run_openai(dataset, tmp / "out", options={"base_url": server.base_url, **OPTIONS},
                               params={"max_new_tokens": 16}, env={"OPENAI_API_KEY": API_KEY}, max_error_rate=0.3)
    finally:
        server.stop()
    return {"proc": proc, "out": out, "server": server, "wav_bytes": wav_bytes}


def test_retryable_failures_are_retried_until_an_answer(scripted_run):
    rows = by_id(predictions(scripted_run["out"]))
    for sample_id, attempts in (("429", 2), ("5xx", 3), ("malformed", 2)):
        assert rows[sample_id]["status"] == "ok", rows[sample_id]
        assert rows[sample_id]["attempts"] == attempts
        assert rows[sample_id]["response"]["text"] == f"echo 1: question [{sample_id}]"
        assert len(scripted_run["server"].requests(f"[{sample_id}]")) == attempts


def test_a_request_past_its_timeout_is_retried(scripted_run):
    row = by_id(predictions(scripted_run["out"]))["slow"]
    assert row["status"] == "ok" and row["attempts"] == 2
    assert row["latency_ms"] < 1000  # the answered (second) request, not the one that timed out


def test_exhausted_retries_leave_an_error_row_marked_retryable(scripted_run):
    row = by_id(predictions(scripted_run["out"]))["dead"]
    assert row["status"] == "error" and row["attempts"] == 3  # 1 + max_retries
    assert row["error"]["retryable"] is True and "503" in row["error"]["message"]
    assert len(scripted_run["server"].requests("[dead]")) == 3


def test_a_400_is_not_retried(scripted_run):
    row = by_id(predictions(scripted_run["out"]))["bad"]
    assert row["status"] == "error" and row["attempts"] == 1
    assert row["error"] == {"type": "HTTPError", "message": row["error"]["message"], "retryable": False}
    assert "400" in row["error"]["message"]
    assert len(scripted_run["server"].requests("[bad]")) == 1


def test_a_sample_still_failing_retryably_makes_the_stage_ask_to_run_again(scripted_run):
    """[dead] answers 503 past every retry: scoring it as a wrong answer would draw a dip that is not the
    model's, so the stage exits 75 (retry later), keeps its rows for inspection and writes no run_metadata."""
    proc = scripted_run["proc"]
    assert proc.returncode == 75, proc.stderr[-4000:]
    rows = predictions(scripted_run["out"])
    assert len(rows) == 12 and all(set(r) == FIELDS for r in rows)
    assert not os.path.exists(os.path.join(scripted_run["out"], "run_metadata.json"))
    assert "3/12 samples failed" in proc.stderr and "1/12 samples failed with retryable errors" in proc.stderr


def test_error_rows_below_max_error_rate_let_the_stage_succeed(fault_server, tmp_path):
    server = fault_server({"[bad]": [400]})
    rows = [{"id": "a", "messages": user("question [bad] a")}, {"id": "b", "messages": user("fine b")},
            {"id": "c", "messages": user("fine c")}, {"id": "d", "messages": user("fine d")}]
    dataset = canonical_dataset(tmp_path / "toy", rows)
    proc, out = run_openai(dataset, tmp_path / "out", options={"base_url": server.base_url}, max_error_rate=0.3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads(read(os.path.join(out, "run_metadata.json")))
    assert (meta["n"], meta["n_error"]) == (4, 1)
    assert [r["status"] for r in predictions(out)] == ["error", "ok", "ok", "ok"]


def test_every_request_carries_a_trace_id_and_the_row_records_the_last(scripted_run):
    requests = scripted_run["server"].requests()
    rows = by_id(predictions(scripted_run["out"]))
    sent = {r["headers"]["X-Request-Id"] for r in requests}
    assert {"tp-5xx-1", "tp-5xx-2", "tp-5xx-3", "tp-ok-1", "tp-id_with_spaces__-1"} <= sent
    assert len(sent) == len(requests)
    assert rows["5xx"]["response"]["trace_id"] == "tp-5xx-3"
    assert rows["dead"]["response"]["trace_id"] == "tp-dead-3"


def test_the_api_key_is_sent_as_bearer_and_written_nowhere(scripted_run):
    requests = scripted_run["server"].requests()
    assert requests and all(r["headers"]["Authorization"] == f"Bearer {API_KEY}" for r in requests)
    out = scripted_run["out"]
    for name in ("predictions.jsonl", "infer.stderr.log", "infer.job.json"):
        assert API_KEY not in read(os.path.join(out, name)), name
    assert API_KEY not in scripted_run["proc"].stderr


def test_multi_turn_history_and_audio_go_as_openai_messages(scripted_run):
    bodies = {r["headers"]["X-Request-Id"][len("tp-"):].rsplit("-", 1)[0]: r["body"]
              for r in scripted_run["server"].requests()}
    multi = bodies["multi"]
    assert [m["role"] for m in multi["messages"]] == ["system", "user", "assistant", "user"]
    assert multi["messages"][2]["content"] == "Hi!"
    assert multi["max_tokens"] == 16 and multi["temperature"] == 0 and multi["model"] == "fault-model"
    audio, text = bodies["audio"]["messages"][0]["content"]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    assert base64.b64decode(audio["input_audio"]["data"]) == scripted_run["wav_bytes"]
    assert text == {"type": "text", "text": "Describe it."}
    flac = bodies["flac"]["messages"][0]["content"][1]
    assert flac["input_audio"]["format"] == "wav"  # decoded and re-encoded: FLAC is not an OpenAI input format
    assert base64.b64decode(flac["input_audio"]["data"])[:4] == b"RIFF"
    rows = by_id(predictions(scripted_run["out"]))
    assert rows["multi"]["response"]["text"] == "echo 4: And now?"
    assert rows["audio"]["request_messages"][0]["content"][0]["type"] == "audio"  # the canonical row, no base64


def test_an_unreadable_audio_file_fails_its_sample_without_a_request(scripted_run):
    row = by_id(predictions(scripted_run["out"]))["broken-audio"]
    assert row["status"] == "error" and row["attempts"] == 0 and row["error"]["retryable"] is False
    assert not [r for r in scripted_run["server"].requests() if r["headers"]["X-Request-Id"].startswith("tp-broken")]


def test_retry_after_is_waited_before_the_next_attempt(fault_server, tmp_path):
    server = fault_server({"[a]": [429, "ok"], "retry_after": 1})
    dataset = canonical_dataset(tmp_path / "toy", [{"id": "a", "messages": user("question [a]")}])
    proc, out = run_openai(dataset, tmp_path / "out", options={"base_url": server.base_url, "retry_backoff": 0.01})
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = server.requests("[a]")
    assert second["t"] - first["t"] >= 0.95
    assert predictions(out)[0]["attempts"] == 2


def test_rate_limit_spaces_request_starts_across_threads(fault_server, tmp_path):
    n, rate = 6, 4.0
    server = fault_server({})
    dataset = canonical_dataset(tmp_path / "toy", [{"id": str(i), "messages": user(f"q{i}")} for i in range(n)])
    proc, _ = run_openai(dataset, tmp_path / "out", options={"base_url": server.base_url, "rate_limit": rate,
                                                             "max_concurrency": 4})
    assert proc.returncode == 0, proc.stderr[-4000:]
    arrivals = sorted(r["t"] for r in server.requests())
    assert len(arrivals) == n
    assert arrivals[-1] - arrivals[0] >= (n - 1) / rate - 0.05


def test_an_api_key_option_never_reaches_the_output_files(fault_server, tmp_path):
    server = fault_server({})
    dataset = canonical_dataset(tmp_path / "toy", [{"id": "a", "messages": user("hi")}])
    proc, out = run_openai(dataset, tmp_path / "out", options={"base_url": server.base_url, "api_key": API_KEY})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert server.requests()[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    meta = json.loads(read(os.path.join(out, "run_metadata.json")))
    assert "api_key" not in meta["backend_options"]  # bench.py hands it to the stage in the environment
    for name in ("predictions.jsonl", "run_metadata.json", "infer.stderr.log", "infer.job.json"):
        assert API_KEY not in read(os.path.join(out, name)), name


def test_error_rate_above_max_error_rate_fails_the_stage(fault_server, tmp_path):
    server = fault_server({"[bad]": [400]})
    rows = [{"id": "a", "messages": user("question [bad] a")}, {"id": "b", "messages": user("fine b")},
            {"id": "c", "messages": user("fine c")}, {"id": "d", "messages": user("fine d")}]
    dataset = canonical_dataset(tmp_path / "toy", rows)
    proc, out = run_openai(dataset, tmp_path / "out", options={"base_url": server.base_url}, max_error_rate=0.2)
    assert proc.returncode == 1
    assert "above max_error_rate" in proc.stderr
    assert not os.path.exists(os.path.join(out, "run_metadata.json"))
    assert [r["status"] for r in predictions(out)] == ["error", "ok", "ok", "ok"]  # kept for inspection


def test_an_unreachable_endpoint_fails_the_load(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dataset = canonical_dataset(tmp_path / "toy", [{"id": "a", "messages": user("hi")}])
    proc, out = run_openai(dataset, tmp_path / "out", options={"base_url": f"http://127.0.0.1:{port}/v1"})
    assert proc.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1" in proc.stderr
    assert not os.path.exists(os.path.join(out, "predictions.jsonl"))
