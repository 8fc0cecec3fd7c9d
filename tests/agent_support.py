"""Shared set-up for tests of the running agent: a small phantom, a protocol for it, and a model that lists it.

The seed protocol describes a full lumbar volume (338 x 338 x 100); running the real engine on that in every
end-to-end test would make the suite slow. These tests use a small field of view instead, with the same voxel
size, sequence and echo times, judged by a copy of the seed protocol whose only change is the FOV and whose id
says so, run through a copy of the shipped model (same weights, hash-checked) whose manifest also lists that
protocol. Nothing about the agent is different from production.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

from agent.ops.config import (
    AgentConfig,
    AssemblyConfig,
    DicomConfig,
    EngineConfig,
    MetricsConfig,
    ProtocolsConfig,
    PublishConfig,
    StateConfig,
    StatusPageConfig,
    WatchConfig,
)
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR
from engines.model.manifest import DEFAULT_MODEL_DIR
from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition

SEED_PROTOCOL_ID = "bonemri_lumbar_1p5t"
TEST_PROTOCOL_ID = "test_small_fov_lumbar_1p5t"
#: rows x columns x slab, mm: 162 x 162 x 40 voxels at the seed protocol's 0.74 x 0.74 x 0.9 mm.
SMALL_FOV_MM = (120.0, 120.0, 36.0)
#: Slab depth for the small volume: 40 slices give three slabs, so streaming is exercised.
SMALL_SLAB_DEPTH = 16


def small_acquisition(**changes: object) -> Acquisition:
    return SEED_PROTOCOL.with_changes(fov_mm=SMALL_FOV_MM, **changes)


def write_test_protocol(folder: Path, fov_mm: tuple[float, float, float] = SMALL_FOV_MM) -> Path:
    """The seed protocol with the small FOV and its own id (text edit, so every other rule stays as shipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (SHIPPED_PROTOCOLS_DIR / f"{SEED_PROTOCOL_ID}.toml").read_text()
    text = text.replace(f'id = "{SEED_PROTOCOL_ID}"', f'id = "{TEST_PROTOCOL_ID}"')
    text = text.replace("value = [250.0, 250.0, 90.0]", f"value = {list(fov_mm)}")
    path = folder / f"{TEST_PROTOCOL_ID}.toml"
    path.write_text(text)
    loaded = tomllib.loads(text)
    assert loaded["id"] == TEST_PROTOCOL_ID and loaded["rules"]["FieldOfView"]["value"] == list(fov_mm)
    shutil.copy(SHIPPED_PROTOCOLS_DIR / f"{SEED_PROTOCOL_ID}.toml", folder)
    return folder


def write_test_model(folder: Path) -> Path:
    """The shipped model (same weights file) with the test protocol added to its validated protocols."""
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["validated_protocols"] = [*manifest["validated_protocols"], TEST_PROTOCOL_ID]
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return folder


def agent_config(
    root: Path, protocols: Path, model: Path, *, observer: str = "native", quiet_period_s: float = 5.0
) -> AgentConfig:
    """A configuration on loopback with random ports and the eager CPU backend (no compile warm-up)."""
    return replace(
        AgentConfig(),
        watch=WatchConfig(folder=root / "export", observer=observer, poll_interval_s=0.1),
        state=StateConfig(folder=root / "var"),
        assembly=AssemblyConfig(quiet_period_s=quiet_period_s),
        protocols=ProtocolsConfig(folder=protocols),
        engine=EngineConfig(model=model, backend="torch-eager", slab_depth=SMALL_SLAB_DEPTH),
        publish=PublishConfig(
            endpoint="tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", heartbeat_s=0.2
        ),
        dicom=DicomConfig(folder=root / "dicom"),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
        status_page=StatusPageConfig(listen="127.0.0.1:0"),
    )
