"""MMAU-Pro and MMAU scoring as the benchmarks' reference code does it; each metric is one published method.

Where each rule comes from (docs/benchmarks.md "MMAU-Pro scoring" has the longer account):

- `mmau_pro_embed` (closed-form items): NVIDIA NeMo-Skills `nemo_skills/evaluation/evaluator/nvembed_judge.py`
  (a public copy of the MMAU-Pro authors' script does the same): embed the prediction and every choice with
  NV-Embed-v2 (`model.encode(texts, instruction="", max_length=4096)`), L2-normalise, scores = cosine x 100, the
  choice with the highest score is the model's answer (first on ties, as torch.argmax), and it is right when it
  equals the target ignoring case and surrounding spaces. The embedding model is option `embed_model`, a local
  directory: NV-Embed-v2 (its remote code, loaded with transformers' AutoModel, trust_remote_code) or any
  sentence-transformers model (a directory with modules.json; a stand-in, reported with its path). Without the
  files the metric is reported unavailable, never computed with something else. Cosines are taken in float64 from
  the model's embeddings. An empty or failed prediction is wrong without embedding it (NeMo-Skills refuses such
  a sample; the authors' script embeds the empty string, an arbitrary pick); their count is
  `mmau_pro_embed_no_answer`.
- `mmau_string_match` (closed-form items): MMAU v1's `evaluation.py` (github.com/Sakshi113/MMAU) `string_match`,
  rule for rule: the prediction's and the answer's lowercased `\\b\\w+\\b` token sets; right when every answer
  token is in the prediction and no token of another choice (less the answer's tokens) is; an empty prediction is
  wrong. A failed inference is scored as the empty prediction.
- `mmau_pro_judge` (open-ended items): NeMo-Skills' `prompt/config/judge/speechlm.yaml` prompt (question,
  reference answer, model response) sent to an OpenAI-compatible judge (options as `llm_judge`'s: base_url,
  model, ...; the default judge there is qwen/qwen2.5-7b-instruct); the verdict is read by NeMo-Skills'
  `is_correct_judgement`: the text after the last "Judgement:" starts with yes (right) or no (wrong); any other
  reply is wrong, as there, and counted in `mmau_pro_judge_unparsed`. A failed inference is wrong without a
  request; a request that fails after retries leaves its sample unjudged (`mmau_pro_judge_errors`); with more
  than half the samples unjudged (llm_judge's max_failure_rate) no accuracy is reported, only the counts.
- `mmau_pro_if` (instruction-following items): NeMo-Skills `nemo_skills/evaluation/evaluator/mmau_pro.py`
  `evaluate_aif_constraints`, all 27 checks, on the stripped response (an empty one is wrong); the row's
  `task_identifier` picks the check and `kwargs` (a mapping or its JSON text) parameterise it; an identifier it
  does not know is wrong, as there, and counted in `mmau_pro_if_unknown`.

Breakdowns (per_category): by the sample's category (MMAU-Pro's `category`: sound, music, speech, multi,
spatial_audio, ...; NeMo-Skills reports closed-form items per category) and, where the rows carry skill lists
(metadata keys ending in `skills`, e.g. perceptual_skills), one group per skill named "<key>: <skill>"; a sample
with several skills counts in each of them.
"""
from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from evaluator.common.errors import EvaluatorError

from . import MetricInput, MetricResult
from .stats import category_groups, mean_metric, spread

REFERENCE_EMBEDDER = "nvidia/NV-Embed-v2"
EMBED_OPTIONS = ("embed_model", "device")


# ---------------------------------------------------------------------------------------------------------------
# breakdowns

def skill_groups(samples) -> dict[str, list[int]]:
    """"<key>: <skill>" -> sample indices, for metadata keys ending in `skills` holding a skill or a list of them."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        for key, value in sorted(s.metadata.items()):
            if not key.endswith("skills"):
                continue
            skills = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            for skill in dict.fromkeys(x.strip() for x in skills if isinstance(x, str) and x.strip()):
                groups.setdefault(f"{key}: {skill}", []).append(i)
    return groups


def mmau_groups(samples) -> dict[str, list[int]]:
    """Per-category groups (stats.category_groups) plus the per-skill ones."""
    return {**category_groups(samples), **skill_groups(samples)}


def _record(name: str, scores: list, samples, result: MetricResult) -> None:
    mean_metric(name, scores, mmau_groups(samples), result)


# ---------------------------------------------------------------------------------------------------------------
# MMAU v1 string match

def _tokens(text: str) -> set:
    return set(re.findall(r"\b\w+\b", text.lower()))


def string_match(answer: str, prediction: str, choices: list) -> bool:
    """MMAU v1 evaluation.py's rule (see the module docstring)."""
    prediction_tokens = _tokens(prediction)
    answer_tokens = _tokens(answer)
    if not prediction_tokens:
        return False
    incorrect = set()
    for choice in choices:
        choice_tokens = _tokens(choice)
        if choice_tokens != answer_tokens:
            incorrect.update(choice_tokens - answer_tokens)
    return answer_tokens.issubset(prediction_tokens) and prediction_tokens.isdisjoint(incorrect)


def mmau_string_match(inp: MetricInput, names: list[str]) -> MetricResult:
    """Share of samples string_match() counts right; failed inference is the empty prediction (wrong)."""
    scores = [float(string_match(s.target, pred if ok else "", s.choices))
              for pred, s, ok in zip(inp.predictions, inp.samples, inp.ok)]
    result = MetricResult()
    _record("mmau_string_match", scores, inp.samples, result)
    result.compared["mmau_string_match"] = [{"prediction": pred if ok else "", "reference": s.target}
                                            for pred, s, ok in zip(inp.predictions, inp.samples, inp.ok)]
    result.methods["mmau_string_match"] = "MMAU v1 evaluation.py string_match (token sets; Sakshi113/MMAU)"
    return result


# ---------------------------------------------------------------------------------------------------------------
# NV-Embed-style closed-form matching

def embed_match(encode: Callable[[list], object], prediction: str, choices: list) -> tuple[int, list[float]]:
    """(index of the best choice, every choice's score = cosine x 100) for one prediction; `encode(texts)`
    returns one embedding per text (rows of a tensor or array). Float64 throughout."""
    import numpy as np
    pred = np.asarray(_to_numpy(encode([prediction])), dtype=np.float64).reshape(1, -1)
    opts = np.asarray(_to_numpy(encode(list(choices))), dtype=np.float64).reshape(len(choices), -1)
    pred = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)  # F.normalize's eps
    opts = opts / np.maximum(np.linalg.norm(opts, axis=1, keepdims=True), 1e-12)
    scores = (pred @ opts.T)[0] * 100
    return int(np.argmax(scores)), [float(x) for x in scores]


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_nv_embed(path: str) -> bool:
    """An NV-Embed checkpoint (its config names the NVEmbedModel remote code). Its folder also holds
    sentence-transformers files; it is still run through its own encode(), as the reference does."""
    config = _config(path)
    return config.get("model_type") == "nvembed" or any("NVEmbed" in str(a) for a in config.get("architectures") or [])


def embed_model_files(model: str) -> Optional[str]:
    """What is missing for a local embedding model directory, or None when it can be loaded."""
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        return f"{model} (not a local directory)"
    if not (is_nv_embed(path) or os.path.isfile(os.path.join(path, "modules.json"))):
        return f"{model}: neither an NV-Embed checkpoint (config.json) nor a sentence-transformers model (modules.json)"
    return None


def embed_model_id(model: str) -> str:
    """The id recorded with the result: an NV-Embed checkpoint's hub id (config `_name_or_path`) when it names
    one, else the directory's real path (a sentence-transformers config names only its base transformer)."""
    path = os.path.realpath(os.path.expanduser(model))
    name = _config(path).get("_name_or_path")
    if is_nv_embed(path) and isinstance(name, str) and "/" in name and not name.startswith(("/", ".")):
        return name
    return path


def load_encoder(model: str, device: str) -> Callable[[list], object]:
    """encode(texts) for a local directory: NV-Embed's remote code through transformers' AutoModel (encode with
    instruction="" and max_length=4096, as NeMo-Skills), else sentence-transformers."""
    from .caption import _cached_model
    path = os.path.realpath(os.path.expanduser(model))
    if not is_nv_embed(path):
        def load_st():
            from sentence_transformers import SentenceTransformer
            return SentenceTransformer(path, device=device)
        st = _cached_model(("mmau_embed_st", path, str(device)), load_st)
        return lambda texts: st.encode(texts, convert_to_numpy=True)

    def load_nv():
        import transformers
        m = transformers.AutoModel.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        return m.to(device).eval()
    nv = _cached_model(("mmau_embed_nv", path, str(device)), load_nv)

    def encode(texts):
        import torch
        with torch.no_grad():
            return nv.encode(texts, instruction="", max_length=4096)
    return encode


def mmau_pro_embed(inp: MetricInput, names: list[str]) -> MetricResult:
    """Closed-form accuracy by embedding match (see the module docstring)."""
    options = inp.options.get("mmau_pro_embed") or {}
    result = MetricResult()
    model = options.get("embed_model")
    if not model:
        result.unavailable["mmau_pro_embed"] = (
            f"unavailable: missing the embedding model: set metric_options.mmau_pro_embed.embed_model to a local "
            f"copy of {REFERENCE_EMBEDDER} (the reference) or of a sentence-transformers model")
        return result
    missing = embed_model_files(str(model))
    if missing:
        result.unavailable["mmau_pro_embed"] = f"unavailable: missing {missing} (metric_options.mmau_pro_embed.embed_model)"
        return result
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encode = load_encoder(str(model), str(options.get("device", "cpu")))
    scores, compared, no_answer = [], [], 0
    for pred, s, ok in zip(inp.predictions, inp.samples, inp.ok):
        if not ok or not pred.strip():
            no_answer += 1
            scores.append(0.0)
            compared.append(None)
            continue
        best, _ = embed_match(encode, pred.strip(), s.choices)
        scores.append(float(s.choices[best].strip().lower() == s.target.strip().lower()))
        compared.append({"prediction": s.choices[best], "reference": s.target})  # the matched choice
    _record("mmau_pro_embed", scores, inp.samples, result)
    result.compared["mmau_pro_embed"] = compared
    result.values["mmau_pro_embed_no_answer"] = float(no_answer)
    model_id = embed_model_id(str(model))
    result.methods["mmau_pro_embed"] = (f"MMAU-Pro closed-form embedding match (NeMo-Skills nvembed_judge: argmax "
                                        f"cosine over the choices) with {model_id}")
    if model_id != REFERENCE_EMBEDDER:
        print(f"[mmau_pro_embed] embedding model {model_id!r} is not the reference {REFERENCE_EMBEDDER}: "
              "the number is not comparable with published MMAU-Pro results", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# open-ended: NeMo-Skills' speechlm judge

SPEECHLM_JUDGE_PROMPT = (
    "You are an expert evaluator for audio and speech-related questions. Please evaluate whether the model's "
    "response correctly answers the question.\n\n"
    "Question: {question}\n\n"
    "Reference Answer: {expected_answer}\n\n"
    "Model Response: {generation}\n\n"
    "Your task is to determine if the model's response is correct based on the reference answer. Consider:\n\n"
    "1. **Factual Accuracy**: Is the information in the response factually correct?\n"
    "2. **Relevance**: Does the response address the specific question asked?\n"
    "3. **Completeness**: Does the response cover the key points from the reference answer?\n\n"
    "Please first explain your reasoning in 2-3 sentences, then provide your final judgement.\n\n"
    "Your final judgement must be either \"Yes\" or \"No\":\n"
    "- \"Yes\" if the model response is correct and adequately answers the question\n"
    "- \"No\" if the model response is incorrect, irrelevant, or inadequate\n\n"
    "Format your response as:\n"
    "Reasoning: [Your explanation]\n"
    "Judgement: [Yes or No]")
DEFAULT_JUDGE_TEMPERATURE = 0.0
DEFAULT_JUDGE_MAX_TOKENS = 1024


def judgement(reply: str) -> Optional[bool]:
    """NeMo-Skills is_correct_judgement: True/False from the text after the last "Judgement:", None otherwise."""
    if "Judgement:" in reply:
        verdict = reply.split("Judgement:")[-1].strip().lower()
        if verdict.startswith("yes"):
            return True
        if verdict.startswith("no"):
            return False
    return None


def judge_prompt(sample, prediction: str) -> str:
    question = sample.metadata.get("question") or sample.prompt_text()
    return SPEECHLM_JUDGE_PROMPT.format(question=question, expected_answer=sample.target, generation=prediction)


def mmau_pro_judge(inp: MetricInput, names: list[str]) -> MetricResult:
    """Open-ended items judged right/wrong by an LLM with NeMo-Skills' speechlm prompt."""
    from .judge import ChatClient, JudgeRequest, JudgeSettings
    settings = JudgeSettings.from_options(inp.options.get("mmau_pro_judge") or {})
    if not settings.model:
        raise EvaluatorError("metric_options.mmau_pro_judge.model: no judge model (NeMo-Skills uses "
                             "qwen/qwen2.5-7b-instruct)")
    temperature = settings.temperature if settings.temperature is not None else DEFAULT_JUDGE_TEMPERATURE
    max_tokens = settings.max_tokens if settings.max_tokens is not None else DEFAULT_JUDGE_MAX_TOKENS
    requests = [JudgeRequest(i, "answer", settings.model,
                             [{"role": "user", "content": judge_prompt(s, pred.strip())}], temperature, max_tokens)
                for i, (pred, s, ok) in enumerate(zip(inp.predictions, inp.samples, inp.ok)) if ok and pred.strip()]
    client = ChatClient(settings)
    with ThreadPoolExecutor(max_workers=settings.max_concurrency) as pool:
        list(pool.map(client.run, requests))
    by_sample = {r.sample: r for r in requests}
    scores: list[Optional[float]] = []
    unparsed = errors = 0
    for i in range(len(inp.samples)):
        req = by_sample.get(i)
        if req is None:  # failed inference or an empty answer: wrong, no request
            scores.append(0.0)
        elif req.reply is None:
            errors += 1
            scores.append(None)
        else:
            verdict = judgement(req.reply)
            unparsed += verdict is None
            scores.append(float(bool(verdict)))
    result = MetricResult()
    judged = [i for i, x in enumerate(scores) if x is not None]
    first = next((r.error for r in requests if r.error), "no request")
    if not judged:
        result.unavailable["mmau_pro_judge"] = f"unavailable: every judge request failed after retries; first error: {first}"
        return result
    # llm_judge's rule (judge.py): an accuracy over the few samples a failing judge answered describes a biased
    # remainder, not the benchmark; the counts are still reported
    if errors / len(inp.samples) > settings.max_failure_rate:
        result.values["mmau_pro_judge_unparsed"] = float(unparsed)
        result.values["mmau_pro_judge_errors"] = float(errors)
        result.unavailable["mmau_pro_judge"] = (
            f"unavailable: {errors} of {len(inp.samples)} samples could not be judged (requests failed after "
            f"retries), above {settings.max_failure_rate:.0%}: no accuracy reported; first error: {first}")
        return result
    samples = [inp.samples[i] for i in judged]
    _record("mmau_pro_judge", [scores[i] for i in judged], samples, result)
    for category, idx in mmau_groups(inp.samples).items():  # n: the category's samples, as every other metric
        result.per_category.setdefault(category, {})["n"] = len(idx)  # says it (the accuracy is over the judged)
    result.per_sample["mmau_pro_judge"] = spread([scores[i] for i in judged], judged, len(inp.samples))
    result.values["mmau_pro_judge_unparsed"] = float(unparsed)
    result.values["mmau_pro_judge_errors"] = float(errors)
    result.methods["mmau_pro_judge"] = (f"LLM judge Yes/No with NeMo-Skills judge/speechlm prompt, judge model "
                                        f"{settings.model}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# instruction following: NeMo-Skills' AIF checks

def _count_words(text):
    return len(text.split())


def _count_sentences(text):
    return len([s for s in re.split(r"[.!?]+", text.strip()) if s.strip()])


def _count_paragraphs(text):
    return len([p for p in text.split("***") if p.strip()])


def _count_bullets(text):
    return len(re.findall(r"(?:^|\n)\s*\*\s+", text))


def _count_highlights(text):
    return len(re.findall(r"\*([^*]+)\*", text))


def _count_placeholders(text):
    return len(re.findall(r"\[[^\]]+\]", text))


def _count_capital_words(text):
    return len([w for w in text.split() if w.isupper()])


def _keyword_frequency(text, keyword):
    return len(re.findall(r"\b" + re.escape(keyword.lower()) + r"\b", text.lower()))


def _letters(text):
    return re.sub(r"[^a-zA-Z]", "", text).lower()


def _letters_spaces(text):
    return re.sub(r"[^a-zA-Z ]", "", text).lower()


def _sections(text, n, splitter):
    return len([s for s in re.split(rf"\s*{re.escape(splitter)}\s*", text.strip()) if s.strip()]) == n


def _two_responses(r):
    parts = r.split("******")
    return len(parts) == 2 and parts[0].lower().strip() != parts[1].lower().strip()


# task_identifier -> check(response, kwargs, metadata); the same defaults as NeMo-Skills' kwargs.get(...)
IF_CHECKS: dict[str, Callable[[str, dict, dict], bool]] = {
    "Include Keywords": lambda r, k, m: all(w.lower() in r.lower() for w in k.get("keywords", "").split(", ")),
    "Keyword Frequency": lambda r, k, m: _keyword_frequency(r, k.get("keyword", "")) == k.get("N", 0),
    "Forbidden Words": lambda r, k, m: not any(w.lower() in r.lower() for w in k.get("forbidden_words", "").split(", ")),
    "Number Paragraphs": lambda r, k, m: _count_paragraphs(r) == k.get("N", 0),
    "Number Words (at least)": lambda r, k, m: _count_words(r) >= k.get("N", 0),
    "Number Words (at most)": lambda r, k, m: _count_words(r) <= k.get("N", 0),
    "Number Words (range)": lambda r, k, m: k.get("N1", 0) <= _count_words(r) <= k.get("N2", 999),
    "Number Sentences (at least)": lambda r, k, m: _count_sentences(r) >= k.get("N", 0),
    "Number Sentences (at most)": lambda r, k, m: _count_sentences(r) <= k.get("N", 0),
    "Number Sentences (range)": lambda r, k, m: k.get("N1", 0) <= _count_sentences(r) <= k.get("N2", 999),
    "Postscript": lambda r, k, m: _letters(k.get("postscript_marker", "")) in _letters(r),
    "Number Placeholder": lambda r, k, m: _count_placeholders(r) >= k.get("N", 0),
    "Number Bullets": lambda r, k, m: _count_bullets(r) == k.get("N", 0),
    "Title": lambda r, k, m: bool(re.search(r"<<[^>]+>>", r)),
    "Minimum Number Highlighted Section": lambda r, k, m: _count_highlights(r) >= k.get("N", 0),
    "Multiple Sections": lambda r, k, m: _sections(r, k.get("N", 0), k.get("section_splitter", "")),
    # NeMo-Skills reads the row's prompt_transcription; a row without one passes (startswith(""))
    "Repeat Prompt": lambda r, k, m: r.strip().lower().startswith(
        str(m.get("prompt_transcription") or "").strip().lower()),
    "Two Responses": lambda r, k, m: _two_responses(r),
    "All Uppercase": lambda r, k, m: r.isupper(),
    "All Lowercase": lambda r, k, m: r.islower(),
    "All-capital Words (at least)": lambda r, k, m: _count_capital_words(r) >= k.get("N", 0),
    "All-capital Words (at most)": lambda r, k, m: _count_capital_words(r) <= k.get("N", 0),
    "All-capital Words (range)": lambda r, k, m: k.get("N1", 0) <= _count_capital_words(r) <= k.get("N2", 999),
    "Start Checker": lambda r, k, m: _letters_spaces(r).startswith(_letters_spaces(k.get("start_phrase", ""))),
    "End Checker": lambda r, k, m: _letters_spaces(r).endswith(_letters_spaces(k.get("end_phrase", ""))),
    "Quotation": lambda r, k, m: r.strip().startswith('"') and r.strip().endswith('"'),
    "No Commas": lambda r, k, m: "," not in r,
}


def if_kwargs(sample) -> dict:
    """The row's kwargs as a mapping (the Hugging Face rows may hold it as JSON text); {} when absent."""
    value = sample.metadata.get("kwargs")
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise EvaluatorError(f"sample {sample.id!r}: kwargs {value!r:.80} is neither a mapping nor JSON "
                                 "text of one") from None
    if not isinstance(value, dict):
        raise EvaluatorError(f"sample {sample.id!r}: kwargs: expected a mapping, got {value!r:.80}")
    return value


def instruction_followed(sample, response: str) -> Optional[bool]:
    """NeMo-Skills' verdict for one response; None when the task_identifier has no check."""
    response = response.strip()
    check = IF_CHECKS.get(str(sample.metadata.get("task_identifier") or ""))
    if check is None:
        return None
    if not response:
        return False
    return bool(check(response, if_kwargs(sample), sample.metadata))


def mmau_pro_if(inp: MetricInput, names: list[str]) -> MetricResult:
    """Share of instruction-following items whose response passes its rule check."""
    scores, unknown = [], []
    for pred, s, ok in zip(inp.predictions, inp.samples, inp.ok):
        verdict = instruction_followed(s, pred if ok else "")
        if verdict is None:
            unknown.append(str(s.metadata.get("task_identifier")))
        scores.append(float(bool(verdict)))
    if unknown:
        print(f"[mmau_pro_if] {len(unknown)} sample(s) with a task_identifier that has no check (scored wrong, as "
              f"NeMo-Skills does): {', '.join(sorted(set(unknown))[:5])}", file=sys.stderr, flush=True)
    result = MetricResult()
    _record("mmau_pro_if", scores, inp.samples, result)
    result.values["mmau_pro_if_unknown"] = float(len(unknown))
    result.methods["mmau_pro_if"] = "NeMo-Skills MMAU-Pro instruction-following rule checks (evaluate_aif_constraints)"
    return result
