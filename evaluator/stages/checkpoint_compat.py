"""Does this venv's transformers read a checkpoint as the transformers that wrote it meant? (issue 16 item 0)

A checkpoint saved by transformers 5.x and loaded by 4.x can be silently wrong: 4.x ignores config.json's
`rope_parameters` and falls back to rope_theta 10000 (SmolLM2 needs 100000: fluent nonsense, no error). Every stage
that loads a checkpoint calls `checkpoint_view(path)` first and loads what it returns:
- the checkpoint itself when the installed versions read it faithfully (the usual case: no copy, no cost);
- a temporary *view* when every difference has an exact, tested translation: a folder of symlinks to the
  checkpoint's files in which only the translated files are rewritten (the user's checkpoint is never edited);
- CheckpointFormatError (exit 2, a bad spec) naming the field, the checkpoint's transformers_version and the
  installed one, when a difference has no exact translation. Never a silent fallback.

The rules (`assess`, pure; each was measured on SmolLM2-135M-Instruct saved by 5.23.0, read by 4.42.4):
- config.json `rope_parameters` under transformers < 5: {"rope_type": "default", "rope_theta": T} becomes top-level
  `rope_theta: T`, `rope_scaling: null` (what 4.x's default rope reads; same logits in 4.42.4 and 5.23.0,
  tests/test_checkpoint_compat.py). Any other rope_type (linear, yarn, llama3, ...), extra keys, or a top-level
  rope_theta that disagrees is refused: 4.x's rope_scaling takes other keys, and no such mapping is tested here.
  Nested sub-configs (text_config, ...) follow the same rule.
- tokenizer_config.json `tokenizer_class` the installed transformers does not know: "TokenizersBackend" (5.x's
  generic tokenizer over tokenizer.json) becomes "PreTrainedTokenizerFast" (4.x's one) when tokenizer.json is
  present (same encodings and chat rendering in both venvs); any other unknown class is refused. A tokenizer with
  an `auto_map` (remote code) is not checked.
- chat_template.jinja (5.x and late 4.x keep the template there) under a transformers that reads only
  tokenizer_config.json's `chat_template`: the template is copied into it (else the checkpoint would silently run
  without its chat template).
- tokenizer.json merges written as pairs (tokenizers >= 0.20) under tokenizers < 0.20: written as "a b" strings
  when no part holds a space (the old format splits on it); refused otherwise.
- a checkpoint written by a newer major transformers than the installed one, other than 5.x read by 4.x (the
  pair the rules above cover), is refused: nobody has checked what that reader ignores.
`installed_in(python, path)` asks another environment's interpreter the same questions (HELM's helm-run).
Standard library only, so every venv (and the daemon's) can import it.
"""
from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

from evaluator.common.errors import EvaluatorError

CONFIG, TOKENIZER_CONFIG, TOKENIZER_JSON, CHAT_TEMPLATE_FILE = (
    "config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja")
# 5.x's generic tokenizer class and the 4.x class that reads the same tokenizer.json
GENERIC_TOKENIZER = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# (checkpoint's major, installed major) pairs whose differences the rules cover when the checkpoint is newer
COVERED_NEWER = {(5, 4)}


class CheckpointFormatError(EvaluatorError):
    """The installed transformers would misread the checkpoint and no exact translation exists (exit 2)."""


def version_tuple(text: Optional[str]) -> Optional[tuple]:
    """(major, minor) of a version string ("5.23.0", "4.42.4.dev0", "5.0.0rc1"); None when there is none."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Installed:
    """What reads the checkpoint in this venv: versions and the two capabilities that are not a version test."""

    transformers: str
    tokenizers: Optional[str] = None
    reads_chat_template_file: bool = True  # transformers loads chat_template.jinja itself
    knows_tokenizer: Callable[[str], bool] = field(default=lambda name: True, compare=False)

    @classmethod
    def here(cls) -> "Installed":
        """This interpreter's transformers (and tokenizers); CheckpointFormatError when transformers is absent."""
        try:
            transformers = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            raise CheckpointFormatError("transformers is not installed in this venv; it cannot load a checkpoint") \
                from None
        try:
            tokenizers = importlib.metadata.version("tokenizers")
        except importlib.metadata.PackageNotFoundError:
            tokenizers = None
        return cls(transformers, tokenizers, _reads_chat_template_file(), _knows_tokenizer)


# run by another environment's interpreter (installed_in): what Installed.here() says there
_PROBE = """
import json, sys
from evaluator.stages.checkpoint_compat import Installed
i = Installed.here()
print(json.dumps({"transformers": i.transformers, "tokenizers": i.tokenizers, "reads": i.reads_chat_template_file,
                  "known": {n: i.knows_tokenizer(n) for n in sys.argv[1:]}}))
"""


def installed_in(python: str, path: str, timeout: float = 300.0) -> Installed:
    """What reads checkpoint `path` in another environment (HELM's), asked of its interpreter `python` in a
    subprocess; CheckpointFormatError when it cannot say (no transformers there, the interpreter fails)."""
    import subprocess
    names = set(GENERIC_TOKENIZER.values())
    try:
        with open(os.path.join(path, TOKENIZER_CONFIG), encoding="utf-8") as f:
            cls = json.load(f).get("tokenizer_class")
        if isinstance(cls, str) and cls:
            names.add(cls)
    except (OSError, ValueError, AttributeError):
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([python, "-c", _PROBE, *sorted(names)], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CheckpointFormatError(f"cannot ask {python} which transformers it reads checkpoints with: {e}") from None
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (ValueError, IndexError):
        out = None
    if not isinstance(out, dict):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointFormatError(f"cannot tell which transformers {python} reads checkpoints with: {tail}")
    known = out["known"]
    return Installed(out["transformers"], out["tokenizers"], out["reads"], lambda name: bool(known.get(name)))


def _reads_chat_template_file() -> bool:
    # read from the source rather than imported: finding the spec does not import transformers
    spec = importlib.util.find_spec("transformers")
    origin = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    try:
        with open(os.path.join(origin or "", "tokenization_utils_base.py"), encoding="utf-8") as f:
            return "CHAT_TEMPLATE_FILE" in f.read()  # the constant naming chat_template.jinja (4.4x-4.57, 5.x)
    except OSError:
        return False  # unknown: copying the template into tokenizer_config.json is harmless where both are read


def _knows_tokenizer(name: str) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    return any(tokenizer_class_from_name(n) is not None for n in (name, name + "Fast"))


@dataclass
class Verdict:
    """What `assess` decided: files to rewrite in a view, what each rewrite means, and refusals."""

    rewrites: dict = field(default_factory=dict)  # file name -> new content (dict: JSON, str: text)
    translated: list = field(default_factory=list)  # one line per translation, for the stage's log
    problems: list = field(default_factory=list)  # one line per refusal

    @property
    def needs_view(self) -> bool:
        return bool(self.rewrites)


def assess(files: dict, installed: Installed) -> Verdict:
    """Pure: the checkpoint's files ({name: parsed JSON dict or text; absent files absent; tokenizer.json only
    when merges matter (tokenizers < 0.20)}) against what is installed."""
    verdict = Verdict()
    config = files.get(CONFIG)
    if not isinstance(config, dict):
        return verdict
    written = config.get("transformers_version")
    here, theirs = version_tuple(installed.transformers), version_tuple(written)
    if here is None:
        verdict.problems.append(f"cannot tell the installed transformers version ({installed.transformers!r})")
        return verdict
    versions = f"written by transformers {written or '(unknown)'}, this venv has transformers {installed.transformers}"
    if theirs is not None and theirs[0] > here[0] and (theirs[0], here[0]) not in COVERED_NEWER:
        verdict.problems.append(f"{CONFIG}: {versions}: no checked mapping from a newer major version; load it "
                                f"with transformers {theirs[0]}.x or re-save it with transformers {here[0]}.x")
        return verdict
    if here[0] < 5:
        new_config = _translate_rope(json.loads(json.dumps(config)), "", versions, verdict)
        if new_config != config and not verdict.problems:
            verdict.rewrites[CONFIG] = new_config
    _assess_tokenizer(files, installed, versions, verdict)
    if verdict.problems:
        verdict.rewrites.clear()
    return verdict


def _translate_rope(config: dict, where: str, versions: str, verdict: Verdict) -> dict:
    """`config` with every rope_parameters (also in nested sub-configs) as transformers 4.x reads rope."""
    for key, value in list(config.items()):
        if isinstance(value, dict) and key != "rope_parameters" and ("model_type" in value or key.endswith("config")):
            config[key] = _translate_rope(value, f"{where}{key}.", versions, verdict)
    if "rope_parameters" not in config:
        return config
    rope = config["rope_parameters"]
    name = f"{CONFIG} `{where}rope_parameters` {json.dumps(rope)}"
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    exact = (isinstance(rope, dict) and set(rope) <= {"rope_type", "rope_theta"} and rope.get("rope_type") == "default"
             and isinstance(theta, (int, float)) and not isinstance(theta, bool))
    if not exact:
        verdict.problems.append(f"{name}: {versions}, which ignores rope_parameters (it would silently use its default "
                                "rope); only {\"rope_type\": \"default\", \"rope_theta\": T} translates exactly. Load "
                                "it with transformers >= 5 or re-save it with transformers 4.x")
        return config
    if config.get("rope_theta") not in (None, theta) or config.get("rope_scaling") not in (None, {}):
        verdict.problems.append(f"{name}: {versions}; the top-level rope_theta {config.get('rope_theta')!r} / "
                                f"rope_scaling {config.get('rope_scaling')!r} disagree with it, so which one the "
                                "writer meant is unclear")
        return config
    del config["rope_parameters"]
    config["rope_theta"], config["rope_scaling"] = theta, None
    verdict.translated.append(f"{name} -> `{where}rope_theta` {theta}, `{where}rope_scaling` null ({versions})")
    return config


def _assess_tokenizer(files: dict, installed: Installed, versions: str, verdict: Verdict) -> None:
    tok_config = files.get(TOKENIZER_CONFIG)
    if isinstance(tok_config, dict) and "auto_map" not in tok_config:
        new = dict(tok_config)
        cls = tok_config.get("tokenizer_class")
        if cls and not installed.knows_tokenizer(cls):
            target = GENERIC_TOKENIZER.get(cls)
            if target and TOKENIZER_JSON in files and installed.knows_tokenizer(target):
                new["tokenizer_class"] = target
                verdict.translated.append(f"{TOKENIZER_CONFIG} `tokenizer_class` {cls!r} -> {target!r} "
                                          f"(both read {TOKENIZER_JSON}; {versions})")
            else:
                verdict.problems.append(f"{TOKENIZER_CONFIG} `tokenizer_class` {cls!r}: {versions}, which does not "
                                        "know this class" + (f" (and there is no {TOKENIZER_JSON} to read it as "
                                                             f"{target})" if target else ""))
        template = files.get(CHAT_TEMPLATE_FILE)
        if isinstance(template, str) and not installed.reads_chat_template_file and "chat_template" not in tok_config:
            new["chat_template"] = template
            verdict.translated.append(f"{CHAT_TEMPLATE_FILE} -> {TOKENIZER_CONFIG} `chat_template` (this venv's "
                                      f"transformers {installed.transformers} reads only the latter)")
        if new != tok_config:
            verdict.rewrites[TOKENIZER_CONFIG] = new
    tokenizer = files.get(TOKENIZER_JSON)
    tok_version = version_tuple(installed.tokenizers)
    if isinstance(tokenizer, dict) and tok_version is not None and tok_version < (0, 20):
        merges = (tokenizer.get("model") or {}).get("merges")
        if isinstance(merges, list) and any(isinstance(m, list) for m in merges):
            if any(" " in part for m in merges if isinstance(m, list) for part in m):
                verdict.problems.append(f"{TOKENIZER_JSON} `model.merges`: pairs with a space in a token, which "
                                        f"tokenizers {installed.tokenizers} cannot read (it needs tokenizers >= 0.20)")
            else:
                new_tok = dict(tokenizer, model=dict(tokenizer["model"], merges=[
                    " ".join(m) if isinstance(m, list) else m for m in merges]))
                verdict.rewrites[TOKENIZER_JSON] = new_tok
                verdict.translated.append(f"{TOKENIZER_JSON} `model.merges` pairs -> \"a b\" strings (tokenizers "
                                          f"{installed.tokenizers} reads only those)")


def read_files(path: str, installed: Installed) -> dict:
    """The checkpoint files `assess` looks at, parsed; tokenizer.json only when the installed tokenizers needs it."""
    files = {}
    names = [CONFIG, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE]
    tok_version = version_tuple(installed.tokenizers)
    if tok_version is not None and tok_version < (0, 20):
        names.append(TOKENIZER_JSON)
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                files[name] = f.read() if name == CHAT_TEMPLATE_FILE else json.load(f)
        except (OSError, ValueError):
            # a damaged or half-written file is not a format question: the loader fails on it with its own
            # message (exit 1, retried), where a format refusal (exit 2) would make it final
            continue
    if TOKENIZER_JSON not in files and os.path.isfile(os.path.join(path, TOKENIZER_JSON)):
        files[TOKENIZER_JSON] = True  # present; its content does not matter to this tokenizers
    return files


_VIEWS: list = []


def checkpoint_view(path: str, installed: Optional[Installed] = None, log: Optional[Callable] = None) -> str:
    """The folder to load `path` from in this venv: `path` itself, or a temporary translated view (see the module
    docstring); raises CheckpointFormatError when this venv would misread it. A hub id (not a folder) is returned
    as is. Views are removed by release_view() or at exit."""
    if not os.path.isdir(path):
        return path
    installed = installed or Installed.here()
    verdict = assess(read_files(path, installed), installed)
    if verdict.problems:
        raise CheckpointFormatError(f"checkpoint {path}: " + "; ".join(verdict.problems))
    if not verdict.needs_view:
        return path
    view = tempfile.mkdtemp(prefix="ckpt-view-")
    _VIEWS.append(view)
    for name in os.listdir(path):
        if name not in verdict.rewrites:
            os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(view, name))
    for name, content in verdict.rewrites.items():
        with open(os.path.join(view, name), "w", encoding="utf-8") as f:
            if isinstance(content, str):
                f.write(content)
            else:
                json.dump(content, f, indent=2, ensure_ascii=False)
    if log:
        for line in verdict.translated:
            log(f"checkpoint {path}: translated for this venv (view {view}): {line}")
    return view


def reads_as_is(path: str, installed: Optional[Installed] = None) -> bool:
    """True when this venv reads the checkpoint folder `path` faithfully without a view (no translation, no refusal)."""
    installed = installed or Installed.here()
    verdict = assess(read_files(path, installed), installed)
    return not verdict.problems and not verdict.needs_view


def release_view(view: str) -> None:
    """Remove a view made by checkpoint_view (the checkpoint it points at is untouched); no-op for anything else."""
    if view in _VIEWS:
        _VIEWS.remove(view)
        shutil.rmtree(view, ignore_errors=True)


@atexit.register
def _release_all() -> None:
    for view in list(_VIEWS):
        release_view(view)
