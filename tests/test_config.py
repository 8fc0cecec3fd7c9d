"""Configuration: defaults, file, environment, path resolution, every class of error, and the documented example."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from agent.ops.config import (
    AgentConfig,
    AssemblyConfig,
    ConfigError,
    DicomConfig,
    EngineConfig,
    LoggingConfig,
    MetricsConfig,
    PipelineConfig,
    ProtocolsConfig,
    PublishConfig,
    RetentionConfig,
    StateConfig,
    TomlSyntaxError,
    WatchConfig,
    backend_names,
)
from agent.ops.config_loader import describe_config, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "agent.toml"
SECTION_CLASSES = {f.name: get_type_hints(AgentConfig)[f.name] for f in dataclasses.fields(AgentConfig)}


def write(folder: Path, text: str, name: str = "agent.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def toml_literal(value: object) -> str:
    """How the example file spells a default (None as "", paths and strings quoted)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return f'"{value}"'


# --- defaults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            WatchConfig(),
            {"folder": Path("export"), "observer": "native", "poll_interval_s": 0.25, "recursive": True},
        ),
        (StateConfig(), {"folder": Path("var")}),
        (AssemblyConfig(), {"quiet_period_s": 20.0}),
        (ProtocolsConfig(), {"folder": None, "active": ()}),
        (
            EngineConfig(),
            {"model": None, "backend": "auto", "threads": 0, "slab_depth": 0, "cache_dir": None},
        ),
        (
            PublishConfig(),
            {
                "endpoint": "tcp://127.0.0.1:5556",
                "snapshot_endpoint": "",
                "snapshot_volumes": 2,
                "security": "auto",
                "secret_key_file": None,
                "allowed_keys_folder": None,
                "heartbeat_s": 1.0,
                "send_hwm": 32,
            },
        ),
        (
            DicomConfig(),
            {
                "enabled": True,
                "folder": None,
                "store_peer": "",
                "calling_ae": "SCT-EDGE",
                "store_attempts": 3,
                "store_backoff_s": 2.0,
                "store_timeout_s": 30.0,
                "series_number_offset": 1000,
            },
        ),
        (
            RetentionConfig(),
            {
                "interval_s": 600.0,
                "dicom_max_age_days": 30.0,
                "dicom_max_size_gb": 50.0,
                "snapshot_max_age_days": 7.0,
                "snapshot_max_size_gb": 2.0,
                "journal_max_age_days": 90.0,
                "journal_max_size_mb": 512.0,
                "received_max_age_days": 7.0,
                "received_max_size_gb": 20.0,
                "min_free_mb": 1024.0,
            },
        ),
        (MetricsConfig(), {"listen": "127.0.0.1:9108"}),
        (PipelineConfig(), {"queue_depth": 64}),
        (LoggingConfig(), {"level": "INFO", "format": "auto", "loggers": (), "file_names": "hash"}),
    ],
)
def test_section_defaults(config: Any, expected: dict[str, object]) -> None:
    assert dataclasses.asdict(config) == expected


def test_sections_are_frozen_and_slotted() -> None:
    for cls in (AgentConfig, *(getattr(AgentConfig(), name).__class__ for name in SECTION_CLASSES)):
        params = cls.__dataclass_params__
        assert params.frozen, cls
        assert "__slots__" in cls.__dict__, cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        WatchConfig().observer = "polling"  # type: ignore[misc]


def test_no_file_no_environment_gives_defaults_with_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.watch.folder == tmp_path / "export"
    assert config.state.folder == tmp_path / "var"
    assert config == dataclasses.replace(
        AgentConfig(),
        watch=dataclasses.replace(AgentConfig().watch, folder=tmp_path / "export"),
        state=StateConfig(folder=tmp_path / "var"),
    )


def test_environ_none_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCT_AGENT_PIPELINE_QUEUE_DEPTH", "5")
    assert load_config().pipeline.queue_depth == 5


def test_engine_cache_dir_defaults_under_the_state_folder(tmp_path: Path) -> None:
    config = AgentConfig(state=StateConfig(folder=tmp_path))
    assert config.engine_cache_dir == tmp_path / "engine-cache"
    elsewhere = dataclasses.replace(config, engine=EngineConfig(cache_dir=tmp_path / "c"))
    assert elsewhere.engine_cache_dir == tmp_path / "c"


def test_dicom_series_are_written_by_default_under_the_state_folder(tmp_path: Path) -> None:
    config = AgentConfig(state=StateConfig(folder=tmp_path))
    assert config.dicom_folder == tmp_path / "dicom"
    elsewhere = dataclasses.replace(config, dicom=DicomConfig(folder=tmp_path / "out"))
    assert elsewhere.dicom_folder == tmp_path / "out"
    off = dataclasses.replace(config, dicom=DicomConfig(enabled=False, folder=tmp_path / "out"))
    assert off.dicom_folder is None


def test_dicom_off_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[state]\nfolder = "var"\n[dicom]\nfolder = ""\n')
    assert load_config(path, environ={}).dicom_folder == tmp_path / "var" / "dicom"
    assert load_config(path, environ={"SCT_AGENT_DICOM_ENABLED": "false"}).dicom_folder is None


def test_c_store_needs_the_dicom_series_written() -> None:
    with pytest.raises(ConfigError, match=r"^dicom\.enabled: found False, expected true: C-STORE sends"):
        DicomConfig(enabled=False, store_peer="PACS@127.0.0.1:104")


def test_retention_bounds_in_bytes_and_seconds() -> None:
    assert RetentionConfig.age_seconds(0.0) is None
    assert RetentionConfig.age_seconds(1.5) == 1.5 * 86_400
    assert RetentionConfig.size_bytes(0.0, 1_000_000) is None
    assert RetentionConfig.size_bytes(2.5, 1_000_000_000) == 2_500_000_000


# --- file values and environment overrides --------------------------------------------------------------------


FULL_FILE = """
[watch]
folder = "/srv/x"
observer = "polling"
poll_interval_s = 2
recursive = false

[assembly]
quiet_period_s = 7.5

[protocols]
folder = "/opt/protocols"
active = ["lumbar-a", "lumbar-b"]

[engine]
model = "/opt/model"
backend = "torch-eager"
threads = 2
slab_depth = 16
cache_dir = "/var/cache/x"

[publish]
endpoint = "ipc:///run/sct-agent/pub"
heartbeat_s = 0.5
send_hwm = 100

[metrics]
listen = ""

[pipeline]
queue_depth = 3

[logging]
level = "DEBUG"
format = "json"
loggers = ["watchdog=INFO", "agent.ingest.watcher=WARNING"]
file_names = "relative"
"""


def test_file_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE), environ={})
    assert config.watch == WatchConfig(Path("/srv/x"), "polling", 2.0, False)
    assert isinstance(config.watch.poll_interval_s, float)
    assert config.assembly.quiet_period_s == 7.5
    assert config.protocols == ProtocolsConfig(Path("/opt/protocols"), ("lumbar-a", "lumbar-b"))
    assert config.engine == EngineConfig(Path("/opt/model"), "torch-eager", 2, 16, Path("/var/cache/x"))
    assert config.publish == PublishConfig("ipc:///run/sct-agent/pub", heartbeat_s=0.5, send_hwm=100)
    assert config.metrics.enabled is False
    assert config.pipeline.queue_depth == 3
    assert config.logging == LoggingConfig(
        "DEBUG", "json", ("watchdog=INFO", "agent.ingest.watcher=WARNING"), "relative"
    )
    assert config.logging.logger_levels() == {"watchdog": "INFO", "agent.ingest.watcher": "WARNING"}


def test_a_partial_file_keeps_the_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[publish]\nsend_hwm = 2\n"), environ={})
    assert config.publish == PublishConfig(send_hwm=2)
    assert config.engine == EngineConfig()
    assert config.logging == LoggingConfig()


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    environ = {
        "SCT_AGENT_PUBLISH_ENDPOINT": "tcp://0.0.0.0:7000",
        "SCT_AGENT_WATCH_OBSERVER": "native",
        "SCT_AGENT_WATCH_POLL_INTERVAL_S": "0.1",
        "SCT_AGENT_WATCH_RECURSIVE": "yes",
        "SCT_AGENT_PROTOCOLS_ACTIVE": "a, b,,c",
        "SCT_AGENT_ENGINE_MODEL": "",
        "SCT_AGENT_ENGINE_THREADS": "4",
        "SCT_AGENT_METRICS_LISTEN": "[::1]:0",
        "SCT_AGENT_LOGGING_FORMAT": "journal",
        "SCT_AGENT_LOGGING_LOGGERS": "pynetdicom=DEBUG, watchdog=info",
        "UNRELATED": "x",
    }
    config = load_config(path, environ=environ)
    assert config.publish.endpoint == "tcp://0.0.0.0:7000"
    assert config.publish.send_hwm == 100, "keys the environment leaves alone keep the file's value"
    assert config.watch.observer == "native"
    assert config.watch.poll_interval_s == 0.1
    assert config.watch.recursive is True
    assert config.protocols.active == ("a", "b", "c")
    assert config.engine.model is None, "'' means the default for an optional path"
    assert config.engine.threads == 4
    assert (config.metrics.host, config.metrics.port) == ("::1", 0)
    assert config.logging.format == "journal"
    assert config.logging.logger_levels() == {"pynetdicom": "DEBUG", "watchdog": "INFO"}
    assert config.logging.file_names == "relative", "keys the environment leaves alone keep the file's value"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    assert load_config(environ={"SCT_AGENT_WATCH_RECURSIVE": text}).watch.recursive is expected


def test_empty_list_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[protocols]\nactive = ["a"]\n')
    assert load_config(path, environ={"SCT_AGENT_PROTOCOLS_ACTIVE": ""}).protocols.active == ()


def test_other_sct_agent_variables_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.ops.config_loader"):
        load_config(environ={"SCT_AGENT_CONFIG": "/etc/x.toml", "SCT_AGENT_PUBLSH_ENDPOINT": "tcp://h:1"})
    assert "SCT_AGENT_CONFIG" not in caplog.text
    assert "did you mean SCT_AGENT_PUBLISH_ENDPOINT" in caplog.text


# --- relative paths -------------------------------------------------------------------------------------------


def test_relative_paths_in_a_file_are_relative_to_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        tmp_path / "site",
        '[watch]\nfolder = "in"\n[state]\nfolder = "../state"\n[engine]\nmodel = "models/m1"\ncache_dir = "/abs/c"\n',
    )
    config = load_config(path, environ={})
    assert config.watch.folder == tmp_path / "site" / "in"
    assert config.state.folder == tmp_path / "site" / ".." / "state"
    assert config.engine.model == tmp_path / "site" / "models" / "m1"
    assert config.engine.cache_dir == Path("/abs/c")


def test_a_relative_config_file_path_resolves_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "site", '[watch]\nfolder = "in"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("site/agent.toml"), environ={}).watch.folder == tmp_path / "site" / "in"


def test_environment_and_default_paths_are_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "site", '[watch]\nfolder = "in"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={"SCT_AGENT_WATCH_FOLDER": "from-env", "SCT_AGENT_ENGINE_MODEL": "m"})
    assert config.watch.folder == tmp_path / "from-env"
    assert config.engine.model == tmp_path / "m"
    assert config.state.folder == tmp_path / "var"
    assert all(p.is_absolute() for p in (config.watch.folder, config.state.folder))


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "pattern"),
    [
        (
            "watch",
            'observer = "inotify"',
            r"watch\.observer .*found 'inotify', expected 'native' or 'polling'",
        ),
        ("watch", "poll_interval_s = 0", r"watch\.poll_interval_s .*found 0\.0, expected .*greater than 0"),
        ("watch", "poll_interval_s = nan", r"watch\.poll_interval_s .*found nan"),
        ("watch", 'poll_interval_s = "fast"', r"watch\.poll_interval_s .*found 'fast'.*expected a number"),
        ("watch", 'recursive = "yes"', r"watch\.recursive .*found 'yes'.*expected true or false"),
        ("watch", "folder = 3", r"watch\.folder .*found 3.*expected a path"),
        ("watch", 'folder = ""', r"watch\.folder .*found ''.*expected a path"),
        ("assembly", "quiet_period_s = -1", r"assembly\.quiet_period_s .*found -1\.0.*greater than 0"),
        ("protocols", 'active = "a,b"', r"protocols\.active .*found 'a,b'.*expected a list of strings"),
        ("protocols", 'active = ["a", ""]', r"protocols\.active .*found \['a', ''\].*none of them empty"),
        (
            "engine",
            'backend = "tensorrt-fp8"',
            r"engine\.backend .*found 'tensorrt-fp8', expected one of 'auto'",
        ),
        ("engine", "threads = -1", r"engine\.threads .*found -1, expected an integer >= 0"),
        ("engine", "threads = 2.5", r"engine\.threads .*found 2\.5.*expected an integer"),
        ("engine", "slab_depth = 12", r"engine\.slab_depth .*found 12.*multiple of 8"),
        ("engine", "slab_depth = -8", r"engine\.slab_depth .*found -8.*multiple of 8"),
        (
            "publish",
            'endpoint = "http://h:1"',
            r"publish\.endpoint .*found 'http://h:1'.*tcp://\.\.\., ipc://",
        ),
        ("publish", 'endpoint = "tcp://"', r"publish\.endpoint .*found 'tcp://'"),
        ("publish", "heartbeat_s = 0", r"publish\.heartbeat_s .*found 0\.0.*greater than 0"),
        ("publish", "send_hwm = 0", r"publish\.send_hwm .*found 0, expected an integer > 0"),
        ("publish", "send_hwm = true", r"publish\.send_hwm .*found True.*expected an integer"),
        ("metrics", 'listen = "localhost"', r"metrics\.listen .*found 'localhost'.*host:port"),
        ("metrics", 'listen = "h:65536"', r"metrics\.listen .*found 'h:65536'.*port from 0 to 65535"),
        ("metrics", 'listen = "h:http"', r"metrics\.listen .*found 'h:http'.*port from 0 to 65535"),
        ("metrics", 'listen = "h:\u00b2"', r"metrics\.listen .*found 'h:\u00b2'.*port from 0 to 65535"),
        ("metrics", 'listen = ":9108"', r"metrics\.listen .*found ':9108'.*host:port"),
        ("metrics", 'listen = "::1:80"', r"metrics\.listen .*found '::1:80'.*IPv6 host in brackets"),
        ("pipeline", "queue_depth = 0", r"pipeline\.queue_depth .*found 0, expected an integer > 0"),
        ("retention", "interval_s = 0", r"retention\.interval_s .*found 0\.0.*greater than 0"),
        (
            "retention",
            "dicom_max_size_gb = -1",
            r"retention\.dicom_max_size_gb .*found -1\.0.*>= 0 \(0 = unbounded\)",
        ),
        ("retention", "min_free_mb = inf", r"retention\.min_free_mb .*found inf.*finite number >= 0"),
        ("dicom", 'enabled = "no"', r"dicom\.enabled .*found 'no'.*expected true or false"),
        ("logging", 'level = "VERBOSE"', r"logging\.level .*found 'VERBOSE', expected one of DEBUG, INFO"),
        ("logging", 'format = "syslog"', r"logging\.format .*found 'syslog', expected 'auto' or 'text'"),
        ("logging", 'loggers = ["watchdog"]', r"logging\.loggers .*found 'watchdog'.*logger\.name=LEVEL"),
        ("logging", 'loggers = ["=DEBUG"]', r"logging\.loggers .*found '=DEBUG'"),
        ("logging", 'loggers = ["x=LOUD"]', r"logging\.loggers .*found 'x=LOUD'.*one of DEBUG"),
        (
            "logging",
            'file_names = "name"',
            r"logging\.file_names .*found 'name', expected 'hash' or 'relative'",
        ),
    ],
)
def test_bad_file_value_names_key_file_value_and_expectation(
    tmp_path: Path, section: str, line: str, pattern: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{line}\n")
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_config(path, environ={})
    assert f"(in {path})" in str(caught.value)
    assert caught.value.attribute == f"{section}.{line.split(' =', maxsplit=1)[0]}"


@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("SCT_AGENT_WATCH_OBSERVER", "inotify", r"watch\.observer .*found 'inotify'"),
        ("SCT_AGENT_WATCH_RECURSIVE", "maybe", r"watch\.recursive .*found 'maybe', expected true/false, 1/0"),
        ("SCT_AGENT_WATCH_FOLDER", "", r"watch\.folder .*found '', expected a non-empty path"),
        ("SCT_AGENT_ENGINE_THREADS", "two", r"engine\.threads .*found 'two', expected an integer"),
        ("SCT_AGENT_ENGINE_SLAB_DEPTH", "20", r"engine\.slab_depth .*found 20.*multiple of 8"),
        ("SCT_AGENT_PUBLISH_HEARTBEAT_S", "soon", r"publish\.heartbeat_s .*found 'soon', expected a number"),
        ("SCT_AGENT_PUBLISH_HEARTBEAT_S", "inf", r"publish\.heartbeat_s .*found inf.*finite"),
        ("SCT_AGENT_PUBLISH_ENDPOINT", "udp://h:1", r"publish\.endpoint .*found 'udp://h:1'"),
    ],
)
def test_bad_environment_value_names_the_variable(name: str, value: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_config(environ={name: value})
    assert f"(environment variable {name})" in str(caught.value)


def test_environment_override_of_a_bad_file_value_is_accepted(tmp_path: Path) -> None:
    """Validation runs on the merged value, so an override can rescue a site's file without editing it."""
    path = write(tmp_path, '[watch]\nobserver = "inotify"\n')
    assert load_config(path, environ={"SCT_AGENT_WATCH_OBSERVER": "polling"}).watch.observer == "polling"


def test_error_carries_structured_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipeline]\nqueue_depth = -3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.attribute, error.found, error.source) == ("pipeline.queue_depth", -3, f"in {path}")
    assert "> 0" in error.expected


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(
        ConfigError, match=r"^watch\.observer: found 'fsevents', expected 'native' or 'polling'$"
    ):
        WatchConfig(observer="fsevents")


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "[watch]\npoll_interval = 1\n")
    with pytest.raises(
        ConfigError,
        match=r"watch\.poll_interval \(in .*agent\.toml\): found unknown key 'poll_interval'.*"
        r"did you mean 'poll_interval_s'\? valid: folder, observer, poll_interval_s, recursive",
    ):
        load_config(path, environ={})


def test_unknown_key_far_from_any_lists_the_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "[metrics]\nprometheus = true\n")
    with pytest.raises(ConfigError, match=r"metrics\.prometheus .*unknown key 'prometheus'") as caught:
        load_config(path, environ={})
    assert "did you mean" not in str(caught.value)
    assert "valid: listen" in str(caught.value)


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "[wach]\nfolder = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"wach \(in .*\): found unknown section 'wach'.*did you mean 'watch'\?"
    ):
        load_config(path, environ={})


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "watch = 3\n")
    with pytest.raises(ConfigError, match=r"watch .*found 3, expected a table \[watch\]"):
        load_config(path, environ={})


def test_unknown_environment_key_in_a_known_section_suggests_the_variable() -> None:
    with pytest.raises(
        ConfigError,
        match=r"publish\.hwm \(environment variable SCT_AGENT_PUBLISH_HWM\): found unknown key 'hwm'.*"
        r"did you mean 'SCT_AGENT_PUBLISH_SEND_HWM'\?",
    ):
        load_config(environ={"SCT_AGENT_PUBLISH_HWM": "4"})


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[watch]\nobserver = "polling"\nfolder = /srv/x\n')
    with pytest.raises(
        TomlSyntaxError, match=rf"^{re.escape(str(path))}: line 3: TOML syntax error: "
    ) as caught:
        load_config(path, environ={})
    assert caught.value.line == 3
    assert isinstance(caught.value, ConfigError)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"found '{re.escape(str(path))}', expected a readable TOML file"):
        load_config(path, environ={})


# --- metrics address ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:9108", "127.0.0.1", 9108), ("0.0.0.0:0", "0.0.0.0", 0), ("[::1]:65535", "::1", 65535)],
)
def test_metrics_address(listen: str, host: str, port: int) -> None:
    metrics = MetricsConfig(listen)
    assert metrics.enabled
    assert (metrics.host, metrics.port) == (host, port)


def test_metrics_off_has_no_address() -> None:
    metrics = MetricsConfig("")
    assert metrics.enabled is False
    with pytest.raises(ValueError, match=r"metrics\.listen is ''"):
        _ = metrics.port


# --- describe_config ------------------------------------------------------------------------------------------


def test_describe_config_lists_every_key_and_loads_back(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE), environ={"SCT_AGENT_ENGINE_MODEL": ""})
    text = describe_config(config)
    for section, cls in SECTION_CLASSES.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            assert re.search(rf"^{f.name} = ", text, re.MULTILINE), f"{section}.{f.name}"
    assert 'active = ["lumbar-a", "lumbar-b"]' in text
    assert 'model = ""' in text
    assert load_config(write(tmp_path, text, "printed.toml"), environ={}) == config


def test_describe_config_quotes_awkward_strings(tmp_path: Path) -> None:
    config = dataclasses.replace(AgentConfig(), watch=WatchConfig(folder=tmp_path / 'a "b" \\ c'))
    again = load_config(write(tmp_path, describe_config(config)), environ={})
    assert again.watch.folder == config.watch.folder


# --- the documented production example ------------------------------------------------------------------------


def _example_blocks() -> dict[str, tuple[list[str], str]]:
    """``section.key`` -> (the comment lines directly above it, its line)."""
    blocks: dict[str, tuple[list[str], str]] = {}
    section = ""
    comments: list[str] = []
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("#"):
            comments.append(line)
        elif line.startswith("["):
            section, comments = line.strip("[]"), []
        elif "=" in line:
            blocks[f"{section}.{line.split('=')[0].strip()}"] = (comments, line)
            comments = []
        else:
            comments = []
    return blocks


def test_example_documents_every_key_with_its_default() -> None:
    blocks = _example_blocks()
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            assert key in blocks, f"{key} missing from {EXAMPLE.name}"
            comments, _ = blocks[key]
            assert comments, f"{key}: no comment line directly above it"
            default = getattr(cls(), f.name)
            assert f"Default: {toml_literal(default)}" in " ".join(comments), f"{key}: default not stated"
    assert set(blocks) == {
        f"{s}.{f.name}" for s, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)
    }


def test_example_names_every_backend() -> None:
    comments, _ = _example_blocks()["engine.backend"]
    for name in backend_names():
        assert f'"{name}"' in " ".join(comments)


def test_example_loads_with_production_values() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.watch.folder == Path("/srv/mri-export")
    assert config.state.folder == Path("/var/lib/sct-agent")
    assert config.watch.observer == "polling"
    assert "CIFS/NFS" in " ".join(_example_blocks()["watch.observer"][0])
    assert not math.isnan(config.assembly.quiet_period_s)
