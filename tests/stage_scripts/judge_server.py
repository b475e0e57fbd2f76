"""A scripted OpenAI-compatible judge for the tests: replies chosen by what the request's user message contains.

    python judge_server.py SCRIPT.json [--log REQUESTS.jsonl]

SCRIPT.json: {"rules": [{"contains": "A2: base-q1", "replies": ["8 6\\nbecause ...", {"status": 500}, ...]}],
              "default": "no rule matched"}
The first rule whose `contains` is in the last user message answers; each matching request takes the rule's next
reply and the last one repeats once they run out. A reply is the completion's text, or {"status": N} (an HTTP
error), or {"content": "...", "delay": seconds}. Every request is appended to --log as one JSON line
(rule index, reply given). The server binds 127.0.0.1 on a free port and prints `PORT <n>` on stdout once
listening. Standard library only; stopped by SIGTERM.
"""
import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("script")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    with open(args.script, encoding="utf-8") as f:
        script = json.load(f)
    rules = script.get("rules", [])
    used = [0] * len(rules)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, {"status": "ok"} if self.path.endswith("/health") else {"data": [{"id": "judge"}]})

        def do_POST(self):
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            user = [m.get("content", "") for m in data.get("messages", []) if m.get("role") == "user"]
            text = user[-1] if user else ""
            with lock:
                rule = next((i for i, r in enumerate(rules) if r["contains"] in text), None)
                if rule is None:
                    reply = script.get("default", "no rule matched")
                else:
                    replies = rules[rule]["replies"]
                    reply = replies[min(used[rule], len(replies) - 1)]
                    used[rule] += 1
                if args.log:
                    with open(args.log, "a", encoding="utf-8") as log:
                        log.write(json.dumps({"rule": rule, "reply": reply, "model": data.get("model"),
                                              "temperature": data.get("temperature"),
                                              "max_tokens": data.get("max_tokens"),
                                              "authorization": self.headers.get("Authorization"),
                                              "messages": data.get("messages")}) + "\n")
            if isinstance(reply, dict):
                time.sleep(float(reply.get("delay", 0)))
                if "status" in reply:
                    self._send(int(reply["status"]), {"error": {"message": f"scripted {reply['status']}"}})
                    return
                reply = reply.get("content", "")
            self._send(200, {"id": "x", "object": "chat.completion", "model": data.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": reply}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
