"""``sct-agent engine build`` as IT runs it: the first call compiles, accepts and caches the engine with a
progress report; the second finds it in the cache and only accepts it again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: Slab depth and in-plane size that keep the AOTInductor compile short: window 2 x (8 + 2 x 16) x 64 x 64.
SLAB_DEPTH = 8
IN_PLANE = ("64", "64")


def build(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "engine", "build", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_engine_build_compiles_once_then_reuses_the_cached_engine(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[state]\nfolder = "{tmp_path / "var"}"\n\n[engine]\nthreads = 2\nslab_depth = {SLAB_DEPTH}\n'
    )
    # torch-aot by name: the CPU default where reduced precision is not accelerated, a real compiled engine.
    first = build(config, "--backend", "torch-aot", "--in-plane", *IN_PLANE)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "engine: torch-aot fp32 on cpu, window 2x40x64x64" in first.stdout
    assert "acceptance: mean |ΔHU|" in first.stdout and "vs fp32 eager: passed" in first.stdout
    assert "  built in " in first.stdout
    # Not a terminal: one progress line per step, the compile among them.
    steps = [line for line in first.stderr.splitlines() if line.startswith("[")]
    assert any("torch-aot fp32: compiling" in line for line in steps)
    assert steps[-1].startswith("[" + "#" * 30 + "] 100%") and steps[-1].endswith("torch-aot fp32: ready")
    engines = tmp_path / "var" / "engine-cache" / "engines"
    assert [p.name for p in engines.iterdir()] == ["torch-aot-fp32-2x40x64x64"]

    second = build(config, "--backend", "torch-aot", "--in-plane", *IN_PLANE, "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout)
    assert result["engine"] == "cached" and result["refusals"] == []
    assert result["acceptance"]["passed"] is True
    assert not any("compiling" in line for line in second.stderr.splitlines())


def test_engine_build_reports_an_unavailable_backend_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[state]\nfolder = "{tmp_path / "var"}"\n')
    result = build(config, "--backend", "torch-cuda")
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1].startswith("sct-agent engine build: torch-cuda: this torch (")
    ), result.stderr[-2000:]
