"""What counts as a secret: the one policy for config validation, job specs, run_metadata.json and the sinks.

A key names a secret when its words (split at `_`, `-`, `.` and camelCase) say so: `api_key`, `openai_api_key`,
`hf_token`, `access_key_id`, `password`, `client_secret`, `Authorization`. `max_tokens`, `max_new_tokens`,
`token_per_iteration` and `tokenizer_path` count tokens or name files, and `pad_token` names a vocabulary entry,
so none of those is a secret (nor `max_new_token`, so its typo gets a "did you mean", not a secret warning). A key ending in `_env` names the environment variable that holds a secret: that is
the allowed way to give one, so it is never a secret itself.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"

# a key holding any of these words is a secret
_SECRET_WORDS = frozenset({"password", "passwd", "secret", "apikey", "authorization", "credential", "credentials"})
# ... and one ending in these (hf_token, api_key, auth), unless the word before makes it a vocabulary entry
# (pad_token, stop_token) or a count (max_new_token, a typo of max_new_tokens)
_SECRET_LAST_WORDS = frozenset({"key", "token", "auth"})
_NOT_CREDENTIAL = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop",
                             "audio", "image", "video", "max", "min", "new", "num", "per", "total", "count"})
# `<word>_key...` pairs that name a credential wherever they stand (access_key_id, api_key_file)
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret(key: str) -> bool:
    """Whether a key (option name, environment variable, command-line flag) names a credential."""
    words = _words(str(key))
    if not words or words[-1] == "env":
        return False
    if _SECRET_WORDS.intersection(words) or _SECRET_PAIRS.intersection(zip(words, words[1:])):
        return True
    return words[-1] in _SECRET_LAST_WORDS and not (len(words) > 1 and words[-2] in _NOT_CREDENTIAL)


# KEY=value and --key=value; --key value; Authorization: Bearer value; OpenAI-style keys wherever they stand
_ASSIGNMENT = re.compile(r"(?<![\w-])(-{0,2}[A-Za-z_][\w-]*)(\s*=\s*)(\S+)")
_FLAG = re.compile(r"(?<!\S)(--?[A-Za-z][\w-]*)(\s+)(?!-)(\S+)")
_BEARER = re.compile(r"(?i)(\bbearer\s+)(\S+)")
_OPENAI_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")


def redact(text: str) -> str:
    """A command line (or any text) with the values of secret-named assignments and flags, bearer tokens and
    OpenAI-style keys replaced by ***."""
    def value(m: re.Match) -> str:
        return m.group(1) + m.group(2) + MASK if is_secret(m.group(1)) else m.group(0)

    text = _ASSIGNMENT.sub(value, text)
    text = _FLAG.sub(value, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _OPENAI_KEY.sub(MASK, text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like value safe to write where others read it (run_metadata.json, W&B config, MLflow
    params): the value of every secret-named key, at any depth of mappings and lists, becomes *** (an empty one
    stays empty, so "no key was set" remains visible), and strings are passed through redact()."""
    if isinstance(obj, dict):
        return {k: (MASK if obj[k] not in (None, "") else obj[k]) if is_secret(k) else redact_obj(obj[k])
                for k in obj}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


def secret_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    """Key paths of every secret-named key at any depth of mappings and lists (for config validation)."""
    found: list[tuple] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if is_secret(key):
                found.append(path + (key,))
            else:
                found += secret_paths(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += secret_paths(value, path + (i,))
    return found
