"""Reading the configuration: the TOML file, then the environment overrides, into one frozen AgentConfig.

The schema is derived from the section dataclasses of :mod:`agent.ops.config` (a field's type says how it is
spelled in TOML and in the environment), so a new key needs no second declaration here. Unknown sections and
keys are refused with the closest valid name; every value error names ``section.key``, where it came from (the
file and line, or the environment variable), the value found and what is expected.
"""

from __future__ import annotations

import difflib
import functools
import json as json_module
import logging
import operator
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from agent.ops.config import ENV_PREFIX, AgentConfig, ConfigError, TomlSyntaxError

logger = logging.getLogger(__name__)

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
#: Fewer characters in common than this and difflib's guess is noise, not a suggestion.
_SUGGESTION_CUTOFF = 0.6
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


class _Kind(Enum):
    """How a field's value is spelled in TOML and in the environment."""

    STR = "a string"
    BOOL = "true or false"
    INT = "an integer"
    FLOAT = "a number"
    PATH = "a path (string)"
    OPTIONAL_PATH = "a path (string; '' = default)"
    STR_TUPLE = "a list of strings"


_KINDS: dict[object, _Kind] = {
    str: _Kind.STR,
    bool: _Kind.BOOL,
    int: _Kind.INT,
    float: _Kind.FLOAT,
    Path: _Kind.PATH,
    Path | None: _Kind.OPTIONAL_PATH,
    tuple[str, ...]: _Kind.STR_TUPLE,
}


def _section_types() -> dict[str, type[Any]]:
    hints = get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in fields(AgentConfig)}


def _field_kinds(section_type: type[Any]) -> dict[str, _Kind]:
    hints = get_type_hints(section_type)
    kinds: dict[str, _Kind] = {}
    for f in fields(section_type):
        hint = hints[f.name]
        if get_origin(hint) in (Union, types.UnionType):
            hint = functools.reduce(operator.or_, get_args(hint))
        try:
            kinds[f.name] = _KINDS[hint]
        except KeyError:  # pragma: no cover - a new field type needs a parser first
            raise TypeError(f"{section_type.__name__}.{f.name}: no parser for type {hint!r}") from None
    return kinds


SECTIONS: dict[str, type[Any]] = _section_types()
#: section -> key -> kind; the single source of what a config file and the environment may set.
_SCHEMA: dict[str, dict[str, _Kind]] = {name: _field_kinds(cls) for name, cls in SECTIONS.items()}


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _suggest(word: str, candidates: list[str]) -> str:
    """'did you mean X? valid: ...', the guess from difflib and left out when nothing is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=_SUGGESTION_CUTOFF)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid: {', '.join(candidates)}"


def _toml_type_ok(kind: _Kind, value: object) -> bool:
    match kind:
        case _Kind.STR | _Kind.OPTIONAL_PATH:
            return isinstance(value, str)
        case _Kind.PATH:
            return isinstance(value, str) and value != ""
        case _Kind.BOOL:
            return isinstance(value, bool)
        case _Kind.INT:
            return isinstance(value, int) and not isinstance(value, bool)
        case _Kind.FLOAT:
            return isinstance(value, int | float) and not isinstance(value, bool)
        case _Kind.STR_TUPLE:
            return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _from_toml(key: str, kind: _Kind, value: Any, base: Path) -> object:
    """A TOML value as the field's type; relative paths against ``base`` (the file's folder)."""
    if not _toml_type_ok(kind, value):
        raise ConfigError(key, value, kind.value)
    if kind in (_Kind.PATH, _Kind.OPTIONAL_PATH):
        return _path(value, base)
    if kind is _Kind.FLOAT:
        return float(value)
    return tuple(value) if kind is _Kind.STR_TUPLE else value


def _parse_bool(text: str) -> bool:
    return _BOOL_WORDS[text.strip().lower()]


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


#: Parsers of environment strings; each raises ValueError or KeyError on a bad spelling.
_ENV_PARSERS: dict[_Kind, Callable[[str], object]] = {
    _Kind.STR: str,
    _Kind.BOOL: _parse_bool,
    _Kind.INT: lambda text: int(text.strip(), 10),
    _Kind.FLOAT: float,
    _Kind.STR_TUPLE: _split_list,
}
_ENV_EXPECTED: dict[_Kind, str] = {
    _Kind.BOOL: "true/false, 1/0 or yes/no",
    _Kind.PATH: "a non-empty path",
    _Kind.STR_TUPLE: "comma-separated strings",
}


def _from_env(key: str, kind: _Kind, text: str) -> object:
    """An environment string as the field's type; relative paths against the current directory."""
    if kind in (_Kind.PATH, _Kind.OPTIONAL_PATH):
        if kind is _Kind.PATH and not text:
            raise ConfigError(key, text, _ENV_EXPECTED[kind])
        return _path(text, Path.cwd())
    try:
        return _ENV_PARSERS[kind](text)
    except (ValueError, KeyError):
        raise ConfigError(key, text, _ENV_EXPECTED.get(kind, kind.value)) from None


def _path(text: str, base: Path) -> Path | None:
    if text == "":
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("config file", str(path), "a readable TOML file", note=exc.strerror) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("config file", str(path), "UTF-8 text", note=str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        raise TomlSyntaxError(path, message, int(position.group(1)) if position else None) from None


def _file_values(path: Path) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Per-section typed values from the file, and ``section.key`` -> where it came from."""
    document = _read_toml(path)
    base = path.parent.absolute()
    values: dict[str, dict[str, object]] = {}
    sources: dict[str, str] = {}
    for section, table in document.items():
        source = f"in {path}"
        if section not in _SCHEMA:
            raise ConfigError(
                section,
                section,
                "a known section",
                source=source,
                note=_suggest(section, list(_SCHEMA)),
                what="unknown section ",
            )
        if not isinstance(table, dict):
            raise ConfigError(section, table, f"a table [{section}]", source=source)
        for key, value in table.items():
            dotted = f"{section}.{key}"
            if key not in _SCHEMA[section]:
                raise ConfigError(
                    dotted,
                    key,
                    f"a key of [{section}]",
                    source=source,
                    note=_suggest(key, list(_SCHEMA[section])),
                    what="unknown key ",
                )
            try:
                values.setdefault(section, {})[key] = _from_toml(dotted, _SCHEMA[section][key], value, base)
            except ConfigError as exc:
                raise exc.from_source(source) from None
            sources[dotted] = source
    return values, sources


def _env_values(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Typed overrides from ``SCT_AGENT_<SECTION>_<KEY>``.

    A variable naming a known section with an unknown key is an error (a typo would otherwise be ignored in
    silence). Other ``SCT_AGENT_*`` names are left to whoever owns them (``SCT_AGENT_CONFIG`` may name the file)
    and only logged when they look like a misspelt setting.
    """
    known = {env_name(s, k): (s, k) for s, keys in _SCHEMA.items() for k in keys}
    values: dict[str, dict[str, object]] = {}
    sources: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in known:
            section_prefix = next((s for s in _SCHEMA if name.startswith(env_name(s, ""))), None)
            if section_prefix is not None:
                key = name[len(env_name(section_prefix, "")) :].lower()
                raise ConfigError(
                    f"{section_prefix}.{key}",
                    key,
                    f"a key of [{section_prefix}]",
                    source=f"environment variable {name}",
                    note=_suggest(name, sorted(n for n, (s, _) in known.items() if s == section_prefix)),
                    what="unknown key ",
                )
            suffixes = [known_name.removeprefix(ENV_PREFIX) for known_name in known]
            suffix = name.removeprefix(ENV_PREFIX)
            close = difflib.get_close_matches(suffix, suffixes, n=1, cutoff=_SUGGESTION_CUTOFF)
            if close:
                logger.warning(
                    "environment variable %s is not a setting; did you mean %s%s?", name, ENV_PREFIX, close[0]
                )
            continue
        section, key = known[name]
        source = f"environment variable {name}"
        try:
            values.setdefault(section, {})[key] = _from_env(
                f"{section}.{key}", _SCHEMA[section][key], environ[name]
            )
        except ConfigError as exc:
            raise exc.from_source(source) from None
        sources[f"{section}.{key}"] = source
    return values, sources


def _absolute_defaults(cls: type[Any], given: dict[str, object]) -> dict[str, object]:
    """Default paths the file and environment left alone, made absolute against the current directory."""
    out = dict(given)
    for f in fields(cls):
        if f.name not in out and isinstance(f.default, Path) and not f.default.is_absolute():
            out[f.name] = Path.cwd() / f.default
    return out


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``SCT_AGENT_*`` from ``environ`` (None = os.environ).

    Raises ConfigError naming ``section.key``, its source, the value found and what is expected.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, dict[str, object]] = {}
    sources: dict[str, str] = {}
    layers = [_file_values(path)] if path is not None else []
    layers.append(_env_values(environ))
    for layer_values, layer_sources in layers:
        for section, table in layer_values.items():
            merged.setdefault(section, {}).update(table)
        sources.update(layer_sources)
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        try:
            built[section] = cls(**_absolute_defaults(cls, merged.get(section, {})))
        except ConfigError as exc:
            source = sources.get(exc.attribute)
            raise (exc.from_source(source) if source else exc) from None
    return AgentConfig(**built)


def _toml_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json_module.dumps(str(value), ensure_ascii=False)


def describe_config(config: AgentConfig) -> str:
    """The effective configuration as TOML, for the start-up log and ``--print-config``.

    It loads back with :func:`load_config` to the same configuration (None is written as ``""``, which means
    "the default" for optional paths), so an operator can start a site file from what a running agent printed.
    """
    lines: list[str] = []
    for section in SECTIONS:
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        values = getattr(config, section)
        lines.extend(f"{key} = {_toml_value(getattr(values, key))}" for key in _SCHEMA[section])
    return "\n".join(lines) + "\n"
