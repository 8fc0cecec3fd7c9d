"""``sct-agent doctor`` as hospital IT runs it: the real command in a child process, against real configuration
files, key files, model copies, sockets and folders in a temporary site, one FAIL provoked at a time; then the
checks the command cannot be steered into from here (a network share, a full disk, an installed unit) called
directly on real folders, a real ``systemd-analyze`` and a mount table in the kernel's format."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.ops.agent_process import free_port
from agent.ops.config import ConfigError, WatchConfig
from agent.ops.config_loader import load_config
from agent.ops.metrics import AgentMetrics
from agent.ops.metrics_server import serve
from agent.ops.preflight import Status
from agent.ops.preflight_host import (
    check_export_folder,
    check_free_space,
    check_systemd_unit,
    mount_of,
)
from agent.publish.curve_keys import create_key_pair
from engines.model.manifest import DEFAULT_MODEL_DIR, MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "sct-agent.service"
#: Loading torch and hashing the weights take seconds; nothing the doctor does should take a minute.
DOCTOR_TIMEOUT_S = 120
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
#: Runs a command without the capabilities that let root read any file, so that root meets permissions too.
WITHOUT_DAC_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    "--",
)


@dataclass(frozen=True, slots=True)
class Line:
    status: str
    name: str
    attribute: str
    message: str


@dataclass(frozen=True, slots=True)
class Report:
    returncode: int
    lines: list[Line]
    stdout: str
    stderr: str

    def only(self, attribute: str) -> Line:
        (line,) = [line for line in self.lines if line.attribute.startswith(attribute)]
        return line

    def statuses(self) -> dict[str, str]:
        return {line.attribute: line.status for line in self.lines}


class Site:
    """A site folder: ``agent.toml`` with this folder's export/ and var/, free loopback ports, CURVE keys."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.export = folder / "export"
        self.export.mkdir()
        keys = folder / "curve"
        _, self.secret = create_key_pair(keys, "server")
        robot, _ = create_key_pair(folder / "robots", "robot-or1")
        self.allowed = keys / "allowed"
        self.allowed.mkdir()
        shutil.copy(robot, self.allowed / robot.name)
        self.publish_port = free_port()
        self.sections: dict[str, dict[str, object]] = {
            "watch": {"folder": "export"},
            "state": {"folder": "var"},
            "publish": {
                "endpoint": f"tcp://127.0.0.1:{self.publish_port}",
                "snapshot_endpoint": f"tcp://127.0.0.1:{free_port()}",
                "security": "curve",
                "secret_key_file": str(self.secret),
                "allowed_keys_folder": str(self.allowed),
            },
            # Port 0: any free port, as the agent takes it.
            "metrics": {"listen": "127.0.0.1:0"},
        }

    def set(self, section: str, **values: object) -> Site:
        self.sections.setdefault(section, {}).update(values)
        return self

    def write(self) -> Path:
        path = self.folder / "agent.toml"
        path.write_text(
            "\n".join(
                f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
                for section, values in self.sections.items()
            )
        )
        return path

    def doctor(self, *extra: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Report:
        """``sct-agent doctor --config agent.toml --json`` in a child process; the report and what it printed."""
        result = run_doctor(
            "--config", str(self.write()), "--json", *extra, cwd=self.folder, prefix=prefix, env=env
        )
        document = json.loads(result.stdout)
        lines = [Line(c["status"], c["name"], c["attribute"], c["message"]) for c in document["checks"]]
        assert document["ok"] is (result.returncode == 0)
        return Report(result.returncode, lines, result.stdout, result.stderr)


def run_doctor(
    *args: str, cwd: Path, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The agent's settings come from the file alone: a developer's SCT_AGENT_* variables would change the site.
    environment = (
        {k: v for k, v in os.environ.items() if not k.startswith("SCT_AGENT_")} if env is None else env
    )
    return subprocess.run(
        [*prefix, sys.executable, "-m", "agent.cli", "doctor", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=DOCTOR_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def assert_fails_only(report: Report, attribute: str, *words: str) -> Line:
    """Exit status 1, and the one FAIL is the line about ``attribute`` saying ``words``."""
    assert report.returncode == 1, report.stdout + report.stderr
    failed = [line for line in report.lines if line.status == "FAIL"]
    assert [line.attribute for line in failed] == [attribute], report.stdout
    for word in words:
        assert word in failed[0].message, failed[0].message
    return failed[0]


# --------------------------------------------------------------------------------------- the command, end to end


def test_a_healthy_site_passes_with_every_check_on_its_own_line(site: Site) -> None:
    result = run_doctor("--config", str(site.write()), cwd=site.folder)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("sct-agent doctor: 0 FAIL, ")
    statuses = {line.split()[0] for line in lines[:-1]}
    assert statuses <= {"OK", "WARN"}, result.stdout
    expected_oks = (
        f"OK    config         {site.folder / 'agent.toml'}: loads",
        "OK    protocols      protocols.active: [] = every protocol in the folder: bonemri_lumbar_1p5t",
        "OK    protocols      validated_protocols: the model sct-lumbar-dual-echo-unet 1.0.0 runs for "
        "bonemri_lumbar_1p5t",
        "OK    model          engine.model: '' (the shipped model",
        f"OK    engine         engine.cache_dir: {site.folder / 'var' / 'engine-cache'} does not exist yet",
        f"OK    keys           publish.secret_key_file: {site.secret}: a valid key, mode -rw-------",
        f"OK    keys           publish.allowed_keys_folder: {site.allowed}: 1 subscriber key(s) allowed",
        f"OK    ports          publish.endpoint: tcp://127.0.0.1:{site.publish_port} can be bound",
        "OK    ports          metrics.listen: 127.0.0.1:0 can be bound",
        f"OK    export folder  watch.folder: {site.export} can be listed by ",
        "OK    free space     state.folder: ",
    )
    for start in expected_oks:
        assert any(line.startswith(start) for line in lines), f"{start!r} not in\n{result.stdout}"
    # Nothing is built here: the engine is only looked for, and a fresh site has none.
    (engine,) = [line for line in lines if "engine.backend:" in line]
    assert engine.startswith("WARN") and "none cached; the first start builds the engine" in engine
    assert f"run `sct-agent engine build --config {site.folder / 'agent.toml'}` as the service user" in engine
    assert not (site.folder / "var").exists()


def test_a_bad_config_key_fails_with_the_loaders_own_message(site: Site) -> None:
    site.set("watch", folderr="export")
    path = site.write()
    with pytest.raises(ConfigError) as loader:
        load_config(path, environ={})
    result = run_doctor("--config", str(path), cwd=site.folder)
    assert result.returncode == 1
    first, *rest = result.stdout.splitlines()
    assert first == f"FAIL  config         {path}: {loader.value}"
    assert "watch.folderr" in first and "did you mean 'folder'?" in first
    assert rest[-1].startswith("sct-agent doctor: 1 FAIL, 0 WARN, 0 OK")


def test_a_missing_protocol_id_fails(site: Site) -> None:
    report = site.set("protocols", active=["bonemri_lumbar_1p5t", "lumbar_site_x"]).doctor()
    assert_fails_only(report, "protocols.active", "'lumbar_site_x'", "expected one of bonemri_lumbar_1p5t")


def test_a_model_validated_for_no_active_protocol_fails(site: Site) -> None:
    report = site.set("protocols", active=["bonemri_lumbar_3t"]).doctor()
    assert_fails_only(report, "validated_protocols", "['bonemri_lumbar_1p5t']", "none of them active")


def test_corrupted_model_weights_fail_with_both_hashes(site: Site) -> None:
    model = site.folder / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    weights = model / json.loads((model / MANIFEST_NAME).read_text())["weights"]["file"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = site.set("engine", model=str(model)).doctor()
    line = assert_fails_only(report, "engine.model", "weights sha256 is", "refusing to load weights")
    assert str(model) in line.message
    # What needs the model says it was not checked, rather than failing a second time.
    assert report.only("engine.backend").status == "WARN"
    assert report.only("validated_protocols").message.startswith("not checked")


def test_a_secret_key_readable_by_others_fails_with_the_fix(site: Site) -> None:
    site.secret.chmod(0o644)
    report = site.doctor()
    assert_fails_only(report, "publish.secret_key_file", "mode -rw-r--r--", f"chmod 600 {site.secret}")


def test_a_secret_key_its_group_can_read_warns(site: Site) -> None:
    """The agent starts with it (only access by others is refused), so the doctor warns and exits 0."""
    site.secret.chmod(0o640)
    report = site.doctor()
    assert report.returncode == 0, report.stdout
    line = report.only("publish.secret_key_file")
    assert line.status == "WARN" and "lets its group read or change it" in line.message


def test_an_empty_allow_list_fails(site: Site) -> None:
    for key in site.allowed.iterdir():
        key.unlink()
    assert_fails_only(site.doctor(), "publish.allowed_keys_folder", "no .key files")


def test_a_port_in_use_fails_and_says_no_agent_holds_it(site: Site) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", site.publish_port))
        holder.listen()
        report = site.set("metrics", listen=metrics).doctor()
    line = assert_fails_only(report, "publish.endpoint", f"tcp://127.0.0.1:{site.publish_port} is in use")
    assert f"No sct-agent answers at http://{metrics}/metrics, so another program holds it" in line.message


@contextmanager
def not_http(port: int) -> Iterator[None]:
    """A program on ``port`` that answers every connection with bytes that are not HTTP (ZeroMQ's greeting)."""
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.1)
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f\r\n\r\n")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        listener.close()


def test_a_port_held_by_a_program_that_does_not_speak_http_is_told_from_an_agent(site: Site) -> None:
    port = free_port()
    with not_http(port):
        report = site.set("metrics", listen=f"127.0.0.1:{port}").doctor()
    line = assert_fails_only(report, "metrics.listen", "is in use")
    assert f"No sct-agent answers at http://127.0.0.1:{port}/metrics" in line.message


def test_a_port_held_by_a_running_agent_says_so(site: Site) -> None:
    """The metrics address is taken by an agent's own metrics server: the doctor asks it and names it."""
    with serve(AgentMetrics(), "127.0.0.1", 0) as server:
        report = site.set("metrics", listen=f"127.0.0.1:{server.port}").doctor()
    line = assert_fails_only(report, "metrics.listen", "is in use")
    assert f"An sct-agent answers at {server.url} (sct_agent_ready 0.0)" in line.message
    assert "the agent seems to be running already" in line.message


def test_two_settings_on_one_port_fail(site: Site) -> None:
    """The ports are held together while checked, as the running agent holds them."""
    report = site.set("metrics", listen=f"127.0.0.1:{site.publish_port}").doctor()
    assert_fails_only(report, "metrics.listen", "is in use")


def test_a_missing_export_folder_fails(site: Site) -> None:
    site.export.rmdir()
    assert_fails_only(site.doctor(), "watch.folder", f"{site.export} does not exist", "mounted before")


def test_an_unreadable_export_folder_fails(site: Site) -> None:
    """chmod 000; root reads anything, so as root the doctor runs without the capabilities that allow it."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip(
                "running as root and setpriv (util-linux) is missing: root can read a mode-000 folder"
            )
        probe = subprocess.run([*WITHOUT_DAC_OVERRIDE, "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE: {probe.stderr.decode().strip()}")
        prefix = WITHOUT_DAC_OVERRIDE
    site.export.chmod(0)
    try:
        report = site.doctor(prefix=prefix)
    finally:
        site.export.chmod(0o755)
    assert_fails_only(report, "watch.folder", "cannot be listed by", "Permission denied", "mode d---------")


def test_without_systemd_analyze_the_unit_is_not_verified_and_it_warns(site: Site) -> None:
    """PATH without the system's tools: the doctor still runs, and says what it could not check."""
    bare = site.folder / "bin"
    bare.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCT_AGENT_")} | {"PATH": str(bare)}
    report = site.doctor(env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    line = report.only("systemd unit")
    assert line.status == "WARN" and line.message.startswith("systemd-analyze not found")


# ------------------------------------------------------------------------------ checks the command can't be led to


def test_free_space_below_the_minimum_fails_and_the_minimum_is_an_argument(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    enough = check_free_space("state.folder", tmp_path / "var", min_free_bytes=1)
    assert enough.status is Status.OK and "not created yet" in enough.message
    short = check_free_space("state.folder", tmp_path, min_free_bytes=free + 1024**4)
    assert short.status is Status.FAIL and short.attribute == "state.folder"
    assert "expected at least" in short.message


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
//pacs-nas/mri\\040export {share} cifs rw,relatime,vers=3.1.1 0 0
"""


def test_the_mount_holding_a_path_is_the_longest_prefix_with_escapes_decoded() -> None:
    mounts = MOUNTS.format(share="/srv/mri\\040export")
    assert mount_of(Path("/srv/mri export/study1"), mounts) == ("/srv/mri export", "cifs")
    assert mount_of(Path("/srv/mri export"), mounts) == ("/srv/mri export", "cifs")
    assert mount_of(Path("/srv/mri exports"), mounts) == ("/", "ext4")
    assert mount_of(Path("/proc/self"), mounts) == ("/proc", "proc")


@pytest.mark.parametrize(("observer", "status"), [("native", Status.WARN), ("polling", Status.OK)])
def test_native_observer_on_a_network_share_warns(tmp_path: Path, observer: str, status: Status) -> None:
    mounts = MOUNTS.format(share=str(tmp_path.resolve()))
    folder_line, observer_line = check_export_folder(WatchConfig(folder=tmp_path, observer=observer), mounts)
    assert folder_line.status is Status.OK and "cifs mounted at" in folder_line.message
    assert observer_line.status is status and observer_line.attribute == "watch.observer"
    if status is Status.WARN:
        assert (
            "inotify gets no events" in observer_line.message
            and "expected 'polling'" in observer_line.message
        )


def installable_unit(folder: Path, extra: str = "") -> Path:
    """The shipped unit with ExecStart= on an executable that exists here, so verify judges the rest."""
    stub = folder / "sct-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    text = UNIT.read_text().replace("ExecStart=/opt/sct-agent/.venv/bin/sct-agent ", f"ExecStart={stub} ")
    unit = folder / UNIT.name
    unit.write_text(text.replace("[Service]\n", f"[Service]\n{extra}\n") if extra else text)
    return unit


@needs_systemd_analyze
def test_an_installed_unit_that_verifies_is_ok(tmp_path: Path) -> None:
    check = check_systemd_unit(installed=[installable_unit(tmp_path)], shipped=[])
    assert check.status is Status.OK, check.message


@needs_systemd_analyze
def test_an_installed_unit_with_an_unknown_key_fails_although_verify_exits_0(tmp_path: Path) -> None:
    check = check_systemd_unit(installed=[installable_unit(tmp_path, "ProtectEverything=yes")], shipped=[])
    assert check.status is Status.FAIL
    assert "Unknown key 'ProtectEverything'" in check.message and "exit status 0" in check.message


@needs_systemd_analyze
def test_without_an_installed_unit_the_shipped_one_is_verified_with_a_note(tmp_path: Path) -> None:
    check = check_systemd_unit(installed=[tmp_path / "absent.service"], shipped=[UNIT])
    assert check.status is Status.WARN
    assert f"the shipped {UNIT} verifies" in check.message and "not installed" in check.message


# ----------------------------------------------------------------------------------- a real engine in the cache


SLAB_DEPTH = 8
#: A small matrix keeps the engine build short: window 2 x (8 + 2 x 16) x 64 x 64.
SMALL_MATRIX = [64, 64]


@pytest.fixture
def small_model(site: Site) -> Iterator[Path]:
    """The shipped model (same weights, same hash) with a 64 x 64 matrix, so its engine builds in seconds."""
    model = site.folder / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    manifest: dict[str, Any] = json.loads((model / MANIFEST_NAME).read_text())
    manifest["input"]["matrix"] = SMALL_MATRIX
    (model / MANIFEST_NAME).write_text(json.dumps(manifest))
    yield model


@pytest.mark.slow
def test_an_engine_built_by_engine_build_is_found_and_an_altered_one_would_be_refused(
    site: Site, small_model: Path
) -> None:
    """The doctor looks for the very engine `engine build` makes (same window, same key), without building."""
    site.set("engine", model=str(small_model), backend="torch-aot", slab_depth=SLAB_DEPTH, threads=2)
    config = site.write()
    built = subprocess.run(
        [sys.executable, "-m", "agent.cli", "engine", "build", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    cached = site.doctor().only("engine.backend")
    assert cached.status == "OK", cached.message
    assert "torch-aot fp32: engine for window 2x40x64x64 cached in" in cached.message
    assert ", accepted: mean |ΔHU|" in cached.message

    (folder,) = (site.folder / "var" / "engine-cache" / "engines").iterdir()
    with (folder / "engine.pt2").open("ab") as engine:
        engine.write(b"\0")
    report = site.doctor()
    assert report.returncode == 0
    refused = report.only("engine.backend")
    assert refused.status == "WARN"
    assert (
        "the cached one would be refused" in refused.message
        and "altered after it was built" in refused.message
    )
    assert "(the refused engine's build here)" in refused.message
    # Looking did not remove or rebuild anything: the altered engine is still there, as left.
    assert (folder / "engine.pt2").stat().st_size > 1 and (folder / "engine.json").exists()
