"""`llm_judge`: a judge model behind an OpenAI-compatible endpoint compares each answer with a baseline answer
(Data-Juicer's GPT evaluation, after FastChat's pairwise review).

Per sample the judge gets the prompt template filled with the question, the checkpoint's answer and the baseline
answer, once as (answer, baseline) and, with `swap` (default, as Data-Juicer), once more as (baseline, answer),
so the order the answers appear in cancels out. The sample's `metadata` may carry what the gpt_eval loader puts
there (question, baseline answer, system prompt, template, defaults, reviewer temperature/max_tokens/model);
a plain dataset row is judged against its `target` with the built-in prompt.

Reply parsing (`parse_scores`): the two scores are the first line that is exactly two numbers, separated by a
comma and/or spaces ("8 6", "8, 6", "**8,6**", "Scores: 8 6"), looked for on the first non-empty line (FastChat
asks for them first) and then on the last one (Data-Juicer's prompt asks for them last); text before a
`</think>` is dropped. Anything else is *unparsed*: counted in `judge_unparsed`, never scored as 0/0 (which is
what Data-Juicer did) and never a crash.

A question counts only when every one of its reviews parsed; its score is the mean of the answer's scores over
the orders, likewise the baseline's. Then:
    win_rate / tie_rate / loss_rate   share of judged questions where score >, =, < baseline_score
    score, baseline_score             mean scores over judged questions (stderr: sample std / sqrt(n))
    judged, judge_unparsed, judge_errors   counts: judged questions, unparsed replies, requests that failed
per category as well. Per sample (scores.jsonl) the five have a value for each judged question and None for
the others, compared as {"prediction": the answer, "reference": the baseline answer}; their method label names the
judge model. Requests that still fail after `max_retries` (HTTP 408/409/429/5xx and connection errors
are retried with exponential backoff; other 4xx are not) count in `judge_errors`; when every request failed there
is no metric at all (the stage then fails with the first error) rather than a made-up number.

Options (`metric_options: {llm_judge: {...}}`): base_url (default $OPENAI_BASE_URL, else api.openai.com),
api_key (default: the environment variable named by api_key_env, OPENAI_API_KEY), organization, model (default:
the reviewer file's metadata.model), max_concurrency (4), timeout (s, 120), max_retries (5), retry_backoff (s, 2),
temperature / max_tokens (override the reviewer's), swap (true), reviews_file (write every review as JSON
Lines; a relative path is against the stage's result directory), max_failure_rate (0.5: with more questions
unjudged than this, no rates are reported, only the counts).

Standard library only (urllib): the evaluation venv has no openai client.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from evaluator.common.atomic import write_text_atomic
from evaluator.common.errors import EvaluatorError

from . import JUDGE_OPTIONS as OPTIONS, METRICS, MetricInput, MetricResult
from .stats import category_groups, mean_metric, spread

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# the outputs with a value per judged question (scores.jsonl); judged/judge_unparsed/judge_errors are counts
PER_SAMPLE = ("win_rate", "tie_rate", "loss_rate", "score", "baseline_score")
RETRY_STATUS = (408, 409, 429)
MAX_BACKOFF = 60.0

DEFAULT_SYSTEM_PROMPT = "You are a careful and impartial judge of the quality of answers to a user's question."
DEFAULT_TEMPLATE = ("[Question]\n{question}\n\n"
                    "[The Start of Assistant 1's Answer]\n{answer_1}\n[The End of Assistant 1's Answer]\n\n"
                    "[The Start of Assistant 2's Answer]\n{answer_2}\n[The End of Assistant 2's Answer]\n\n"
                    "[System]\n{prompt}\n")
DEFAULT_INSTRUCTION = (
    "Rate how helpful, relevant, accurate and detailed each assistant's answer is, each on a scale of 1 to 10 "
    "(higher is better). The order in which the answers appear must not influence your rating.\n"
    "On the first line output only the two scores, for Assistant 1 and Assistant 2, separated by a space. "
    "Then explain your rating.")
DEFAULT_JUDGE = {"system_prompt": DEFAULT_SYSTEM_PROMPT, "prompt_template": DEFAULT_TEMPLATE,
                 "defaults": {"prompt": DEFAULT_INSTRUCTION}, "temperature": 0.2, "max_tokens": 1024}

# ---------------------------------------------------------------------------------------------------------------
# parsing the judge's reply

_NUMBER = r"(\d+(?:\.\d+)?)"
_PAIR = re.compile(r"(?:(?i:scores?|ratings?)\s*[:：]\s*)?\(?\s*" + _NUMBER + r"\s*(?:[,;]\s*|\s+)" + _NUMBER
                   + r"\s*\)?\.?")


def _pair(line: str) -> Optional[tuple[float, float]]:
    m = _PAIR.fullmatch(line.replace("*", "").replace("`", "").strip())
    return (float(m.group(1)), float(m.group(2))) if m else None


def parse_scores(reply: str) -> Optional[tuple[float, float]]:
    """(score of Assistant 1, score of Assistant 2) from a judge's reply, or None (see the module docstring)."""
    text = reply.rsplit("</think>", 1)[-1] if "</think>" in reply else reply
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    return _pair(lines[0]) or _pair(lines[-1])


# ---------------------------------------------------------------------------------------------------------------
# settings and prompts

@dataclass
class JudgeSettings:
    base_url: str = DEFAULT_BASE_URL
    api_key: Optional[str] = None
    organization: Optional[str] = None
    model: Optional[str] = None
    max_concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 5
    retry_backoff: float = 2.0
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    swap: bool = True
    reviews_file: Optional[str] = None
    # more questions than this left unjudged (judge errors, unparsed replies): no rates, they would describe a
    # biased remainder; the counts are still reported
    max_failure_rate: float = 0.5

    @classmethod
    def from_options(cls, options: dict) -> "JudgeSettings":
        if not isinstance(options, dict):
            raise EvaluatorError(f"metric_options.llm_judge: expected a mapping, got {options!r:.80}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise EvaluatorError(f"metric_options.llm_judge: unknown option(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(OPTIONS)})")
        out = cls(base_url=str(options.get("base_url") or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL))
        key_env = str(options.get("api_key_env") or "OPENAI_API_KEY")
        out.api_key = options.get("api_key") or os.environ.get(key_env) or None
        out.organization = options.get("organization") or os.environ.get("OPENAI_ORGANIZATION") or None
        out.model = options.get("model")
        try:
            out.max_concurrency = int(options.get("max_concurrency", out.max_concurrency))
            out.timeout = float(options.get("timeout", out.timeout))
            out.max_retries = int(options.get("max_retries", out.max_retries))
            out.retry_backoff = float(options.get("retry_backoff", out.retry_backoff))
            if options.get("temperature") is not None:
                out.temperature = float(options["temperature"])
            if options.get("max_tokens") is not None:
                out.max_tokens = int(options["max_tokens"])
        except (TypeError, ValueError) as e:
            raise EvaluatorError(f"metric_options.llm_judge: {e}") from None
        out.swap = options.get("swap", True) not in (False, "false", "no", 0)
        out.reviews_file = options.get("reviews_file")
        out.max_failure_rate = float(options.get("max_failure_rate", out.max_failure_rate))
        if out.max_concurrency < 1 or out.max_retries < 0 or out.timeout <= 0:
            raise EvaluatorError("metric_options.llm_judge: expected max_concurrency >= 1, max_retries >= 0, timeout > 0")
        return out


@dataclass
class JudgeRequest:
    sample: int  # index into the samples
    order: str  # "answer-first" | "baseline-first"
    model: str
    messages: list
    temperature: float
    max_tokens: int
    reply: Optional[str] = None
    scores: Optional[tuple] = None
    error: Optional[str] = None
    attempts: int = 0


def judge_setup(sample) -> dict:
    """The judge prompt and reviewer settings for a sample: the loader's `metadata.judge`, else the defaults."""
    return {**DEFAULT_JUDGE, **(sample.metadata.get("judge") or {})}


def baseline_text(sample) -> str:
    baseline = sample.metadata.get("baseline")
    if isinstance(baseline, dict) and isinstance(baseline.get("text"), str):
        return baseline["text"]
    if sample.target is not None:
        return sample.target
    raise EvaluatorError(f"llm_judge: sample {sample.id!r} has no baseline answer (metadata.baseline.text) "
                         "and no target to compare with")


def build_requests(index: int, sample, answer: str, settings: JudgeSettings) -> list[JudgeRequest]:
    """The judge requests for one sample: (answer, baseline), then with `swap` (baseline, answer)."""
    setup = judge_setup(sample)
    question = sample.metadata.get("question") or sample.prompt_text()
    baseline = baseline_text(sample)
    model = settings.model or setup.get("model")
    if not model:
        raise EvaluatorError("llm_judge: no judge model; set metric_options.llm_judge.model "
                             "(or metadata.model in the reviewer file)")
    orders = [("answer-first", answer, baseline)]
    if settings.swap:
        orders.append(("baseline-first", baseline, answer))
    out = []
    for order, first, second in orders:
        try:
            user = setup["prompt_template"].format(question=question, answer_1=first, answer_2=second,
                                                   **(setup.get("defaults") or {}))
        except (KeyError, IndexError, ValueError) as e:
            raise EvaluatorError(f"llm_judge: sample {sample.id!r}: the prompt template does not format "
                                 f"({type(e).__name__}: {e}); it may use {{question}}, {{answer_1}}, {{answer_2}} "
                                 "and the keys of its `defaults`") from None
        messages = ([{"role": "system", "content": setup["system_prompt"]}] if setup.get("system_prompt") else [])
        messages.append({"role": "user", "content": user})
        temperature = settings.temperature if settings.temperature is not None else setup.get("temperature", 0.2)
        max_tokens = settings.max_tokens if settings.max_tokens is not None else setup.get("max_tokens", 1024)
        out.append(JudgeRequest(index, order, str(model), messages, float(temperature), int(max_tokens)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the endpoint

class JudgeCallError(Exception):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class ChatClient:
    """POST {base_url}/chat/completions with urllib; one call = one attempt."""

    settings: JudgeSettings

    def complete(self, req: JudgeRequest) -> str:
        body = json.dumps({"model": req.model, "messages": req.messages, "temperature": req.temperature,
                           "max_tokens": req.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        if self.settings.organization:
            headers["OpenAI-Organization"] = self.settings.organization
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace").strip()
            retryable = e.code in RETRY_STATUS or e.code >= 500
            raise JudgeCallError(f"HTTP {e.code} from {url}: {detail}", retryable) from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated bodies
            reason = getattr(e, "reason", e)
            raise JudgeCallError(f"cannot reach {url}: {reason}", True) from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise JudgeCallError(f"{url}: not an OpenAI chat completion response: {raw[:200]!r}", True) from None
        return content if isinstance(content, str) else ""

    def run(self, req: JudgeRequest) -> None:
        """Fill req.reply (or req.error after the retries); never raises."""
        delay = self.settings.retry_backoff
        for attempt in range(1, self.settings.max_retries + 2):
            req.attempts = attempt
            try:
                req.reply = self.complete(req)
                req.error = None
                return
            except JudgeCallError as e:
                req.error = str(e)
                if not e.retryable or attempt > self.settings.max_retries:
                    return
            time.sleep(min(delay, MAX_BACKOFF))
            delay *= 2


# ---------------------------------------------------------------------------------------------------------------
# the metric

def _log(msg: str) -> None:
    print(f"[llm_judge] {msg}", file=sys.stderr, flush=True)


def run_requests(requests: list[JudgeRequest], settings: JudgeSettings) -> None:
    client = ChatClient(settings)
    with ThreadPoolExecutor(max_workers=settings.max_concurrency) as pool:
        list(pool.map(client.run, requests))
    for req in requests:
        if req.reply is not None:
            req.scores = parse_scores(req.reply)


def _outcomes(inp: MetricInput, requests: list[JudgeRequest]) -> list[Optional[tuple[float, float]]]:
    """Per sample: (answer score, baseline score) averaged over the orders, or None when not every review parsed."""
    by_sample: dict[int, list[JudgeRequest]] = {}
    for req in requests:
        by_sample.setdefault(req.sample, []).append(req)
    out: list[Optional[tuple[float, float]]] = []
    for i in range(len(inp.samples)):
        reqs = by_sample.get(i, [])
        if not reqs or any(r.scores is None for r in reqs):
            out.append(None)
            continue
        # answer-first: (answer, baseline); baseline-first: (baseline, answer)
        answer = [r.scores[0] if r.order == "answer-first" else r.scores[1] for r in reqs]
        baseline = [r.scores[1] if r.order == "answer-first" else r.scores[0] for r in reqs]
        out.append((sum(answer) / len(answer), sum(baseline) / len(baseline)))
    return out


def _write_reviews(path: str, inp: MetricInput, requests: list[JudgeRequest], outcomes: list) -> None:
    rows = []
    for i, sample in enumerate(inp.samples):
        reviews = [{"order": r.order, "reply": r.reply, "scores": list(r.scores) if r.scores else None,
                    "error": r.error, "attempts": r.attempts} for r in requests if r.sample == i]
        outcome = outcomes[i]
        rows.append({"sample_id": sample.id, "category": sample.category, "answer": inp.predictions[i],
                     "baseline": baseline_text(sample), "reviews": reviews,
                     "score": outcome[0] if outcome else None, "baseline_score": outcome[1] if outcome else None,
                     "result": None if outcome is None else
                     ("win" if outcome[0] > outcome[1] else "tie" if outcome[0] == outcome[1] else "loss")})
    write_text_atomic(os.path.abspath(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def llm_judge(inp: MetricInput, names: list[str]) -> MetricResult:
    """Pairwise judge of each answer against the baseline answer; see the module docstring."""
    settings = JudgeSettings.from_options(inp.options.get("llm_judge") or {})
    requests = [req for i, (sample, answer) in enumerate(zip(inp.samples, inp.predictions))
                for req in build_requests(i, sample, answer, settings)]
    _log(f"{len(requests)} request(s) for {len(inp.samples)} sample(s) to {requests[0].model!r} at "
         f"{settings.base_url} (concurrency {settings.max_concurrency}, swap {settings.swap})")
    t0 = time.perf_counter()
    run_requests(requests, settings)
    errors = [r for r in requests if r.reply is None]
    unparsed = [r for r in requests if r.reply is not None and r.scores is None]
    outcomes = _outcomes(inp, requests)
    judged = [i for i, o in enumerate(outcomes) if o is not None]
    _log(f"{len(requests) - len(errors) - len(unparsed)} parsed, {len(unparsed)} unparsed, {len(errors)} failed "
         f"in {time.perf_counter() - t0:.1f}s; {len(judged)}/{len(inp.samples)} question(s) judged")
    for r in unparsed[:3]:
        _log(f"unparsed reply (sample {inp.samples[r.sample].id!r}, {r.order}): {r.reply[:200]!r}")
    if errors:
        _log(f"first error: {errors[0].error}")
    if settings.reviews_file:
        _write_reviews(os.path.join(inp.output_dir or os.getcwd(), settings.reviews_file), inp, requests, outcomes)
    result = MetricResult()
    if len(errors) == len(requests):
        result.unavailable["llm_judge"] = (f"all {len(requests)} judge request(s) failed after retries; "
                                           f"first error: {errors[0].error}")
        return result
    failed_share = 1 - len(judged) / len(inp.samples) if inp.samples else 0.0
    if judged and failed_share > settings.max_failure_rate:
        result.unavailable["llm_judge"] = (f"{failed_share:.0%} of the questions could not be judged ({len(errors)} "
                                           f"request error(s), {len(unparsed)} unparsed repl(ies)), above "
                                           f"max_failure_rate {settings.max_failure_rate:.0%}: no rates reported")
    elif judged:
        samples = [inp.samples[i] for i in judged]
        groups = category_groups(samples)
        answer = [outcomes[i][0] for i in judged]
        baseline = [outcomes[i][1] for i in judged]
        mean_metric("win_rate", [float(a > b) for a, b in zip(answer, baseline)], groups, result)
        mean_metric("tie_rate", [float(a == b) for a, b in zip(answer, baseline)], groups, result)
        mean_metric("loss_rate", [float(a < b) for a, b in zip(answer, baseline)], groups, result)
        mean_metric("score", answer, groups, result)
        mean_metric("baseline_score", baseline, groups, result)
        # per sample over all samples: None for a question left unjudged (the rates are over the judged ones)
        compared = [{"prediction": answer_text, "reference": baseline_text(sample)}
                    for sample, answer_text in zip(inp.samples, inp.predictions)]
        models = sorted({r.model for r in requests})
        for name in PER_SAMPLE:
            result.per_sample[name] = spread(result.per_sample[name], judged, len(inp.samples))
            result.compared[name] = compared
            result.methods[name] = f"{METRICS['llm_judge'].method}; judge model {', '.join(models)}"
    result.values["judged"] = float(len(judged))
    result.values["judge_unparsed"] = float(len(unparsed))
    result.values["judge_errors"] = float(len(errors))
    for category, idx in category_groups(inp.samples).items():
        members = set(idx)
        entry = result.per_category.setdefault(category, {})
        entry["n"] = len(idx)  # samples in the category; the rates are over its `judged` ones
        entry["judged"] = float(sum(1 for i in judged if i in members))
        entry["judge_unparsed"] = float(sum(1 for r in unparsed if r.sample in members))
        entry["judge_errors"] = float(sum(1 for r in errors if r.sample in members))
    return result
