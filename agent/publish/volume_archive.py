"""The latest finished sCT volumes on disk, so that a restarted agent can still hand them to a late robot.

The snapshot store lives in memory: without this, an agent restarted by systemd in the middle of a surgical
list would answer a robot that connects afterwards with nothing, although the volume of the patient on the
table was computed minutes ago. Each published volume is therefore kept in ``<state>/snapshot/`` as its HU
array (``<acquisition id>.npy``) and its description (``<acquisition id>.json``: geometry, model, protocol,
sha256; nothing about the patient), written atomically; only the newest ``keep`` are kept. At start the agent
loads them, checks every sha256, and publishes them again marked ``republished`` (docs/protocol.md §3.3), which
puts them back into the snapshot store. A file that fails its check is reported and removed, never sent.

Retention (``prune``, run by agent.ops.retention on its own thread) also bounds the archive by age and size,
oldest first; the size bound never removes the newest volume, the one a restart during a surgical list needs.
A lock keeps ``save`` and ``prune`` apart, so a volume is never pruned half-written.

A volume with confidence (schema 1.4) keeps it too (``<acquisition id>.confidence.npy``, its sha256, method and
threshold in the description), so that a republished volume comes with its confidence and the regions flagged,
which are found again from it (``find_regions``, passed in by the service: the same search the regions stage ran,
so the same regions).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from agent.records import FlagReport, SctVolume, confidence_sha256, payload_sha256
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

ARRAY_SUFFIX: Final = ".npy"
#: The confidence array beside the HU (it ends in ARRAY_SUFFIX too: ``_key_of`` tells them apart).
CONFIDENCE_SUFFIX: Final = ".confidence.npy"
META_SUFFIX: Final = ".json"
#: Suffix of the hidden file a volume is written to before it is renamed into place.
TEMP_SUFFIX: Final = ".tmp"
#: Version of the description file's layout; a file of another version is ignored (and removed).
ARCHIVE_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class ArchiveProblem:
    """A stored volume that could not be loaded, and why (for the log and a status event)."""

    acquisition_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ArchivePrune:
    """What one ``prune`` removed and what the archive holds afterwards (volumes and bytes)."""

    removed: int
    removed_bytes: int
    kept: int
    kept_bytes: int


class VolumeArchive:
    """``save`` runs on the engine stage's thread, ``load`` once at start-up before it, ``prune`` on the retention
    thread: ``save`` and ``prune`` take the archive's lock."""

    def __init__(self, folder: Path, keep: int, *, find_regions: FindRegions | None = None) -> None:
        """``find_regions(confidence, spacing, method, threshold, min_region_mm3)`` finds the regions of a stored
        confidence again at load; without it a republished volume carries its confidence but no regions."""
        if keep < 1:
            raise ValueError(f"VolumeArchive keep: found {keep}; expected >= 1")
        self._folder = folder
        self._keep = keep
        self._find_regions = find_regions
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        return self._folder

    def save(self, volume: SctVolume) -> None:
        """Store ``volume`` (array first, description last: a description only ever names a whole array)."""
        key = _safe_key(volume.acquisition_id)
        meta = _describe(volume)
        with self._lock:
            self._folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self._folder / f"{key}{ARRAY_SUFFIX}", lambda f: np.save(f, volume.hu))
            if volume.confidence is not None:
                confidence = volume.confidence
                _write_atomically(
                    self._folder / f"{key}{CONFIDENCE_SUFFIX}", lambda f: np.save(f, confidence)
                )
            try:
                _write_atomically(
                    self._folder / f"{key}{META_SUFFIX}",
                    lambda f: f.write(json.dumps(meta, indent=1).encode()),
                )
            except BaseException:
                self._remove(key)  # the new array with an older description (or none) must not stay
                raise
            self._prune()

    def prune(
        self, max_age_s: float | None, max_bytes: int | None, *, now: float | None = None
    ) -> ArchivePrune:
        """Remove volumes produced more than ``max_age_s`` ago, then the oldest until at most ``max_bytes`` are
        kept (never the newest); None = no bound. Unreadable descriptions go first."""
        now = time.time() if now is None else now
        with self._lock:
            entries = sorted(self._entries())
            removed = removed_bytes = 0
            kept_bytes = sum(size for _, _, size in entries)
            for index, (produced_at, key, size) in enumerate(entries):
                newest = index == len(entries) - 1
                too_old = max_age_s is not None and now - produced_at > max_age_s
                too_big = max_bytes is not None and kept_bytes > max_bytes and not newest
                if not (too_old or too_big):
                    continue
                self._remove(key)
                removed += 1
                removed_bytes += size
                kept_bytes -= size
            return ArchivePrune(removed, removed_bytes, len(entries) - removed, kept_bytes)

    def _entries(self) -> list[tuple[float, str, int]]:
        """(produced_at, key, bytes of its two files) of every stored volume; -inf for an unreadable one."""
        if not self._folder.is_dir():
            return []
        entries = []
        keys = {path.stem for path in self._folder.glob(f"*{META_SUFFIX}")}
        keys |= {
            _key_of(path) for path in self._folder.glob(f"*{ARRAY_SUFFIX}")
        }  # an array a crash left alone
        for key in keys:
            try:
                produced_at = float(
                    json.loads((self._folder / f"{key}{META_SUFFIX}").read_text())["produced_at"]
                )
            except (OSError, ValueError, KeyError, TypeError):
                produced_at = float("-inf")
            size = 0
            for suffix in (META_SUFFIX, ARRAY_SUFFIX, CONFIDENCE_SUFFIX):
                with suppress(FileNotFoundError):
                    size += (self._folder / f"{key}{suffix}").stat().st_size
            entries.append((produced_at, key, size))
        return entries

    def load(self) -> tuple[list[SctVolume], list[ArchiveProblem]]:
        """The stored volumes, oldest first, each checked against its sha256; and the ones that failed."""
        volumes: list[SctVolume] = []
        problems: list[ArchiveProblem] = []
        for temp in self._folder.glob(f".*{TEMP_SUFFIX}"):
            # A write a crash interrupted: never renamed, so never part of the archive.
            logger.warning("removing %s, a volume file left half-written by an earlier run", temp.name)
            temp.unlink(missing_ok=True)
        for meta_path in sorted(self._folder.glob(f"*{META_SUFFIX}")):
            key = meta_path.stem
            try:
                volumes.append(_load(meta_path, self._folder / f"{key}{ARRAY_SUFFIX}", self._find_regions))
            except (OSError, ValueError, KeyError, TypeError) as error:
                problems.append(ArchiveProblem(key, f"{type(error).__name__}: {error}"))
                logger.error("stored sCT volume %s is unusable and is removed: %s", key, error)
                self._remove(key)
        volumes.sort(key=lambda v: v.produced_at)
        return volumes[-self._keep :], problems

    def _prune(self) -> None:
        described = []
        for meta_path in self._folder.glob(f"*{META_SUFFIX}"):
            try:
                produced_at = float(json.loads(meta_path.read_text())["produced_at"])
            except (OSError, ValueError, KeyError, TypeError):
                produced_at = float("-inf")  # unreadable: the first to go
            described.append((produced_at, meta_path.stem))
        described.sort()
        for _, key in described[: max(0, len(described) - self._keep)]:
            self._remove(key)

    def _remove(self, key: str) -> None:
        for suffix in (META_SUFFIX, ARRAY_SUFFIX, CONFIDENCE_SUFFIX):
            (self._folder / f"{key}{suffix}").unlink(missing_ok=True)


def _describe(volume: SctVolume) -> dict[str, Any]:
    g = volume.geometry
    return {
        "format": ARCHIVE_FORMAT,
        "acquisition_id": volume.acquisition_id,
        "protocol_id": volume.protocol_id,
        "model_id": volume.model_id,
        "model_version": volume.model_version,
        "geometry": {
            "shape": list(g.shape),
            "spacing": list(g.spacing),
            "origin": list(g.origin),
            "row_direction": list(g.row_direction),
            "column_direction": list(g.column_direction),
            "slice_direction": list(g.slice_direction),
        },
        "sha256": volume.sha256,
        "slab_count": volume.slab_count,
        "produced_at": volume.produced_at,
        "last_image_at": volume.last_image_at,
        **(
            {
                "confidence": {
                    "sha256": volume.confidence_sha256,
                    "method": volume.confidence_method,
                    "threshold": volume.confidence_threshold,
                    "min_region_mm3": volume.flagged.min_region_mm3 if volume.flagged is not None else 0.0,
                }
            }
            if volume.confidence is not None
            else {}
        ),
    }


#: ``find_regions(confidence, spacing_mm, method, threshold, min_region_mm3)``: the regions of a stored volume.
FindRegions = Callable[
    [np.ndarray[Any, np.dtype[np.uint8]], tuple[float, float, float], str, int, float], FlagReport
]


def _key_of(path: Path) -> str:
    """The acquisition key of an array file: ``<key>.npy`` or ``<key>.confidence.npy``."""
    name = path.name
    return name[: -len(CONFIDENCE_SUFFIX)] if name.endswith(CONFIDENCE_SUFFIX) else path.stem


def _load_confidence(
    meta: dict[str, Any], path: Path, geometry: VolumeGeometry, find_regions: FindRegions | None
) -> dict[str, Any]:
    """The confidence fields of a stored volume (none when it was stored without)."""
    described = meta.get("confidence")
    if described is None:
        return {}
    confidence = np.load(path, allow_pickle=False)
    if confidence.dtype != np.uint8 or confidence.shape != geometry.shape:
        raise ValueError(
            f"confidence: found {confidence.dtype} {confidence.shape}, expected uint8 {geometry.shape}"
        )
    confidence = np.ascontiguousarray(confidence)
    found = confidence_sha256(confidence)
    if found != described["sha256"]:
        raise ValueError(
            f"confidence sha256: found {found}, expected {described['sha256']} (the array changed)"
        )
    confidence.flags.writeable = False
    method, threshold = str(described["method"]), int(described["threshold"])
    flagged = (
        find_regions(confidence, geometry.spacing, method, threshold, float(described["min_region_mm3"]))
        if find_regions is not None
        else None
    )
    return {
        "confidence": confidence,
        "confidence_sha256": found,
        "confidence_method": method,
        "confidence_threshold": threshold,
        "flagged": flagged,
    }


def _load(meta_path: Path, array_path: Path, find_regions: FindRegions | None = None) -> SctVolume:
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != ARCHIVE_FORMAT:
        raise ValueError(f"format: found {meta.get('format')!r}, expected {ARCHIVE_FORMAT}")
    g = meta["geometry"]
    geometry = VolumeGeometry(
        shape=_triple(g["shape"], int),
        spacing=_triple(g["spacing"], float),
        origin=_triple(g["origin"], float),
        row_direction=_triple(g["row_direction"], float),
        column_direction=_triple(g["column_direction"], float),
        slice_direction=_triple(g["slice_direction"], float),
    )
    hu = np.load(array_path, allow_pickle=False)
    if hu.dtype != np.int16 or hu.shape != geometry.shape:
        raise ValueError(f"array: found {hu.dtype} {hu.shape}, expected int16 {geometry.shape}")
    hu = np.ascontiguousarray(hu)
    found = payload_sha256(hu)
    if found != meta["sha256"]:
        raise ValueError(f"sha256: found {found}, expected {meta['sha256']} (the stored array changed)")
    hu.flags.writeable = False
    return SctVolume(
        acquisition_id=str(meta["acquisition_id"]),
        protocol_id=str(meta["protocol_id"]),
        model_id=str(meta["model_id"]),
        model_version=str(meta["model_version"]),
        geometry=geometry,
        hu=hu,
        sha256=found,
        slab_count=int(meta["slab_count"]),
        produced_at=float(meta["produced_at"]),
        last_image_at=float(meta["last_image_at"]),
        republished=True,
        **_load_confidence(
            meta, array_path.with_name(f"{meta_path.stem}{CONFIDENCE_SUFFIX}"), geometry, find_regions
        ),
    )


def _triple(values: Any, kind: type[int] | type[float]) -> Any:
    if not isinstance(values, list) or len(values) != 3:
        raise ValueError(f"geometry: found {values!r}, expected three numbers")
    return tuple(kind(v) for v in values)


def _safe_key(acquisition_id: str) -> str:
    """Acquisition ids are hex digests; anything else must not become a path."""
    if (
        not acquisition_id
        or not all(c.isalnum() or c in "-_." for c in acquisition_id)
        or acquisition_id[0] == "."
    ):
        raise ValueError(
            f"acquisition_id: found {acquisition_id!r}, expected letters, digits, '-', '_' or '.'"
        )
    return acquisition_id


def _write_atomically(path: Path, write: Any) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        temp.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
