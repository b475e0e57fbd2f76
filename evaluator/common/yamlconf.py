"""Reading a YAML config file and reporting its problems as `file:line: key.path: what was expected`.

Shared by the daemon config (evaluator/daemon/config.py) and the recorder config (recorder/writer.py), so both
tools word their errors alike. Standard library + yaml only: the typed models are pydantic classes defined by
their callers, which this module handles by duck typing (`model_fields`, `model_validate`).
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Union, get_args, get_origin

import yaml

from evaluator.common.errors import EvaluatorError, did_you_mean

Problem = tuple[tuple, str]  # (key path, what is wrong)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e-3` and `1.5e3` as strings (its exponents need a dot and a sign); YAML 1.2 and every
# user read numbers. Where a config's numbers are typed strictly (a quoted "0.5" is refused) they must be floats.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _construct_int(loader, node):
    """An integer, or a YAML error at its line: Python's int() refuses more than 4300 digits with a ValueError."""
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(node.value)} digits, beyond any setting", node.start_mark) from None


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class RecursiveAlias(ValueError):
    """A YAML alias used inside the node it names (`a: &a [*a]`): data without end, never a config."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


def line_index(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line number; RecursiveAlias for a cycle."""
    index: dict[tuple, int] = {}
    inside: set[int] = set()  # the nodes on the current path: one met again is an alias to its own ancestor

    def walk(node, path):
        if id(node) in inside:
            raise RecursiveAlias(node.start_mark.line + 1)
        index.setdefault(path, node.start_mark.line + 1)
        inside.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                index[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
        inside.discard(id(node))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, ())
    return index


def read_yaml(path: str) -> tuple[object, dict[tuple, int]]:
    """A YAML config file's data and its key-path -> line index; EvaluatorError names file:line."""
    if not os.path.isfile(path):
        raise EvaluatorError(f"--config: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise EvaluatorError(f"invalid config: {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EvaluatorError(f"--config: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise EvaluatorError(f"invalid config: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    try:
        return data, line_index(text)
    except RecursiveAlias as e:
        raise EvaluatorError(f"invalid config: {path}:{e.line}: not valid YAML (an alias used inside the node it "
                             f"names)") from None


def dotted(loc: tuple) -> str:
    """('auto_eval', 'benchmarks', 0, 'name') -> 'auto_eval.benchmarks[0].name'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def config_error(path: str, lines: dict[tuple, int], problems: list[Problem]) -> EvaluatorError:
    """One EvaluatorError listing every problem as `file:line: key.path: text` (the line of the nearest key)."""
    msgs = []
    for loc, text in problems:
        line = None
        probe = loc
        while probe and line is None:
            line = lines.get(probe)
            probe = probe[:-1]
        where = f"{path}:{line}" if line else path
        msgs.append(f"{where}: {dotted(loc)}: {text}" if loc else f"{where}: {text}")
    return EvaluatorError("invalid config:\n  " + "\n  ".join(msgs) if len(msgs) > 1 else "invalid config: " + msgs[0])


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and hasattr(value, "model_fields")


def _model_at(model: type, loc: tuple) -> Optional[type]:
    """The model class that holds the last key of `loc` (for "did you mean")."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not _is_model(current) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        while get_origin(current) in (Union, list, Optional) or (get_origin(current) is not None and get_args(current)):
            args = [a for a in get_args(current) if a is not type(None)]
            if not args:
                break
            current = args[0]
    return current if _is_model(current) else None


def describe(err: dict, model: type) -> str:
    """One pydantic error (an item of ValidationError.errors()) in the words of our messages."""
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(model, loc)
        known = list(owner.model_fields) if owner else []
        hint = did_you_mean(loc[-1], known, cutoff=0.5)
        if not hint and known:
            hint = "; known keys: " + ", ".join(known)
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":  # our own validators' messages say what they got
        return err["msg"].split(", ", 1)[-1] if err["msg"].startswith("Value error, ") else err["msg"]
    return f"{err['msg'].lower()}, got {err.get('input')!r}"


def validate(model: type, data: object, path: str, lines: dict[tuple, int]):
    """model.model_validate(data); a pydantic ValidationError becomes one EvaluatorError naming file:line."""
    try:
        return model.model_validate(data)
    except ValueError as e:  # pydantic's ValidationError (a ValueError); this module does not import pydantic
        if not callable(getattr(e, "errors", None)):
            raise
        raise config_error(path, lines, [(tuple(err["loc"]), describe(err, model)) for err in e.errors()]) from None
