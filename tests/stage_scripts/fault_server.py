"""An OpenAI-compatible chat server that fails on purpose, for the openai backend's tests (stdlib only).

    python fault_server.py --port-file F --log L [--script JSON]

The script maps a marker (a substring of the last user message) to the actions for that sample's 1st, 2nd, ...
request; later requests, and samples matching no marker, get "*"'s actions, then "ok":
    {"s1": [429, "ok"], "s2": [500, 500, 500], "s3": ["slow:2"], "s4": ["malformed"], "*": ["ok"]}
Actions: "ok"; an HTTP status (429 carries `Retry-After: <retry_after>` when the script sets "retry_after");
"slow:SECONDS" (sleep, then answer); "malformed" (200 with a body that is not JSON).
The answer text is "echo <n_messages>: <last user text>"; usage counts words.
Every request is appended to the log as one JSON line: t (arrival, time.time()), path, marker, n (the marker's
request number), action, headers, body. The chosen port is written to --port-file once listening.
"""
import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def last_user_text(messages) -> str:
    for m in reversed(messages or []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fault-server/1"

    def log_message(self, *args):  # the JSONL log is the record; keep stderr quiet
        pass

    def _send(self, status: int, payload: bytes, headers=None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _record(self, **entry) -> None:
        entry = {"t": entry.pop("t"), "path": self.path, **entry, "headers": dict(self.headers.items())}
        with self.server.log_lock:
            with open(self.server.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def do_GET(self):
        t = time.time()
        self._record(t=t, marker=None, n=0, action="models")
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fault-model", "object": "model"}]}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self):
        t = time.time()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        text = last_user_text(body.get("messages"))
        script = self.server.script
        marker = next((m for m, v in script.items() if m != "*" and isinstance(v, list) and m in text), None)
        actions = script.get(marker, []) if marker else []
        key = marker or text
        with self.server.log_lock:
            n = self.server.counts.get(key, 0)
            self.server.counts[key] = n + 1
        action = actions[n] if n < len(actions) else (script.get("*") or ["ok"])[0]
        self._record(t=t, marker=marker, n=n + 1, action=action, body=body)
        if isinstance(action, int):
            headers = {}
            if action == 429 and "retry_after" in script:
                headers["Retry-After"] = str(script["retry_after"])
            self._send(action, json.dumps({"error": {"message": f"scripted {action}", "code": action}}).encode(),
                       headers)
            return
        if action == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "trunc')
            return
        if isinstance(action, str) and action.startswith("slow:"):
            time.sleep(float(action.split(":", 1)[1]))
        messages = body.get("messages") or []
        answer = f"echo {len(messages)}: {text}"
        prompt_words = sum(len(last_user_text([m]).split()) for m in messages)
        usage = {"prompt_tokens": prompt_words, "completion_tokens": len(answer.split()),
                 "total_tokens": prompt_words + len(answer.split())}
        payload = {"id": "chatcmpl-fault", "object": "chat.completion", "model": body.get("model"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop"}], "usage": usage}
        self._send(200, json.dumps(payload).encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--script", default="{}", help="JSON (see the module docstring)")
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.script = json.loads(args.script)
    server.log_path, server.log_lock, server.counts = args.log, threading.Lock(), {}
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
