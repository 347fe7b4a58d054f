"""What every config section is built with: the error type, the value checks, turning YAML and
command-line values into a section dataclass, hashing, and reading `--help` from the source.

The one idea: a field's trailing `# comment` in its section's source is its `--help` text, and
every key is checked against the dataclass it lands in, so a typo is an error naming the
closest valid key instead of a silently ignored value.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import glob as globlib
import hashlib
import inspect
import io
import json
import math
import numbers
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or command-line value that cannot be used; the message names the key."""


# --------------------------------------------------------------------------- building


def check_positive(cfg, *names):
    """Each named field of `cfg` is > 0."""
    section = section_name(type(cfg))
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n} must be positive, got {v}")


def check_types(cfg) -> None:
    """Each int, float, bool and str field holds that type (an int for a float is fine; a bool
    is not a number): for values that come from JSON rather than through `coerce`."""
    section = section_name(type(cfg))
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    for name, tp in _field_types(type(cfg)).items():
        v = getattr(cfg, name)
        if tp is int and isinstance(v, numbers.Integral) and not isinstance(v, bool):
            setattr(cfg, name, int(v))
        elif tp is float and isinstance(v, numbers.Real) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ConfigError(f"{section}.{name} must be a finite number, got {v!r}")
            setattr(cfg, name, float(v))
        elif tp in want and (not isinstance(v, tp) or (tp is not bool and isinstance(v, bool))):
            raise ConfigError(
                f"{section}.{name} must be {want[tp]}, got {v!r} ({type(v).__name__})"
            )


def check_choice(cfg, name, choices):
    """Field `name` of `cfg` is one of `choices`."""
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(
            f"{section_name(type(cfg))}.{name} must be one of {', '.join(choices)}; got {v!r}"
        )


# section class -> the name messages give it ("pretrain", "data.sources"); recipe.py fills it
# next to SECTIONS, so that a check written once in a base class names the section it ran for
SECTION_NAMES: dict[type, str] = {}


def section_name(cls) -> str:
    return SECTION_NAMES.get(cls, cls.__name__)


def warn_deprecated(old: str, new: str) -> None:
    """Say on stderr that a spelling still works for this release and which one replaces it."""
    print(f"lmforge: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr)


def did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown key {key!r} in {where}{hint}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or explain why not."""
    origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        if isinstance(value, str):  # from the command line: a YAML mapping, "{gsm8k: 20}"
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping such as {{key: value}}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        if dataclasses.is_dataclass(inner):
            return value
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "1",
            "on",
            "false",
            "no",
            "0",
            "off",
        ):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            if tp is int:
                f = float(str(value).replace("_", ""))
                if f != int(f):
                    raise ValueError
                return int(f)
            return float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(
                f"{where} must be {'an integer' if tp is int else 'a number'}, got {value!r}"
            ) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def build(cls, values: dict | None, where: str):
    """Make a section dataclass from a dict, rejecting unknown keys and converting types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {values!r}")
    types = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise unknown_key_error(k, names, where)
        kwargs[k] = coerce(v, types[k], f"{where}.{k}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(*parts: Any) -> str:
    """A short stable hash of configs (dataclasses or plain data); stages use it to skip work."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(path: str, base_dir: str = ".") -> Path:
    """Find a path given in a recipe: as written (cwd), then next to the recipe, then one level up."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = Path(base_dir)
    is_glob = any(ch in path for ch in "*?[")
    for cand in (p, base / p, base.parent / p):
        # glob.glob, not Path.glob on the parent: the wildcard may be in a folder name
        if cand.exists() or (is_glob and globlib.glob(str(cand), recursive=True)):
            return cand
    return p


# --------------------------------------------------------------------------- help text


def field_help(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source (and its dataclass bases',
    a subclass's comment winning): that is its --help. Read with ast + tokenize so a field
    wrapped over several lines still finds its comment."""
    out = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_field_help(base))
    return out


def _own_field_help(cls) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            text = next((comments[n] for n in lines if n in comments), None)
            if text:
                out[node.target.id] = text
    return out
