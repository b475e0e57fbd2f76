"""The backend registry: name -> class ("module:Class", imported only when chosen).

A backend turns canonical samples into RunResult rows:

    backend = cls(model, options, params, seed, log)   # nothing heavy yet
    info = backend.load()                              # load weights / connect; raises ModelLoadError
    results = backend.run(samples, dataset_id, progress)   # one RunResult per sample, sample order
    backend.close()

`params` is the generation parameters (GenerationParams: max_new_tokens, temperature, top_p, stop, extra),
`options` the backend's own options (config `backend_options:`, bench.py `--backend-opt k=v`); each backend class
lists the names it reads in `OPTIONS`, which the daemon's config check and the inference stage both use
(option_problems), so a typo fails at config load instead of being ignored. Backend modules therefore import
nothing heavy at module level (torch, vllm are imported in load()).
A sample that fails is returned with status=error; run() raises only when nothing can go on.
"""
from __future__ import annotations

import importlib

from evaluator.common.errors import EvaluatorError, did_you_mean

BACKENDS = {
    "hf": "evaluator.stages.inference.backends.hf:HFBackend",
    "vllm": "evaluator.stages.inference.backends.vllm:VLLMBackend",
    "openai": "evaluator.stages.inference.backends.openai:OpenAIBackend",
}


class ModelLoadError(EvaluatorError):
    """The model (checkpoint, alias, endpoint) cannot be loaded; the message says why."""


def backend_class(name: str):
    if name not in BACKENDS:
        raise EvaluatorError(f"backend: unknown backend {name!r}{did_you_mean(name, BACKENDS)} "
                             f"(known: {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def option_problems(name: str, options: dict) -> list[tuple[str, str]]:
    """(option, what is wrong) for every option the backend `name` does not read."""
    from evaluator.stages.common import SWITCHES, switch_value

    known = backend_class(name).OPTIONS
    problems = [(key, f"not an option of the {name} backend{did_you_mean(key, known)} (known: {', '.join(known)})")
                for key in options if key not in known]
    problems += [(key, f"expected true or false, got {options[key]!r}") for key in SWITCHES
                 if key in options and key in known and switch_value(options[key]) is None]
    scoring = options.get("choice_scoring")
    if "choice_scoring" in known and scoring is not None and scoring not in ("generate", "loglikelihood"):
        problems.append(("choice_scoring", f"expected generate or loglikelihood, got {scoring!r}"))
    return problems


def fresh_worker_per_checkpoint(name: str, options: dict) -> bool:
    """Whether a warm worker that ran backend `name` (with backend options `options`) on one checkpoint must not load
    another one: the backend class's fresh_worker_per_checkpoint(options) (vllm: its model's memory is not reliably
    given back within a process, unless it reloads weights in place); False for a backend without one."""
    rule = getattr(backend_class(name), "fresh_worker_per_checkpoint", None)
    return bool(rule(options or {})) if rule is not None else False


def holds_engine(name: str) -> bool:
    """Whether backend `name` holds a model a process may not get back once it is closed (a vLLM engine: the
    backends with a fresh_worker_per_checkpoint rule). A warm worker holding one is only given jobs that keep it
    (local.choose_worker), so no process builds a second one after another backend's job in between."""
    return getattr(backend_class(name), "fresh_worker_per_checkpoint", None) is not None
