"""The agent's configuration: one frozen tree, read once at start-up from TOML and the environment.

Every setting has a default, so ``sct-agent run`` works without a file. Precedence, lowest first: the defaults
below, the TOML file (``/etc/sct-agent/agent.toml`` in production; ``systemd/agent.toml`` documents every key),
then environment variables ``SCT_AGENT_<SECTION>_<KEY>`` (``SCT_AGENT_PUBLISH_ENDPOINT=tcp://...``), because a
container or a systemd drop-in changes one value without editing the site's file.

Relative paths: a path written in the file is taken relative to the file's folder (a config travels with the
folders it names); a default or an environment value is taken relative to the current directory. ``load_config``
returns every path absolute, so a later ``chdir`` cannot change what the agent reads or writes.

A bad value stops start-up with a :class:`ConfigError` naming ``section.key``, where it came from, the value found
and what is expected: a typo found at start-up costs a minute, found during a surgery it costs the sCT.
"""

from __future__ import annotations

import difflib
import functools
import json as json_module
import logging
import math
import operator
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from agent.publish.endpoints import default_snapshot_endpoint
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: Prefix of the environment overrides: ``SCT_AGENT_<SECTION>_<KEY>``.
ENV_PREFIX = "SCT_AGENT_"
OBSERVERS = ("native", "polling")
#: ZeroMQ transports the publisher may bind (``pgm``/``epgm`` multicast is not for a hospital network).
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
SECURITY_MODES = ("auto", "curve", "plain")
#: DICOM AE titles are at most 16 characters; series numbers are IS values (we keep them well inside).
AE_TITLE_MAX = 16
SERIES_NUMBER_MAX = 100_000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The shipped model halves the slab depth three times; the engine re-checks against the loaded manifest.
SLAB_DEPTH_MULTIPLE = 8
MAX_PORT = 65535
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
#: Fewer characters in common than this and difflib's guess is noise, not a suggestion.
_SUGGESTION_CUTOFF = 0.6
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


class ConfigError(SctError, ValueError):
    """A configuration value the agent cannot start with; the fields say which, from where and what is wanted."""

    def __init__(
        self,
        key: str,
        found: object,
        expected: str,
        *,
        source: str | None = None,
        note: str | None = None,
        what: str = "",
    ) -> None:
        self.source = source
        self.note = note
        self.what = what
        where = f" ({source})" if source else ""
        tail = f"; {note}" if note else ""
        super().__init__(
            f"{key}{where}: found {what}{_show(found)}, expected {expected}{tail}",
            attribute=key,
            found=found,
            expected=expected,
        )

    def from_source(self, source: str) -> ConfigError:
        """The same error, saying which file or environment variable the value came from."""
        return ConfigError(
            self.attribute, self.found, self.expected, source=source, note=self.note, what=self.what
        )


class TomlSyntaxError(ConfigError):
    """The file is not valid TOML; ``line`` is 1-based, None when tomllib gave no position."""

    def __init__(self, path: Path, message: str, line: int | None) -> None:
        super().__init__("config file", str(path), "valid TOML", source=str(path), note=message)
        self.path = path
        self.line = line
        where = f"line {line}" if line is not None else "unknown line"
        self.args = (f"{path}: {where}: TOML syntax error: {message}",)


def _show(value: object) -> str:
    if isinstance(value, str | Path):
        return repr(str(value))
    if isinstance(value, bool | int | float):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _positive(key: str, value: float, unit: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, value, f"a finite number of {unit} greater than 0")


def _non_negative_int(key: str, value: int, meaning: str) -> None:
    if value < 0:
        raise ConfigError(key, value, f"an integer >= 0 ({meaning})")


def split_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6 address]:port"`` as (host, port); raises ValueError saying what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError("a 'host:port' address such as '127.0.0.1:9108' ('' = metrics off)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host in brackets, such as '[::1]:9108'")
    if not host or any(ch.isspace() for ch in host):
        raise ValueError("a 'host:port' address with a host name or address before the ':'")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > MAX_PORT:
        raise ValueError(f"a port from 0 to {MAX_PORT} after the ':' (0 = any free port)")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """The scanner's export folder and how to notice new files in it."""

    folder: Path = Path("export")
    #: "native" = inotify events; "polling" = rescans, needed on CIFS/NFS shares, which send no inotify events.
    observer: str = "native"
    poll_interval_s: float = 0.25
    recursive: bool = True

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ConfigError("watch.observer", self.observer, " or ".join(map(repr, OBSERVERS)))
        _positive("watch.poll_interval_s", self.poll_interval_s, "seconds")


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where the journal and the engine cache live; the only folder the agent writes besides its outputs."""

    folder: Path = Path("var")


@dataclass(frozen=True, slots=True)
class AssemblyConfig:
    """Fallback end of an acquisition that does not say how many images it has, or stopped short of it."""

    quiet_period_s: float = 20.0

    def __post_init__(self) -> None:
        _positive("assembly.quiet_period_s", self.quiet_period_s, "seconds")


@dataclass(frozen=True, slots=True)
class ProtocolsConfig:
    """Which sequence protocols a series may pass."""

    #: None = the ``sequence_protocols/`` folder shipped with the agent.
    folder: Path | None = None
    #: Protocol ids to accept; empty = every protocol in the folder.
    active: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.active:
            if not name.strip():
                raise ConfigError("protocols.active", list(self.active), "protocol ids, none of them empty")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The model and the backend that runs it."""

    #: Folder holding ``manifest.json``; None = the model shipped in the package.
    model: Path | None = None
    backend: str = "auto"
    #: Intra-op threads; 0 = all cores.
    threads: int = 0
    #: Output slices per slab; 0 = the manifest's.
    slab_depth: int = 0
    #: Compiled and exported engines; None = ``<state.folder>/engine-cache``.
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        names = backend_names()
        if self.backend not in names:
            raise ConfigError("engine.backend", self.backend, "one of " + ", ".join(map(repr, names)))
        _non_negative_int("engine.threads", self.threads, "0 = all cores")
        if self.slab_depth < 0 or self.slab_depth % SLAB_DEPTH_MULTIPLE:
            raise ConfigError(
                "engine.slab_depth",
                self.slab_depth,
                f"0 (the manifest's) or a positive multiple of {SLAB_DEPTH_MULTIPLE}",
            )


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """The ZeroMQ sockets navigation systems use: the broadcast PUB and the snapshot ROUTER (docs/protocol.md)."""

    endpoint: str = "tcp://127.0.0.1:5556"
    #: Where late and resynchronising subscribers ask for the current state; "" = derived from ``endpoint``
    #: (see :func:`default_snapshot_endpoint`).
    snapshot_endpoint: str = ""
    #: Finished volumes a snapshot replays (the slabs of series still streaming are always replayed).
    snapshot_volumes: int = 2
    #: "auto" = CURVE whenever an endpoint is reachable from other machines, plain on loopback; "curve" =
    #: always; "plain" = never (off loopback only by this explicit choice, logged as a warning at start).
    security: str = "auto"
    #: The publisher's secret key (a .key_secret file from `sct-agent keys server`); not readable by others.
    secret_key_file: Path | None = None
    #: Folder of the public keys (.key files) of the subscribers allowed in.
    allowed_keys_folder: Path | None = None
    #: A heartbeat goes out after this long without another message, so subscribers can tell idle from dead.
    heartbeat_s: float = 1.0
    #: Messages queued per subscriber before ZeroMQ drops for that subscriber (a slow robot never blocks us;
    #: it sees a sequence gap and resynchronises from a snapshot).
    send_hwm: int = 32

    def __post_init__(self) -> None:
        _check_endpoint("publish.endpoint", self.endpoint)
        if self.snapshot_endpoint:
            _check_endpoint("publish.snapshot_endpoint", self.snapshot_endpoint)
            if self.snapshot_endpoint == self.endpoint and not self.endpoint.endswith(":0"):
                raise ConfigError(
                    "publish.snapshot_endpoint",
                    self.snapshot_endpoint,
                    "an endpoint other than publish.endpoint",
                )
        if self.snapshot_volumes < 1:
            raise ConfigError("publish.snapshot_volumes", self.snapshot_volumes, "an integer >= 1 (volumes)")
        if self.security not in SECURITY_MODES:
            raise ConfigError("publish.security", self.security, " or ".join(map(repr, SECURITY_MODES)))
        _positive("publish.heartbeat_s", self.heartbeat_s, "seconds")
        if self.send_hwm <= 0:
            raise ConfigError("publish.send_hwm", self.send_hwm, "an integer > 0 (messages)")

    @property
    def snapshot(self) -> str:
        """The snapshot endpoint to bind: the configured one, or the documented default."""
        return self.snapshot_endpoint or default_snapshot_endpoint(self.endpoint)


def _check_endpoint(key: str, endpoint: str) -> None:
    scheme = next((s for s in ENDPOINT_SCHEMES if endpoint.startswith(s)), None)
    if scheme is None or len(endpoint) == len(scheme):
        raise ConfigError(
            key,
            endpoint,
            "a ZeroMQ endpoint such as 'tcp://127.0.0.1:5556' ("
            + ", ".join(f"{s}..." for s in ENDPOINT_SCHEMES)
            + ")",
        )


@dataclass(frozen=True, slots=True)
class DicomConfig:
    """The sCT DICOM CT series written for each finished volume, and its optional C-STORE."""

    #: Folder the series are written to (one sub-folder per series, appearing whole); "" = none written.
    folder: Path | None = None
    #: DICOM peer the series are sent to, as "AE_TITLE@host:port"; "" = none.
    store_peer: str = ""
    #: Our AE title in the association.
    calling_ae: str = "SCT-EDGE"
    #: Associations tried per series before giving up (the series stays in the folder).
    store_attempts: int = 3
    #: Seconds before the first retry; doubled for each further one.
    store_backoff_s: float = 2.0
    #: The sCT series number is the MR's plus this.
    series_number_offset: int = 1000

    def __post_init__(self) -> None:
        if self.store_peer:
            from agent.dicom_out.c_store import StorePeer  # noqa: PLC0415 - pynetdicom only when C-STORE is configured

            try:
                StorePeer.parse(self.store_peer)
            except ValueError as error:
                raise ConfigError("dicom.store_peer", self.store_peer, str(error)) from None
            if self.folder is None:
                raise ConfigError(
                    "dicom.folder",
                    "",
                    "a folder: C-STORE sends the series written there (dicom.store_peer is set)",
                )
        if not (0 < len(self.calling_ae) <= AE_TITLE_MAX and self.calling_ae.isascii()):
            raise ConfigError("dicom.calling_ae", self.calling_ae, f"1 to {AE_TITLE_MAX} ASCII characters")
        if self.store_attempts < 1:
            raise ConfigError("dicom.store_attempts", self.store_attempts, "an integer >= 1")
        _positive("dicom.store_backoff_s", self.store_backoff_s, "seconds")
        if not 1 <= self.series_number_offset < SERIES_NUMBER_MAX:
            raise ConfigError(
                "dicom.series_number_offset",
                self.series_number_offset,
                f"an integer from 1 to {SERIES_NUMBER_MAX - 1}",
            )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus exposition; ``listen = ""`` turns it off."""

    listen: str = "127.0.0.1:9108"

    def __post_init__(self) -> None:
        if self.listen:
            try:
                split_listen(self.listen)
            except ValueError as exc:
                raise ConfigError("metrics.listen", self.listen, str(exc)) from None

    @property
    def enabled(self) -> bool:
        return self.listen != ""

    @property
    def host(self) -> str:
        """The address to bind, without IPv6 brackets; ValueError when metrics are off."""
        return self._address()[0]

    @property
    def port(self) -> int:
        """The port to bind; 0 = any free port. ValueError when metrics are off."""
        return self._address()[1]

    def _address(self) -> tuple[str, int]:
        if not self.enabled:
            raise ValueError("metrics.listen is '' (metrics off): there is no address to bind")
        return split_listen(self.listen)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Bounds between stages: a slow stage applies back-pressure instead of growing memory."""

    queue_depth: int = 64

    def __post_init__(self) -> None:
        if self.queue_depth <= 0:
            raise ConfigError("pipeline.queue_depth", self.queue_depth, "an integer > 0 (items per queue)")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log level and format; JSON lines suit journald and log shippers, text suits a terminal."""

    level: str = "INFO"
    json: bool = False

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ConfigError("logging.level", self.level, "one of " + ", ".join(LOG_LEVELS))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The whole configuration; one attribute per TOML section."""

    watch: WatchConfig = field(default_factory=WatchConfig)
    state: StateConfig = field(default_factory=StateConfig)
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    protocols: ProtocolsConfig = field(default_factory=ProtocolsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    #: Name of the folder under ``state.folder`` that holds engine caches when ``engine.cache_dir`` is unset.
    ENGINE_CACHE_NAME: ClassVar[str] = "engine-cache"

    @property
    def engine_cache_dir(self) -> Path:
        """``engine.cache_dir``, or its documented default under the state folder."""
        if self.engine.cache_dir is not None:
            return self.engine.cache_dir
        return self.state.folder / self.ENGINE_CACHE_NAME


def backend_names() -> tuple[str, ...]:
    """``auto`` and the registered backends, as ``engine.backend`` accepts them.

    Imported here rather than at module level because the registry imports torch (a second or more): the CLI's
    other subcommands and the tests that build configs only pay for it when an engine config is checked.
    """
    from engines.backends.registry import AUTO, BACKENDS  # noqa: PLC0415 - heavy import, see docstring

    return (AUTO, *BACKENDS)


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
