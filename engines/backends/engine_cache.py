"""Compiled engines on disk: under which key one was built, its file's hash, and the acceptance it passed.

Why a key: a TensorRT plan or an AOTInductor package is machine code for one GPU (or CPU), one driver and CUDA,
one compiler version, one set of weights, one window shape and one precision. Loading one built for anything else
either fails or, worse, runs and computes something else. So each engine folder keeps ``engine.json`` beside the
artefact, and an engine is used only when every field of its key equals this machine's, its file's sha256 equals
the recorded one, and it passed acceptance (``acceptance.py``). Anything else is refused with a message that
names the field, the value found and the value expected, and the engine is rebuilt.

Layout: ``<cache>/engines/<backend>-<precision>-<window>/{engine.json, <artefact>}``; one folder per
configuration, so a new model or a new driver replaces the old engine instead of piling up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.model.manifest import ModelManifest, sha256_of
from sct_core.errors import SctError

RECORD_NAME = "engine.json"
#: Version of the record format; a record of another version is refused like a key that differs.
RECORD_FORMAT = 1
#: Key fields added after records were written, and what their absence in an older record means (an engine built
#: before confidence existed is one without confidence, still valid for a model without it).
_ABSENT_MEANS: dict[str, Any] = {"confidence_sha256": ""}
#: What a record's acceptance must hold for the engine to be judged without running it again.
ACCEPTANCE_FIGURES = ("mean_abs_hu", "p999_abs_hu", "max_abs_hu")


def default_cache_dir() -> Path:
    """Where engines go when the caller names no folder: the user's cache (systemd sets XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sct-agent"


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str:
    """The kernel driver's version (what a driver update changes) and the CUDA version it supports."""
    parts = []
    try:
        match = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        if match:
            parts.append(match.group(1))
    except OSError:
        pass
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)  # CUDA builds of torch only
    if getter is not None:
        version = int(getter())
        parts.append(f"CUDA {version // 1000}.{version % 1000 // 10}")
    return " ".join(parts) or "unknown"


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything a compiled engine depends on; two engines with equal keys are interchangeable."""

    backend: str
    precision: str
    window: tuple[int, ...]
    model_sha256: str
    #: sha256 of the model's confidence statistics (compiled into the engine with the network); "" without.
    confidence_sha256: str
    torch_version: str
    device: str
    #: GPU compute capability ("9.0"); empty on the CPU.
    compute_capability: str
    #: CUDA driver and runtime versions; empty on the CPU.
    driver: str
    cuda: str
    #: TensorRT (or other compiler) version the artefact was built with; empty where none.
    compiler: str
    record_format: int = RECORD_FORMAT

    @classmethod
    def current(
        cls,
        *,
        backend: str,
        precision: str,
        window: tuple[int, ...],
        manifest: ModelManifest,
        device: torch.device,
        compiler: str = "",
    ) -> EngineKey:
        """The key of an engine built now, on this machine, for ``device``."""
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            name, capability = torch.cuda.get_device_name(device), f"{major}.{minor}"
            driver, cuda = _driver_version(), str(torch.version.cuda)
        else:
            name, capability, driver, cuda = _cpu_model(), "", "", ""
        return cls(
            backend=backend,
            precision=precision,
            window=tuple(window),
            model_sha256=manifest.weights_sha256,
            confidence_sha256=manifest.confidence_sha256,
            torch_version=torch.__version__,
            device=name,
            compute_capability=capability,
            driver=driver,
            cuda=cuda,
            compiler=compiler,
        )

    @property
    def folder_name(self) -> str:
        return f"{self.backend}-{self.precision}-{'x'.join(map(str, self.window))}"

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """``field: found <recorded>, expected <ours>`` for each field that differs."""
        ours = self.to_dict()
        return [
            f"{name}: found {recorded.get(name, _ABSENT_MEANS.get(name))!r}, expected {value!r}"
            for name, value in ours.items()
            if recorded.get(name, _ABSENT_MEANS.get(name)) != value
        ]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["window"] = list(self.window)
        return data


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """``engine.json``: the key, the artefact and its hash, how long the build took, acceptance figures."""

    key: dict[str, Any]
    artefact: str
    #: sha256 of the artefact file; None when the artefact is a compiler's own cache folder.
    sha256: str | None
    build_s: float
    built_at: str
    acceptance: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


class EngineRefused(SctError):  # noqa: N818 - a verdict on a cached engine, caught where the engine is rebuilt
    """A cached engine is not used; the message says which check failed, with found and expected values."""

    def __init__(self, message: str, *, found: object = None, expected: str = "") -> None:
        super().__init__(message, attribute="engine cache", found=found, expected=expected)


class EngineStore:
    """The engine folder for one key under a cache directory."""

    def __init__(self, cache_dir: Path, key: EngineKey, artefact: str) -> None:
        self.key = key
        self.folder = cache_dir / "engines" / key.folder_name
        self.artefact_path = self.folder / artefact
        self.record_path = self.folder / RECORD_NAME

    def check(self) -> EngineRecord | None:
        """The record of a usable cached engine, None when there is none; raises :class:`EngineRefused` when
        there is one that must not be used (key differs, file altered or missing, unreadable record)."""
        if not self.record_path.exists():
            return None
        try:
            data = json.loads(self.record_path.read_text())
            record = EngineRecord(
                key=dict(data["key"]),
                artefact=str(data["artefact"]),
                sha256=data["sha256"],
                build_s=float(data["build_s"]),
                built_at=str(data["built_at"]),
                acceptance=dict(data["acceptance"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineRefused(f"cached engine {self.folder}: unreadable {RECORD_NAME} ({exc})") from exc
        differences = self.key.differences(record.key)
        if differences:
            raise EngineRefused(
                f"cached engine {self.folder} was built for another configuration: {'; '.join(differences)}"
            )
        if not self.artefact_path.exists():
            raise EngineRefused(f"cached engine {self.folder}: {self.artefact_path.name} is missing")
        if record.sha256 is not None:
            found = sha256_of(self.artefact_path)
            if found != record.sha256:
                raise EngineRefused(
                    f"cached engine {self.folder}: {self.artefact_path.name} sha256 found {found}, "
                    f"expected {record.sha256} (the file was altered after it was built)"
                )
        if not record.acceptance.get("passed"):
            raise EngineRefused(f"cached engine {self.folder}: it never passed acceptance")
        figures = {name: record.acceptance.get(name) for name in ACCEPTANCE_FIGURES}
        if not all(isinstance(value, int | float) for value in figures.values()):
            raise EngineRefused(
                f"cached engine {self.folder}: acceptance figures found {figures}, expected numbers",
                found=figures,
                expected="numbers",
            )
        return record

    def clear(self) -> None:
        """Remove the folder (a refused or superseded engine)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def scratch(self, *, in_place: bool = False) -> Path:
        """An empty folder to build into: beside the engine folder, moved into place by :meth:`commit`, or (for a
        compiler cache that records its own paths) the engine folder itself, emptied, with the record written
        last so that an interrupted build leaves no record."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        if in_place:
            self.clear()
            self.folder.mkdir()
            return self.folder
        return Path(tempfile.mkdtemp(prefix=f".{self.key.folder_name}-", dir=self.folder.parent))

    def commit(
        self, scratch: Path, *, hashed: bool, build_s: float, acceptance: dict[str, Any]
    ) -> EngineRecord:
        """Write the record into ``scratch`` and swap it in for the engine folder, so a crash never leaves a
        record that describes a half-written artefact."""
        artefact = scratch / self.artefact_path.name
        record = EngineRecord(
            key=self.key.to_dict(),
            artefact=artefact.name,
            sha256=sha256_of(artefact) if hashed else None,
            build_s=round(build_s, 2),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            acceptance=acceptance,
        )
        (scratch / RECORD_NAME).write_text(record.to_json())
        if scratch != self.folder:
            self.clear()
            scratch.replace(self.folder)
        return record
