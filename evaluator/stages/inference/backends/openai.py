"""`openai` backend: any OpenAI-compatible /v1/chat/completions endpoint (OpenAI, `vllm serve`, `transformers serve`).

- Endpoint: `base_url` (ending in /v1, as the OpenAI client takes it) or env OPENAI_BASE_URL; `api_key` or env
  OPENAI_API_KEY, sent as `Authorization: Bearer`, never written anywhere (it is scrubbed from error messages).
  Without either base_url, a local checkpoint directory is served for the run (`serve.py`: vLLM on CUDA, else
  `transformers serve`) and stopped by close(); `serve: true` forces that.
- Requests: the sample's messages as they are (multi-turn histories included); text parts -> {"type": "text"},
  audio parts -> {"type": "input_audio"} (base64 wav/mp3; other formats are re-encoded to wav). max_new_tokens ->
  max_tokens, temperature (0 = greedy), top_p, stop; `request_defaults` are extra body fields under those.
- Up to `max_concurrency` requests in flight (threads); `rate_limit` requests/s across all of them (a shared
  token bucket of one token: requests start at least 1/rate apart, retries included).
- Retries: 408/409/429/5xx, timeouts, connection errors and unreadable 200 bodies are retried up to
  `max_retries` times with exponential backoff and full jitter (Retry-After wins when the server sends it);
  other 4xx are not retried. Each request carries `X-Request-Id: <trace_prefix>-<sample_id>-<attempt>`.
- A sample's row: response{text, usage, finish_reason, model, trace_id}, latency_ms of the request that answered
  (or failed last), attempts = requests sent, error{type, message, retryable} when it failed.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Optional

from evaluator.common.records import ERROR, RunError, RunResult

from ..params import COMMON_GENERATION, GenerationParams, Progress, apply_stop
from . import ModelLoadError

RETRY_STATUS = {408, 409, 429}  # and every 5xx
RETRY_AFTER_MAX_S = 120.0  # a Retry-After beyond this is waited this long, then retried
ERROR_BODY_CHARS = 500
SERVE_FALSE = (False, "false", "no", "0", 0)


def log(msg: str) -> None:
    print(f"[inference] openai: {msg}", file=sys.stderr, flush=True)


@dataclass
class ClientOptions:
    """backend_options of the openai backend (see docs/backends.md)."""

    base_url: Optional[str] = None
    api_key: Optional[str] = None
    api_key_env: Optional[str] = None  # name of the environment variable holding the key (what configs should use)
    model: Optional[str] = None
    serve: Optional[bool] = None  # None: serve when the model is a local directory and no base_url is known
    server: str = "auto"  # auto | vllm | transformers
    serve_timeout: float = 600.0
    serve_args: list = field(default_factory=list)
    serve_log: Optional[str] = None
    serve_port: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    max_concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 3
    retry_backoff: float = 1.0
    retry_backoff_max: float = 30.0
    rate_limit: Optional[float] = None
    trace_prefix: str = "eval"
    request_defaults: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: dict) -> "ClientOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known - {"batch_size"})  # batch_size: the stage's generic option
        if unknown:
            raise ModelLoadError(f"backend_options: unknown option(s) {', '.join(unknown)} for the openai backend; "
                                 f"known: {', '.join(sorted(known))}")
        out = cls(**{k: v for k, v in options.items() if k in known})
        try:
            out.max_concurrency = int(out.max_concurrency)
            out.timeout = float(out.timeout)
            out.max_retries = int(out.max_retries)
            out.retry_backoff = float(out.retry_backoff)
            out.retry_backoff_max = float(out.retry_backoff_max)
            out.serve_timeout = float(out.serve_timeout)
            out.rate_limit = float(out.rate_limit) if out.rate_limit not in (None, "", 0) else None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"backend_options: {e}") from None
        if out.serve is not None:
            out.serve = out.serve not in SERVE_FALSE
        checks = [("max_concurrency", out.max_concurrency >= 1), ("timeout", out.timeout > 0),
                  ("max_retries", out.max_retries >= 0), ("rate_limit", out.rate_limit is None or out.rate_limit > 0),
                  ("request_defaults", isinstance(out.request_defaults, dict))]
        for name, good in checks:
            if not good:
                raise ModelLoadError(f"backend_options.{name}: invalid value {getattr(out, name)!r}")
        return out


class RateLimiter:
    """A token bucket holding one token, shared by all request threads: request starts are >= 1/rate apart."""

    def __init__(self, rate: Optional[float]):
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next_at)
            self.next_at = at + self.interval
        if at > now:
            time.sleep(at - now)


class RequestFailed(Exception):
    def __init__(self, type_: str, message: str, retryable: bool, retry_after: Optional[float] = None):
        super().__init__(message)
        self.type, self.message, self.retryable, self.retry_after = type_, message, retryable, retry_after


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def header_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:-]", "_", text)


def audio_part(path: str) -> dict:
    """An OpenAI input_audio part; wav/mp3 bytes go as they are, anything else is decoded and sent as wav."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in ("wav", "mp3"):
        with open(path, "rb") as f:
            data, fmt = f.read(), ext
    else:
        import soundfile  # decodes flac/ogg/...; a missing file raises here and fails only this sample
        audio, rate = soundfile.read(path, always_2d=False)
        buf = io.BytesIO()
        soundfile.write(buf, audio, rate, format="WAV")
        data, fmt = buf.getvalue(), "wav"
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt}}


def to_openai_messages(messages: list) -> list:
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "text", "text": p["text"]} if p.get("type") == "text" else audio_part(p["path"])
                       for p in content]
        out.append({**m, "content": content})
    return out


class OpenAIBackend:
    name = "openai"
    OPTIONS = tuple(ClientOptions.__dataclass_fields__) + ("batch_size",)  # batch_size: the stage's generic option
    # generation: the Chat Completions body fields of the OpenAI API. Others are a server's own: OpenAI answers 400,
    # `transformers serve` 422, only `vllm serve` takes top_k, stop_token_ids, ... (transformers serve also ignores
    # presence_penalty and maps frequency_penalty onto repetition_penalty: docs/backends.md)
    GENERATION = COMMON_GENERATION + ("presence_penalty", "frequency_penalty", "n")
    GENERATION_HINT = "a field only your server knows goes in backend_options.request_defaults, sent as it is"

    # what decides the endpoint (and the server we start): a warm worker reuses a loaded backend only when these
    # are unchanged (inference/stage.py WarmBackend); everything else is per benchmark (`reconfigure`)
    LOAD_OPTIONS = ("base_url", "api_key", "api_key_env", "model", "serve", "server", "serve_timeout", "serve_args",
                    "serve_log", "serve_port", "device", "dtype")

    def __init__(self, model: str, options: dict, params: GenerationParams, seed: int = 0,
                 alias: Optional[str] = None):
        self.model, self.raw_options, self.params, self.seed, self.alias = model, dict(options), params, seed, alias
        self.server = None
        self.api_key: Optional[str] = None

    def reconfigure(self, params: GenerationParams, options: dict) -> None:
        """The next benchmark on the same endpoint (a self-served checkpoint stays up): its generation parameters
        and client options (concurrency, timeouts, retries, request_defaults)."""
        self.params, self.raw_options = params, dict(options)
        endpoint = {k: getattr(self.opts, k) for k in self.LOAD_OPTIONS}
        self.opts = ClientOptions.from_dict(self.raw_options)
        for k, v in endpoint.items():  # unchanged by definition (LOAD_OPTIONS is the reuse key); keep what load saw
            setattr(self.opts, k, v)
        self.limiter = RateLimiter(self.opts.rate_limit)

    # ---- connecting --------------------------------------------------------------------------------------------
    def load(self) -> dict:
        self.opts = ClientOptions.from_dict(self.raw_options)
        # a local checkpoint is served unless the benchmark itself names an endpoint: OPENAI_BASE_URL in the
        # environment (e.g. set for a judge) must not send a checkpoint's samples to some other model
        local = os.path.isdir(self.model)
        base_url = self.opts.base_url or (None if local else os.environ.get("OPENAI_BASE_URL"))
        serve = self.opts.serve if self.opts.serve is not None else (not base_url and local)
        if serve:
            self.server = self._start_server()
            base_url, model_name = self.server.base_url, self.server.model_name  # the name it is pinned to
            self.api_key = self.opts.api_key  # a user's OpenAI key from the environment stays off our own server
        else:
            if not base_url:
                raise ModelLoadError(f"backend openai: no endpoint for model {self.model!r}: set backend_options "
                                     "base_url (or OPENAI_BASE_URL), or pass a local checkpoint directory to serve")
            model_name = self.opts.model or self.model
            if self.opts.api_key_env and not os.environ.get(self.opts.api_key_env):
                raise ModelLoadError(f"backend_options.api_key_env: environment variable {self.opts.api_key_env} "
                                     "is not set")
            self.api_key = (self.opts.api_key or (os.environ.get(self.opts.api_key_env) if self.opts.api_key_env
                                                  else None) or os.environ.get("OPENAI_API_KEY"))
        self.base_url, self.model_name = base_url.rstrip("/"), model_name
        self.limiter = RateLimiter(self.opts.rate_limit)
        listed = None
        if self.server is None:  # our own server answered /health already
            listed = self._check_endpoint()
        info = {"base_url": self.base_url, "model": self.model_name, "api_key_set": bool(self.api_key),
                "max_concurrency": self.opts.max_concurrency, "timeout": self.opts.timeout,
                "max_retries": self.opts.max_retries, "rate_limit": self.opts.rate_limit,
                "trace_prefix": self.opts.trace_prefix}
        if listed is not None:
            info["endpoint_models"] = listed[:20]
        if self.server is not None:
            info.update(served_by=f"{self.server.kind} serve", server_pid=self.server.pid,
                        server_command=self.server.command)
        return info

    def _start_server(self):
        from .. import serve
        opts = self.opts
        try:
            return serve.start_server(self.model, opts.server, self.seed,
                                      {"serve_args": opts.serve_args, "serve_log": opts.serve_log,
                                       "serve_port": opts.serve_port, "device": opts.device, "dtype": opts.dtype},
                                      health_timeout=opts.serve_timeout, log=log)
        except serve.ServerError as e:
            raise ModelLoadError(f"backend openai: {e}") from None

    def _check_endpoint(self) -> Optional[list]:
        """GET /models: unreachable or a rejected key fails the load; other answers only inform."""
        headers = self._headers(f"{header_safe(self.opts.trace_prefix)}-models")
        req = urllib.request.Request(self.base_url + "/models", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=min(self.opts.timeout, 30.0)) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise ModelLoadError(f"backend openai: {self.base_url} rejected the API key (HTTP {e.code}): "
                                     f"{self._scrub(_body_excerpt(e))}") from None
            hint = " (base_url usually ends in /v1)" if e.code == 404 and not self.base_url.endswith("/v1") else ""
            log(f"GET {self.base_url}/models answered HTTP {e.code}{hint}; going on")
            return None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ModelLoadError(f"backend openai: cannot reach {self.base_url}: {reason}") from None
        except json.JSONDecodeError:
            return None
        listed = [m.get("id") for m in (data.get("data") or []) if isinstance(m, dict)] \
            if isinstance(data, dict) else []
        if listed and self.model_name not in listed:
            log(f"model {self.model_name!r} is not among the endpoint's models {listed[:10]}; "
                "set backend_options.model if requests fail")
        return listed

    # ---- running -----------------------------------------------------------------------------------------------
    def run(self, samples: list, dataset_id: str, progress: Progress) -> list:
        run_config = {"model": self.model_name, "backend": self.name, "base_url": self.base_url, "seed": self.seed,
                      "params": self.params.to_dict(), "request_defaults": self.opts.request_defaults}
        results: list[Optional[RunResult]] = [None] * len(samples)
        with ThreadPoolExecutor(max_workers=self.opts.max_concurrency, thread_name_prefix="openai") as pool:
            futures = {pool.submit(self._run_sample, s, dataset_id, run_config): i for i, s in enumerate(samples)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress.update(1)
        return results

    def request_body(self, messages: list) -> dict:
        body = dict(self.opts.request_defaults)
        body.update(model=self.model_name, messages=messages, max_tokens=self.params.max_new_tokens,
                    temperature=max(self.params.temperature, 0.0))
        if not self.params.greedy:
            body["seed"] = self.seed
            if self.params.top_p != 1.0:
                body["top_p"] = self.params.top_p
        if self.params.stop:
            body["stop"] = list(self.params.stop)
        body.update(self.params.extra)
        return body

    def _run_sample(self, sample, dataset_id: str, run_config: dict) -> RunResult:
        base = {"sample_id": sample.id, "dataset_id": dataset_id, "backend": self.name, "run_config": run_config,
                "request_messages": sample.messages}
        try:
            body = json.dumps(self.request_body(to_openai_messages(sample.messages))).encode("utf-8")
        except (OSError, RuntimeError, ValueError, ImportError) as e:  # unreadable audio fails this sample only
            return RunResult(**base, status=ERROR, attempts=0,
                             error=RunError(type=type(e).__name__, message=str(e)[:2000], retryable=False))
        attempt = 0
        while True:
            attempt += 1
            trace_id = f"{header_safe(self.opts.trace_prefix)}-{header_safe(sample.id)}-{attempt}"
            self.limiter.wait()
            t0 = time.perf_counter()
            try:
                response = self._post(body, trace_id)
            except RequestFailed as e:
                latency = round((time.perf_counter() - t0) * 1000, 3)
                if not e.retryable or attempt > self.opts.max_retries:
                    return RunResult(**base, response={"text": "", "usage": {}, "trace_id": trace_id},
                                     status=ERROR, latency_ms=latency, attempts=attempt,
                                     error=RunError(type=e.type, message=self._scrub(e.message),
                                                    retryable=e.retryable))
                time.sleep(self._backoff(attempt, e.retry_after))
                continue
            response["text"] = apply_stop(response["text"], self.params.stop).strip()
            response["trace_id"] = trace_id
            return RunResult(**base, response=response, latency_ms=round((time.perf_counter() - t0) * 1000, 3),
                             attempts=attempt)

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_MAX_S)
        return random.uniform(0, min(self.opts.retry_backoff_max, self.opts.retry_backoff * 2 ** (attempt - 1)))

    def _headers(self, trace_id: str) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "X-Request-Id": trace_id}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _post(self, body: bytes, trace_id: str) -> dict:
        """One request -> {text, usage, finish_reason, model}; raises RequestFailed saying whether to retry."""
        req = urllib.request.Request(self.base_url + "/chat/completions", data=body, method="POST",
                                     headers=self._headers(trace_id))
        try:
            with urllib.request.urlopen(req, timeout=self.opts.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            retryable = e.code in RETRY_STATUS or e.code >= 500
            raise RequestFailed("HTTPError", f"HTTP {e.code}: {_body_excerpt(e)}", retryable,
                                parse_retry_after(e.headers.get("Retry-After")) if retryable else None) from None
        except TimeoutError:
            raise RequestFailed("Timeout", f"no answer within {self.opts.timeout}s", True) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise RequestFailed("Timeout", f"no answer within {self.opts.timeout}s", True) from None
            raise RequestFailed("ConnectionError", f"{self.base_url}: {e.reason}", True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise RequestFailed("ConnectionError", f"{self.base_url}: {type(e).__name__}: {e}", True) from None
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed("BadResponse", f"not a chat completion: {raw[:ERROR_BODY_CHARS]!r}", True) from None
        usage = data.get("usage") or {}
        return {"text": text if isinstance(text, str) else str(text),
                "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage},
                "finish_reason": choice.get("finish_reason"), "model": data.get("model")}

    def _scrub(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            code = server.stop()
            log(f"{server.kind} serve (pid {server.pid}) stopped (exit {code})")


def _body_excerpt(e: urllib.error.HTTPError) -> str:
    try:
        return e.read()[:ERROR_BODY_CHARS].decode("utf-8", "replace").strip()
    except OSError:
        return ""
