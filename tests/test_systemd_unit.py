"""The systemd units: what they must say, that systemd accepts every line, and how exposed their sandboxes are.

Two units ship: ``sct-agent.service`` (the agent) and ``sct-serve.service`` (``sct-agent serve``, the Triton server
agents send their slab windows to). The checks every unit must pass run on both; what only one of them says is
checked for that one.

``systemd-analyze verify`` exits 0 even for an unknown key (it only warns on stderr), so these tests read stderr.
"""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.ops.config_loader import load_config
from engines.model.manifest import default_manifest
from engines.serving.triton_server import ServeSettings, is_loopback

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "sct-agent.service"
SERVE_UNIT = ROOT / "systemd" / "sct-serve.service"
GPU_DROP_IN = ROOT / "systemd" / "gpu.conf"
EXAMPLE_CONFIG = ROOT / "systemd" / "agent.toml"
#: The sandbox target, docs/architecture.md (Target figures); both units must meet it.
MAX_EXPOSURE = 2.0
PRODUCTION_CONFIG = "/etc/sct-agent/agent.toml"
PRODUCTION_EXECUTABLE = "/opt/sct-agent/.venv/bin/sct-agent"
#: The serve environment, made from the system's Python 3.11: not the agent's.
SERVE_EXECUTABLE = "/opt/sct-serve/bin/sct-agent"
#: Where systemd puts the unit's RuntimeDirectory= and CacheDirectory= (both "sct-serve").
SERVE_RUNTIME = Path("/run/sct-serve")
SERVE_CACHE = Path("/var/cache/sct-serve")
#: The site's flags, from /etc/sct-serve/serve.env; unbraced, systemd splits it into zero or more arguments.
SERVE_ARGS_VARIABLE = "$SCT_SERVE_ARGS"
#: systemd-analyze reads unit files and its built-in tables only; this bounds a hung call.
ANALYZE_TIMEOUT_S = 60
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)


@dataclass(frozen=True)
class ShippedUnit:
    path: Path
    #: ExecStart='s program, which this machine does not have (installable_copy replaces it).
    executable: str


AGENT = ShippedUnit(UNIT, PRODUCTION_EXECUTABLE)
SERVE = ShippedUnit(SERVE_UNIT, SERVE_EXECUTABLE)
#: The checks every shipped unit must pass run once per unit.
for_each_unit = pytest.mark.parametrize("unit", [AGENT, SERVE], ids=lambda unit: unit.path.stem)


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) per directive line, repeated keys kept in order (configparser would merge them)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            continue
        key, _, value = stripped.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service", unit: Path = UNIT) -> list[str]:
    return [v for s, k, v in directives(unit.read_text()) if s == section and k == key]


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT_S, check=False
    )


def installable_copy(folder: Path, extra_lines: str = "", unit: ShippedUnit = AGENT) -> Path:
    """The unit with ExecStart pointing at an executable that exists here, so verify checks everything else.

    On this machine /opt/sct-agent (/opt/sct-serve) is not installed, and verify's only complaint would be that
    (rc 1).
    """
    stub = folder / "sct-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    text = unit.path.read_text().replace(f"ExecStart={unit.executable} ", f"ExecStart={stub} ")
    assert str(stub) in text
    if extra_lines:
        text = text.replace("[Service]\n", f"[Service]\n{extra_lines}\n")
    copy = folder / unit.path.name
    copy.write_text(text)
    return copy


def serve_command() -> list[str]:
    """sct-serve's ExecStart= as words, the site's $SCT_SERVE_ARGS left as it is."""
    (command,) = values("ExecStart", unit=SERVE_UNIT)
    return shlex.split(command)


def is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@for_each_unit
def test_every_directive_is_commented(unit: ShippedUnit) -> None:
    lines = unit.path.read_text().splitlines()
    uncommented = [
        f"line {number}: {line}"
        for number, line in enumerate(lines, start=1)
        if line and not line.startswith(("#", "[")) and (number < 2 or not lines[number - 2].startswith("#"))
    ]
    assert not uncommented, "directives without a comment line directly above:\n" + "\n".join(uncommented)


#: What both units say: notify start-up, and the same sandbox.
SHARED_DIRECTIVES = [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("Restart", "on-failure"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateMounts", "yes"),
    ("PrivateIPC", "yes"),
    ("NoNewPrivileges", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("RemoveIPC", "yes"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallErrorNumber", "EPERM"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("UMask", "0077"),
    ("StandardError", "journal"),
]
AGENT_DIRECTIVES = [
    ("WatchdogSec", "30"),
    ("RestartSec", "5"),
    ("ExecStart", f"{PRODUCTION_EXECUTABLE} run --config {PRODUCTION_CONFIG}"),
    ("User", "sct-agent"),
    ("Group", "sct-agent"),
    ("StateDirectory", "sct-agent"),
    ("PrivateDevices", "yes"),
    # The agent's journal format: its <N> prefixes are read as priorities (journalctl -p warning).
    ("SyslogLevelPrefix", "yes"),
    ("SyslogIdentifier", "sct-agent"),
]
SERVE_DIRECTIVES = [
    ("User", "sct-serve"),
    ("Group", "sct-serve"),
    ("RuntimeDirectory", "sct-serve"),
    ("CacheDirectory", "sct-serve"),
    # PyTriton runs tritonserver from its copy in the workspace; /run is noexec on Debian and Ubuntu.
    ("ExecPaths", "/run/sct-serve"),
    ("EnvironmentFile", "-/etc/sct-serve/serve.env"),
    # Exit status 2 (bad flags, model or environment) cannot be fixed by restarting.
    ("RestartPreventExitStatus", "2"),
    # SIGTERM to the server only, which stops tritonserver and the model stub itself.
    ("KillMode", "mixed"),
    # The GPU through a device allow-list (see test_the_serve_unit_opens_the_nodes_gpu_conf_opens).
    ("PrivateDevices", "no"),
    ("DevicePolicy", "closed"),
    # Loopback only unless a site lets the agents' addresses in.
    ("IPAddressAllow", "localhost"),
    ("IPAddressDeny", "any"),
    ("SyslogIdentifier", "sct-serve"),
]


@pytest.mark.parametrize(
    ("unit", "key", "expected"),
    [pytest.param(UNIT, key, expected, id=f"sct-agent-{key}") for key, expected in SHARED_DIRECTIVES]
    + [pytest.param(UNIT, key, expected, id=f"sct-agent-{key}") for key, expected in AGENT_DIRECTIVES]
    + [pytest.param(SERVE_UNIT, key, expected, id=f"sct-serve-{key}") for key, expected in SHARED_DIRECTIVES]
    + [pytest.param(SERVE_UNIT, key, expected, id=f"sct-serve-{key}") for key, expected in SERVE_DIRECTIVES],
)
def test_required_directive(unit: Path, key: str, expected: str) -> None:
    assert values(key, unit=unit) == [expected]


@for_each_unit
def test_system_call_filter_starts_from_system_service(unit: ShippedUnit) -> None:
    filters = values("SystemCallFilter", unit=unit.path)
    assert filters[0] == "@system-service"
    assert "~@privileged" in filters


@for_each_unit
def test_memory_deny_write_execute_is_left_off_with_the_reason(unit: ShippedUnit) -> None:
    assert values("MemoryDenyWriteExecute", unit=unit.path) == []
    text = unit.path.read_text()
    assert re.search(r"#.*MemoryDenyWriteExecute=.*not set.*torch", text), "say why W+X memory is allowed"


def test_unit_matches_the_production_config() -> None:
    config = load_config(EXAMPLE_CONFIG, environ={})
    assert str(config.watch.folder) in values("ReadOnlyPaths")
    assert config.state.folder == Path("/var/lib") / values("StateDirectory")[0]


@needs_systemd_analyze
@for_each_unit
def test_verify_accepts_every_line(tmp_path: Path, unit: ShippedUnit) -> None:
    result = run_analyze("verify", str(installable_copy(tmp_path, unit=unit)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
@for_each_unit
def test_verify_of_the_shipped_file_only_misses_the_install(unit: ShippedUnit) -> None:
    """The file as shipped: the one complaint allowed is that /opt/sct-agent (/opt/sct-serve) is not installed on
    this machine."""
    result = run_analyze("verify", str(unit.path))
    missing_binary = f"Command {unit.executable} is not executable"
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    if Path(unit.executable).exists():
        assert result.returncode == 0, result.stderr
        assert complaints == []
    else:
        assert [line for line in complaints if missing_binary not in line] == [], result.stderr


@needs_systemd_analyze
@for_each_unit
def test_verify_check_catches_an_unknown_key(tmp_path: Path, unit: ShippedUnit) -> None:
    """The check above would pass vacuously if verify reported nothing; it reports this, with rc 0."""
    result = run_analyze("verify", str(installable_copy(tmp_path, "ProtectEverything=yes", unit=unit)))
    assert "Unknown key 'ProtectEverything'" in result.stderr


@needs_systemd_analyze
@for_each_unit
def test_security_exposure_is_low(unit: ShippedUnit) -> None:
    """systemd 252 rates both units 1.4."""
    result = run_analyze("security", "--offline=yes", str(unit.path))
    assert result.returncode == 0, result.stderr
    match = _EXPOSURE.search(result.stdout)
    assert match is not None, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@needs_systemd_analyze
def test_security_exposure_check_can_fail(tmp_path: Path) -> None:
    """Without the sandbox the same parse reports a high exposure, so the figure above is the sandbox's doing."""
    bare = tmp_path / UNIT.name
    bare.write_text("[Service]\nType=notify\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    match = _EXPOSURE.search(run_analyze("security", "--offline=yes", str(bare)).stdout)
    assert match is not None
    assert float(match.group(1)) > MAX_EXPOSURE


@needs_systemd_analyze
def test_the_gpu_drop_in_verifies_and_opens_only_nvidia_devices(tmp_path: Path) -> None:
    lines = [
        line for line in GPU_DROP_IN.read_text().splitlines() if line and not line.startswith(("#", "["))
    ]
    assert {line.split("=", 1)[0] for line in lines} == {
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "TimeoutStartSec",
    }
    assert all(line.startswith("DeviceAllow=/dev/nvidia") for line in lines if line.startswith("DeviceAllow"))
    result = run_analyze("verify", str(installable_copy(tmp_path, "\n".join(lines))))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_serve_runs_sct_agent_serve_from_its_own_environment() -> None:
    command = serve_command()
    assert command[:2] == [SERVE_EXECUTABLE, "serve"]
    assert not is_under(Path(SERVE_EXECUTABLE), Path("/opt/sct-agent")), (
        "the serve environment, not the agent's"
    )
    # The site's flags come last, from the environment file, so the unit's own flags stay as they are.
    assert command[-1] == SERVE_ARGS_VARIABLE
    assert SERVE_ARGS_VARIABLE.lstrip("$") in SERVE_UNIT.read_text().split("[Unit]")[0], (
        "document the variable"
    )


def test_serve_workspace_and_cache_are_the_units_own_folders() -> None:
    """--workspace below RuntimeDirectory= (PyTriton refuses a workspace that exists, and systemd makes
    /run/sct-serve itself), short enough for the server's Unix sockets; --cache-dir in CacheDirectory=."""
    command = serve_command()
    args = build_parser(command[1:-1]).parse_args(command[1:-1])
    assert Path("/run") / values("RuntimeDirectory", unit=SERVE_UNIT)[0] == SERVE_RUNTIME
    assert Path("/var/cache") / values("CacheDirectory", unit=SERVE_UNIT)[0] == SERVE_CACHE
    assert is_under(args.workspace, SERVE_RUNTIME)
    assert args.workspace != SERVE_RUNTIME
    assert is_under(args.cache_dir, SERVE_CACHE)
    # The server's own check: the workspace's socket paths fit, and the address is one only this host reaches.
    ServeSettings(manifest=default_manifest(), workspace=args.workspace, address=args.address).check()
    assert is_loopback(args.address), "the unit's default must serve loopback only"


def test_serve_is_a_notify_service_without_a_watchdog() -> None:
    """READY=1 when the engine is warm and the models loaded; serve sends no WATCHDOG=1, so none is expected."""
    assert values("Type", unit=SERVE_UNIT) == ["notify"]
    assert values("WatchdogSec", unit=SERVE_UNIT) == []
    assert int(values("TimeoutStartSec", unit=SERVE_UNIT)[0]) >= 900, "a TensorRT build per window shape"


def test_the_serve_unit_opens_the_nodes_gpu_conf_opens() -> None:
    def device_allow(text: str) -> list[str]:
        return [v for s, k, v in directives(text) if s == "Service" and k == "DeviceAllow"]

    opened = device_allow(SERVE_UNIT.read_text())
    assert opened == device_allow(GPU_DROP_IN.read_text())
    assert all(entry.startswith("/dev/nvidia") for entry in opened)
