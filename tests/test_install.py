"""What hospital IT does, outside the checkout: build the sdist and the wheel, install the wheel into a fresh
virtual environment, and use the installed ``sct-agent`` (version, help, simulate, check, run, SIGTERM); and a
navigation vendor's environment without torch, where ``agent.client`` alone receives a published volume.

Build. The checkout's files are copied to a temporary folder first (without .git, .venv, caches,
``*.egg-info`` and the git-ignored output folders) and built there with ``python -m build --no-isolation``:
with neither ``--sdist`` nor ``--wheel``, build makes the sdist from the source tree and then the wheel FROM
THAT SDIST, so a file missing from the sdist is missing from the wheel and the tests below fail.
(``--sdist --wheel`` would build both from the source tree, independently, and prove nothing about the sdist.)
Building a copy keeps the build from writing ``sct_edge_agent.egg-info/`` and ``build/`` into a working tree
others are editing, and keeps a stale egg-info's SOURCES.txt (which setuptools reads and obeys) from hiding a
file the packaging configuration misses. ``--no-isolation``: setuptools comes from the checkout's .venv, so
building needs no network.

The agent's environment ("option B"). Installing torch and the other dependencies into a fresh venv with pip
(``pip install torch==2.13.0``, then the wheel) took 66 to 78 s on the two-core development machine with pip's
cache warm, and 1.2 GB of disk per run; so the venv made here has no dependencies of its own. It is created
without pip (the .venv's pip installs into it, run with ``--python``), and one ``.pth`` file in its
site-packages lists the checkout .venv's site-packages directory. A directory listed in a ``.pth`` file is
appended to ``sys.path`` (after the venv's own site-packages), but the ``.pth`` files inside it are not
processed: the editable install's finder, which maps ``agent``, ``engines``, ``sct_core`` and
``sequence_protocols`` to the checkout, is never installed, so the checkout is invisible. The wheel is then
installed with ``pip install --no-index --no-deps --ignore-installed`` (pip sees the editable install's
dist-info through the ``.pth`` path; ``--ignore-installed`` keeps it from even trying to uninstall it).

What that proves: the wheel (built via the sdist) installs; the ``sct-agent`` entry point works; the product's
packages, the shipped protocol files and the shipped model are imported and read from the venv's
site-packages, not from the checkout (checked from a subprocess with PYTHONPATH unset and its working
directory outside the checkout); ``--help`` imports no torch; the installed simulator, ``check`` and ``run``
work, the latter until ready, serving metrics, and stopping with status 0 on SIGTERM. What it does not prove:
that pip resolves the declared dependencies from an index (torch, numpy, ... are the .venv's, at the versions
the rest of the suite runs with). To narrow that gap, every third-party module the installed product imports
for ``run``, ``check`` and ``simulate`` is mapped to its distribution, which must be among the wheel's
declared requirements (Requires-Dist, followed transitively): a module the product needs but does not declare
fails the test. The torch-less environment of the last test is a real one: numpy and pyzmq are installed into
it from the index.

Time: the simulated export is the smallest the shipped protocol passes (2 x 90 slices of 322 x 322; about 30 s
on two cores), simulated while the agent's engine warms up (also about 30 s); the whole file takes about a
minute.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import IO, Any, Final

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wire_support import SUPPORT_WAIT_S, random_hu, running, slabs_and_volume, wait_until

from agent import __version__
from agent.ops.agent_process import READY_PREFIX, free_port
from agent.publish.publisher import Publisher
from agent.records import SctVolume, payload_sha256
from sct_core.geometry import VolumeGeometry

pytestmark = pytest.mark.slow

REPO: Final = Path(__file__).resolve().parents[1]
#: The checkout .venv's site-packages (the dependencies the option-B venv borrows).
CHECKOUT_SITE_PACKAGES: Final = Path(sysconfig.get_path("purelib"))
DISTRIBUTION: Final = "sct-edge-agent"
PACKAGES: Final = ("agent", "engines", "sct_core", "sequence_protocols")
PROTOCOL_FILES: Final = ("bonemri_lumbar_1p5t.toml", "bonemri_lumbar_3t.toml")
#: Files the installed agent reads at run time, as paths inside the wheel (and, under the sdist's top folder,
#: inside the sdist); compared byte for byte with the checkout's.
DATA_FILES: Final = (
    *(f"sequence_protocols/{name}" for name in PROTOCOL_FILES),
    "engines/model/default/manifest.json",
    "engines/model/default/weights.pt",
)
WHEEL_FILES: Final = (
    *DATA_FILES,
    "sequence_protocols/__init__.py",
    "sct_core/geometry.py",
    "agent/cli/__main__.py",
    "agent/client/__init__.py",
    "agent/py.typed",
    "sct_core/py.typed",
)
#: Git-ignored or tool folders at the top of the checkout that a build must not see (see .gitignore).
IGNORED_AT_TOP: Final = frozenset(
    {".git", ".venv", "build", "dist", "var", "export", "runs", "demo-output", ".whl", ".gl"}
)
IGNORED_EVERYWHERE: Final = (
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
)
#: The smallest export the shipped 1.5 T protocol passes: its FieldOfView rule allows 250 ± 12.5 mm in plane
#: and a 90 ± 10 mm slab (voxel and sequence as the protocol's); one phantom sub-voxel per axis.
PASSING_SIMULATION: Final = ("--seed", "7", "--supersample", "1", "--fov-mm", "238,238,81")
#: Output slices per slab for ``run``: the engine warms up on one slab window (8 + 2 x 16 halo slices instead
#: of the manifest's 56 + 32), which is most of the start-up time.
RUN_SLAB_DEPTH: Final = 8
BUILD_TIMEOUT_S: Final = 240.0
PIP_TIMEOUT_S: Final = 240.0
COMMAND_TIMEOUT_S: Final = 120.0
SIMULATE_TIMEOUT_S: Final = 240.0
READY_TIMEOUT_S: Final = 240.0
STOP_TIMEOUT_S: Final = 60.0
#: Environment variables that would let a subprocess see the checkout or change the agent's configuration.
LEAKY_VARIABLES: Final = frozenset(
    {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV", "NOTIFY_SOCKET"}
)


@dataclass(frozen=True, slots=True)
class Artifacts:
    sdist: Path
    wheel: Path


@dataclass(frozen=True, slots=True)
class Venv:
    root: Path
    #: Its site-packages (sysconfig's purelib, as its own interpreter reports it).
    site_packages: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.root / "bin" / name

    def env(self) -> dict[str, str]:
        """The caller's environment as a shell would give it after ``activate``, minus anything that reaches
        back into the checkout or configures the agent."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in LEAKY_VARIABLES and not key.startswith(("SCT_AGENT_", "WATCHDOG_"))
        }
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def run(self, args: Sequence[str | Path], *, cwd: Path, timeout: float = COMMAND_TIMEOUT_S) -> Completed:
        return _run(args, cwd=cwd, env=self.env(), timeout=timeout)


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def text(self) -> str:
        out, err = self.stdout[-4000:], self.stderr[-4000:]
        return f"exit status {self.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def _run(
    args: Sequence[str | Path],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
) -> Completed:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=timeout
    )
    return Completed(result.returncode, result.stdout, result.stderr)


def _outside_checkout(path: Path) -> Path:
    assert not path.resolve().is_relative_to(REPO), f"{path} is inside the checkout {REPO}"
    return path


# ---------------------------------------------------------------------------------------------------- build


def _copy_checkout(dest: Path) -> Path:
    everywhere = shutil.ignore_patterns(*IGNORED_EVERYWHERE)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(everywhere(folder, names))
        if Path(folder).resolve() == REPO:
            skipped |= IGNORED_AT_TOP.intersection(names)
        return skipped

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """The sdist, and the wheel built from it, of the checkout as it is now."""
    root = _outside_checkout(tmp_path_factory.mktemp("build"))
    source = _copy_checkout(root / "source")
    out = root / "dist"
    result = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        cwd=root,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.text()
    assert "Building wheel from sdist" in result.stdout + result.stderr, result.text()
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return Artifacts(sdist=sdists[0], wheel=wheels[0])


def _wheel_metadata(wheel: Path) -> tuple[list[str], dict[str, str]]:
    """The wheel's Requires-Dist lines and its other METADATA headers."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = HeaderParser().parsestr(archive.read(name).decode())
    return message.get_all("Requires-Dist") or [], {key: str(value) for key, value in message.items()}


def test_sdist_and_wheel_carry_the_code_the_protocols_and_the_model(artifacts: Artifacts) -> None:
    shipped = sorted(p.name for p in (REPO / "sequence_protocols").glob("*.toml"))
    assert shipped == sorted(PROTOCOL_FILES), "a protocol was added or removed: update PROTOCOL_FILES"
    with zipfile.ZipFile(artifacts.wheel) as wheel:
        names = set(wheel.namelist())
        for path in WHEEL_FILES:
            assert path in names, f"{path} is missing from {artifacts.wheel.name}"
        for path in DATA_FILES:
            assert wheel.read(path) == (REPO / path).read_bytes(), f"{path} differs from the checkout's"
        dist_info = f"sct_edge_agent-{__version__}.dist-info"
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    # Nothing but the product at the top of site-packages: no tests/, bench/ or docs/ package.
    assert {name.split("/")[0] for name in names} == {*PACKAGES, dist_info}
    assert "sct-agent = agent.cli:main" in entry_points
    requirements, headers = _wheel_metadata(artifacts.wheel)
    assert headers["Name"] == DISTRIBUTION and headers["Version"] == __version__
    assert {canonicalize_name(Requirement(r).name) for r in requirements} >= {"torch", "numpy", "pyzmq"}

    top = f"sct_edge_agent-{__version__}"
    with tarfile.open(artifacts.sdist) as sdist:
        members = set(sdist.getnames())
        for path in ("pyproject.toml", "PKG-INFO", "README.md", *WHEEL_FILES):
            assert f"{top}/{path}" in members, f"{path} is missing from {artifacts.sdist.name}"
        for path in DATA_FILES:
            member = sdist.extractfile(f"{top}/{path}")
            assert member is not None and member.read() == (REPO / path).read_bytes(), path


# ----------------------------------------------------------------------------------------------- the venvs


def _create_venv(root: Path) -> Venv:
    """A venv without pip (the .venv's pip installs into it with ``--python``: no ensurepip, 6 s saved)."""
    created = _run([sys.executable, "-m", "venv", "--without-pip", _outside_checkout(root)], cwd=root.parent)
    assert created.returncode == 0, created.text()
    bare = Venv(root, site_packages=root)
    purelib = bare.run(
        [bare.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root
    )
    assert purelib.returncode == 0, purelib.text()
    site_packages = Path(purelib.stdout.strip())
    assert site_packages.is_relative_to(root), site_packages
    return Venv(root, site_packages=site_packages)


def _pip_install(venv: Venv, *args: str | Path) -> Completed:
    """``pip install ARGS`` into ``venv`` (the .venv's pip, run with the venv's interpreter)."""
    return venv.run(
        [sys.executable, "-m", "pip", "--python", venv.python, "install", *args],
        cwd=venv.root,
        timeout=PIP_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def installed(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """The wheel installed into a fresh venv borrowing the .venv's dependencies (see the module docstring)."""
    venv = _create_venv(tmp_path_factory.mktemp("agent-venv") / "venv")
    (venv.site_packages / "borrowed_dependencies.pth").write_text(f"{CHECKOUT_SITE_PACKAGES}\n")
    result = _pip_install(venv, "--no-index", "--no-deps", "--ignore-installed", artifacts.wheel)
    assert result.returncode == 0, result.text()
    return venv


#: Run in the installed venv: where the product's modules, protocols and model come from, and which modules
#: the commands ``run``, ``check`` and ``simulate`` import.
WHERE_FROM = """
import importlib, json, sys, sysconfig
packages = ("agent", "agent.cli", "agent.client", "engines", "sct_core", "sequence_protocols")
files = {name: importlib.import_module(name).__file__ for name in packages}
import agent
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR
from engines.model.manifest import DEFAULT_MODEL_DIR
for name in ("agent.cli.run", "agent.cli.check", "agent.cli.simulate", "agent.service"):
    importlib.import_module(name)
print(json.dumps({
    "files": files,
    "version": agent.__version__,
    "protocols": str(SHIPPED_PROTOCOLS_DIR),
    "model": str(DEFAULT_MODEL_DIR),
    "purelib": sysconfig.get_path("purelib"),
    "sys_path": sys.path,
    "module_files": sorted({f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}),
}))
"""


def _declared_closure(requirements: Iterable[str]) -> set[str]:
    """The distributions ``requirements`` (no extras asked for) pull in, transitively, as installed here."""
    found: set[str] = set()
    todo = [(Requirement(r), frozenset({""})) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        asked = frozenset({"", *requirement.extras})
        todo.extend((Requirement(r), asked) for r in importlib.metadata.requires(name) or [])
    return found


def _top_level_name(path: Path) -> str:
    """The import name a module file inside site-packages belongs to: its package, or the module itself."""
    return path.parts[0] if len(path.parts) > 1 else path.name.split(".")[0]


def test_the_installed_product_runs_from_the_venv_not_from_the_checkout(
    installed: Venv, artifacts: Artifacts, tmp_path: Path
) -> None:
    cwd = _outside_checkout(tmp_path)
    result = installed.run([installed.python, "-c", WHERE_FROM], cwd=cwd)
    assert result.returncode == 0, result.text()
    found = json.loads(result.stdout)
    assert Path(found["purelib"]) == installed.site_packages
    for name, file in found["files"].items():
        assert Path(file).is_relative_to(installed.site_packages), f"{name} imported from {file}"
        assert not Path(file).resolve().is_relative_to(REPO), f"{name} imported from {file}"
    assert str(REPO) not in found["sys_path"]
    assert found["version"] == __version__
    assert Path(found["protocols"]) == installed.site_packages / "sequence_protocols"
    assert sorted(p.name for p in Path(found["protocols"]).glob("*.toml")) == sorted(PROTOCOL_FILES)
    assert Path(found["model"]) == installed.site_packages / "engines" / "model" / "default"

    # Every third-party module those commands import is a declared requirement (or one of theirs).
    borrowed = {
        _top_level_name(Path(file).relative_to(CHECKOUT_SITE_PACKAGES))
        for file in found["module_files"]
        if Path(file).is_relative_to(CHECKOUT_SITE_PACKAGES)
    }
    assert "torch" in borrowed and "numpy" in borrowed
    providers = importlib.metadata.packages_distributions()
    declared = _declared_closure(_wheel_metadata(artifacts.wheel)[0])
    undeclared = {
        name: providers.get(name)
        for name in borrowed
        if not {canonicalize_name(d) for d in providers.get(name, [])} & declared
    }
    assert undeclared == {}, "imported but not declared in [project] dependencies"

    version = installed.run([installed.script("sct-agent"), "--version"], cwd=cwd)
    assert version.returncode == 0 and version.stdout.strip() == f"sct-agent {__version__}", version.text()
    help_text = installed.run([installed.script("sct-agent"), "--help"], cwd=cwd)
    assert help_text.returncode == 0 and "simulate" in help_text.stdout, help_text.text()
    torch_for_help = installed.run(
        [
            installed.python,
            "-c",
            "import sys, agent.cli; agent.cli.build_parser([]); print('torch' in sys.modules)",
        ],
        cwd=cwd,
    )
    assert torch_for_help.returncode == 0 and torch_for_help.stdout.strip() == "False", torch_for_help.text()


# -------------------------------------------------------------------------------------- simulate, check, run


@contextmanager
def _reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``process``, killed on the way out if it still runs (a failed assertion leaves nothing behind), its
    pipes closed and its status collected."""
    with process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def _read_line(stream: IO[str] | None, timeout_s: float) -> str:
    """One line from ``stream``; "" if none comes within ``timeout_s`` (the reader ends with the stream)."""
    assert stream is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else ""


def _write_agent_config(folder: Path) -> tuple[Path, str]:
    """``folder/agent.toml``: export/ and var/ beside it, free loopback ports, the eager CPU backend; DICOM
    output off (the default). Returns the file and the metrics URL."""
    folder.mkdir(parents=True)
    metrics = f"127.0.0.1:{free_port()}"
    path = folder / "agent.toml"
    path.write_text(
        '[watch]\nfolder = "export"\n\n[state]\nfolder = "var"\n\n'
        f'[publish]\nendpoint = "tcp://127.0.0.1:{free_port()}"\n'
        f'snapshot_endpoint = "tcp://127.0.0.1:{free_port()}"\n\n'
        f'[metrics]\nlisten = "{metrics}"\n\n'
        f'[engine]\nbackend = "torch-eager"\nslab_depth = {RUN_SLAB_DEPTH}\n'
    )
    return path, f"http://{metrics}/metrics"


def _run_agent_until_ready_then_stop(venv: Venv, folder: Path) -> tuple[str, str]:
    """``sct-agent run --config FILE`` as systemd runs it: wait for the ready line, read the metrics, SIGTERM.
    Returns the log (stderr) and the metrics text."""
    config, metrics_url = _write_agent_config(folder)
    log_path = folder / "agent.log"
    with (
        log_path.open("w") as log,
        _reaped(
            subprocess.Popen(
                [venv.script("sct-agent"), "run", "--config", str(config)],
                cwd=folder,
                env=venv.env(),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        ) as agent_process,
    ):
        ready = _read_line(agent_process.stdout, READY_TIMEOUT_S)
        assert ready.startswith(READY_PREFIX), f"no ready line: {ready!r}\n{log_path.read_text()[-4000:]}"
        with urllib.request.urlopen(metrics_url, timeout=COMMAND_TIMEOUT_S) as response:
            metrics = response.read().decode()
        agent_process.send_signal(signal.SIGTERM)
        status = agent_process.wait(STOP_TIMEOUT_S)
    text = log_path.read_text()
    assert status == 0, text
    return text, metrics


@pytest.mark.timeout(900)
def test_the_installed_cli_simulates_a_passing_export_checks_it_and_runs_the_agent(
    installed: Venv, tmp_path: Path
) -> None:
    work = _outside_checkout(tmp_path)
    export = work / "scanner-export"
    sct_agent = installed.script("sct-agent")
    # The phantom (the largest part of this test) is simulated while the agent's engine warms up.
    with _reaped(
        subprocess.Popen(
            [sct_agent, "simulate", "--out", str(export), *PASSING_SIMULATION],
            cwd=work,
            env=installed.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ) as simulation:
        log, metrics = _run_agent_until_ready_then_stop(installed, work / "agent")
        simulated, _ = simulation.communicate(timeout=SIMULATE_TIMEOUT_S)
    assert simulation.returncode == 0, simulated

    # The agent started with the shipped model and protocols, served metrics, and stopped cleanly.
    model_id = json.loads((REPO / "engines/model/default/manifest.json").read_text())["model_id"]
    (ready_line,) = (line for line in log.splitlines() if " ready: " in line)
    assert f"model {model_id}" in ready_line, ready_line
    for name in PROTOCOL_FILES:
        assert name.removesuffix(".toml") in ready_line, ready_line
    assert "received SIGTERM" in log and "stopped in" in log, log
    assert (work / "agent" / "var" / "journal.sqlite").is_file()
    assert f'sct_agent_build_info{{version="{__version__}"}}' in metrics

    check = installed.run([sct_agent, "check", export], cwd=work)
    assert check.returncode == 0, check.text()
    assert check.stdout.rstrip().endswith("1 of 1 acquisitions pass: PASS"), check.text()
    assert "PASS (final) against protocol bonemri_lumbar_1p5t" in check.stdout, check.text()
    assert "the agent would run the shipped model (protocol bonemri_lumbar_1p5t)" in check.stdout


# ------------------------------------------------------------------------------------- the subscriber alone

#: What the brief for a navigation vendor promises: these imports, and nothing of torch or engines.
IMPORTS_ALONE = (
    "import sys; from agent.client import SctClient, ReceivedVolume, VolumeGeometry; import agent.client; "
    "assert 'torch' not in sys.modules; "
    "assert not any(m == 'engines' or m.startswith('engines.') for m in sys.modules); print('ok')"
)
#: Run in the torch-less venv: receive the volume published before it started (from the snapshot), say so,
#: then the one published after (live); report each, and what was imported.
CLIENT = """
import hashlib, importlib.util, json, sys, time
import numpy as np
import agent.client
from agent.client import ReceivedVolume, SctClient, VolumeGeometry

def report(volume):
    return None if volume is None else {
        "acquisition_id": volume.acquisition_id,
        "sha256": volume.sha256,
        "digest": hashlib.sha256(np.ascontiguousarray(volume.hu, dtype="<i2").tobytes()).hexdigest(),
        "shape": list(volume.hu.shape),
        "affine": volume.geometry.affine.tolist(),
        "from_snapshot": volume.from_snapshot,
        "from_slabs": volume.complete_from_slabs and volume.matches_volume_message,
    }

endpoint, snapshot, wait_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
with SctClient(endpoint, snapshot_endpoint=snapshot) as client:
    before = client.receive_volume(wait_s)
    deadline = time.monotonic() + wait_s
    while not client.synchronised and time.monotonic() < deadline:
        client.receive(0.05)
    heard = client.last_seq or 0
    live = client.wait_for(lambda message: message.seq > heard, wait_s)
    print(json.dumps(report(before) if live is not None else None), flush=True)
    after = client.receive_volume(wait_s) if before is not None and live is not None else None
    print(json.dumps(report(after)), flush=True)
print(json.dumps({
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "torch": "torch" in sys.modules,
    "engines": sorted(m for m in sys.modules if m == "engines" or m.startswith("engines.")),
    "files": [agent.client.__file__, sys.modules[VolumeGeometry.__module__].__file__],
}), flush=True)
"""
CLIENT_WAIT_S: Final = 30.0
#: pip's words when it cannot reach an index.
OFFLINE_SIGNS: Final = (
    "Could not find a version that satisfies",
    "No matching distribution found",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
)
SAMPLE_GEOMETRY: Final = VolumeGeometry(
    shape=(12, 40, 32),
    spacing=(0.9, 0.74, 0.74),
    origin=(-20.0, 10.0, 30.0),
    row_direction=(0.0, 1.0, 0.0),
    column_direction=(0.0, 0.0, -1.0),
    slice_direction=(-1.0, 0.0, 0.0),
)


def _expect(report: dict[str, Any], volume: SctVolume) -> None:
    assert report["acquisition_id"] == volume.acquisition_id
    assert report["sha256"] == report["digest"] == payload_sha256(volume.hu) == volume.sha256
    assert report["shape"] == list(volume.geometry.shape)
    assert report["affine"] == volume.geometry.affine.tolist()


@pytest.mark.timeout(600)
def test_the_subscriber_library_stands_alone_without_torch(artifacts: Artifacts, tmp_path: Path) -> None:
    work = _outside_checkout(tmp_path)
    venv = _create_venv(work / "robot-venv")
    requirements, _ = _wheel_metadata(artifacts.wheel)
    wanted = [r for r in requirements if canonicalize_name(Requirement(r).name) in {"numpy", "pyzmq"}]
    assert len(wanted) == 2, requirements
    dependencies = _pip_install(venv, *wanted)
    if dependencies.returncode != 0 and any(s in dependencies.stderr for s in OFFLINE_SIGNS):
        pytest.skip(f"pip cannot install {wanted} from the package index:\n{dependencies.stderr[-2000:]}")
    assert dependencies.returncode == 0, dependencies.text()
    wheel = _pip_install(venv, "--no-index", "--no-deps", artifacts.wheel)
    assert wheel.returncode == 0, wheel.text()
    alone = venv.run([venv.python, "-c", IMPORTS_ALONE], cwd=work)
    assert alone.returncode == 0 and alone.stdout.strip() == "ok", alone.text()

    before = slabs_and_volume(
        SAMPLE_GEOMETRY, random_hu(SAMPLE_GEOMETRY.shape, 1), acquisition_id="acq-before"
    )
    after = slabs_and_volume(SAMPLE_GEOMETRY, random_hu(SAMPLE_GEOMETRY.shape, 2), acquisition_id="acq-live")
    client_log = work / "client.log"
    publisher = Publisher("tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", heartbeat_s=0.1)
    with running(publisher), client_log.open("w") as log:
        for item in before:
            publisher.submit(item, timeout=SUPPORT_WAIT_S)
        assert wait_until(lambda: publisher.store.volume_count == 1)
        arguments = [publisher.endpoint, str(publisher.snapshot_endpoint), str(CLIENT_WAIT_S)]
        with _reaped(
            subprocess.Popen(
                [venv.python, "-c", CLIENT, *arguments],
                cwd=work,
                env=venv.env(),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        ) as client:
            first = _read_line(client.stdout, 3 * CLIENT_WAIT_S)
            assert first.strip() not in ("", "null"), f"{first!r}\n{client_log.read_text()[-4000:]}"
            for item in after:
                publisher.submit(item, timeout=SUPPORT_WAIT_S)
            rest, _ = client.communicate(timeout=3 * CLIENT_WAIT_S)
    assert client.returncode == 0, client_log.read_text()[-4000:]
    snapshot_report, live_report, imported = (json.loads(line) for line in [first, *rest.splitlines()])

    for report, items in ((snapshot_report, before), (live_report, after)):
        assert report is not None, client_log.read_text()[-4000:]
        volume = items[-1]
        assert isinstance(volume, SctVolume)
        _expect(report, volume)
    assert snapshot_report["from_snapshot"]
    assert not live_report["from_snapshot"] and live_report["from_slabs"]
    assert imported["torch_installed"] is False and imported["torch"] is False
    assert imported["engines"] == []
    for file in imported["files"]:
        assert Path(file).is_relative_to(venv.site_packages), file
