"""The systemd unit: what it must say, that systemd accepts every line, and how exposed its sandbox is.

``systemd-analyze verify`` exits 0 even for an unknown key (it only warns on stderr), so these tests read stderr.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.ops.config_loader import load_config

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "sct-agent.service"
EXAMPLE_CONFIG = ROOT / "systemd" / "agent.toml"
#: The sandbox target, docs/architecture.md (Target figures).
MAX_EXPOSURE = 2.0
PRODUCTION_CONFIG = "/etc/sct-agent/agent.toml"
PRODUCTION_EXECUTABLE = "/opt/sct-agent/.venv/bin/sct-agent"
#: systemd-analyze reads unit files and its built-in tables only; this bounds a hung call.
ANALYZE_TIMEOUT_S = 60
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)


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


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == section and k == key]


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT_S, check=False
    )


def installable_copy(folder: Path, extra_lines: str = "") -> Path:
    """The unit with ExecStart pointing at an executable that exists here, so verify checks everything else.

    On this machine /opt/sct-agent is not installed, and verify's only complaint would be that (rc 1).
    """
    stub = folder / "sct-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    text = UNIT.read_text().replace(f"ExecStart={PRODUCTION_EXECUTABLE} ", f"ExecStart={stub} ")
    assert str(stub) in text
    if extra_lines:
        text = text.replace("[Service]\n", f"[Service]\n{extra_lines}\n")
    copy = folder / UNIT.name
    copy.write_text(text)
    return copy


def test_every_directive_is_commented() -> None:
    lines = UNIT.read_text().splitlines()
    uncommented = [
        f"line {number}: {line}"
        for number, line in enumerate(lines, start=1)
        if line and not line.startswith(("#", "[")) and (number < 2 or not lines[number - 2].startswith("#"))
    ]
    assert not uncommented, "directives without a comment line directly above:\n" + "\n".join(uncommented)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("RestartSec", "5"),
        ("ExecStart", f"{PRODUCTION_EXECUTABLE} run --config {PRODUCTION_CONFIG}"),
        ("User", "sct-agent"),
        ("Group", "sct-agent"),
        ("StateDirectory", "sct-agent"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
        # The agent's journal format: its <N> prefixes are read as priorities (journalctl -p warning).
        ("StandardError", "journal"),
        ("SyslogLevelPrefix", "yes"),
        ("SyslogIdentifier", "sct-agent"),
    ],
)
def test_required_directive(key: str, expected: str) -> None:
    assert values(key) == [expected]


def test_system_call_filter_starts_from_system_service() -> None:
    assert values("SystemCallFilter")[0] == "@system-service"


def test_memory_deny_write_execute_is_left_off_with_the_reason() -> None:
    assert values("MemoryDenyWriteExecute") == []
    text = UNIT.read_text()
    assert re.search(r"#.*MemoryDenyWriteExecute=.*not set.*torch", text), "say why W+X memory is allowed"


def test_unit_matches_the_production_config() -> None:
    config = load_config(EXAMPLE_CONFIG, environ={})
    assert str(config.watch.folder) in values("ReadOnlyPaths")
    assert config.state.folder == Path("/var/lib") / values("StateDirectory")[0]


@needs_systemd_analyze
def test_verify_accepts_every_line(tmp_path: Path) -> None:
    result = run_analyze("verify", str(installable_copy(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_verify_of_the_shipped_file_only_misses_the_install() -> None:
    """The file as shipped: the one complaint allowed is that /opt/sct-agent is not installed on this machine."""
    result = run_analyze("verify", str(UNIT))
    missing_binary = f"Command {PRODUCTION_EXECUTABLE} is not executable"
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    if Path(PRODUCTION_EXECUTABLE).exists():
        assert result.returncode == 0, result.stderr
        assert complaints == []
    else:
        assert [line for line in complaints if missing_binary not in line] == [], result.stderr


@needs_systemd_analyze
def test_verify_check_catches_an_unknown_key(tmp_path: Path) -> None:
    """The check above would pass vacuously if verify reported nothing; it reports this, with rc 0."""
    result = run_analyze("verify", str(installable_copy(tmp_path, "ProtectEverything=yes")))
    assert "Unknown key 'ProtectEverything'" in result.stderr


@needs_systemd_analyze
def test_security_exposure_is_low() -> None:
    result = run_analyze("security", "--offline=yes", str(UNIT))
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
    drop_in = UNIT.parent / "gpu.conf"
    lines = [line for line in drop_in.read_text().splitlines() if line and not line.startswith(("#", "["))]
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
