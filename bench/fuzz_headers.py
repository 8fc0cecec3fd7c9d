"""Coverage-guided fuzzing (atheris / libFuzzer) of the agent's DICOM header reader and its grouping stage.

Why: the agent reads, unattended and during surgery, whatever lands in the scanner's export folder. A transfer
cut short, a vendor's odd encoding or a corrupt header must come out as a bad file (``HeaderError``, or the
assembler's ``on_file(..., "bad", ...)``): it must never take the agent down, and it must never put a
non-finite TR, spacing or position into what the validator and the streamer see. Unit tests cover the
corruptions someone thought of; this looks for the ones nobody did.

What is fuzzed (the first byte of each input picks the mode):

- single file: the bytes are written to a file on tmpfs and read with ``agent.ingest.header_reader.read_header``,
  which must return a ``ParsedFile`` (every number finite) or raise ``HeaderError``; anything else is a crash.
- group: the mutated file and 1 to 3 unchanged companion files (seed files; the group seeds pair files of one
  series) reach one ``Assembler`` with a fake clock, in an order and with timing the input chooses: arrivals,
  flushes and ticks, a half-written companion completed before the retry, the retry delay, the quiet period,
  and ``end_all()`` if the Assembler has one. The assembler must not raise, every file it was given must get
  an outcome through ``on_file``, and every number in every emitted update must be finite.

Seeds: small real scanner files from ``../shared/dicom`` (at least one per series folder, the Enhanced
multi-frame ones included, plus copies of the big Enhanced ones cut to 8 frames) and a tiny classic and Enhanced
series from the project's scanner simulator. A seed keeps a file's header; its pixels become a zero-byte count
that the harness writes back as zeros, so that mutations land where the agent reads. Mutations: libFuzzer's
with a dictionary of DICOM tokens (tags, VRs, UIDs, NaN, 1e309, ...), and a structured mutator that rewrites
the value or the length of one element the agent reads.

How: this script is a supervisor. It prepares OUT (seeds, dictionary) and runs ``--jobs`` worker processes
(this script again, under atheris) until ``--seconds`` have passed, restarting a worker that libFuzzer ended on
a hang (``-timeout``) or an out-of-memory. A worker catches an unexpected exception itself, saves the input,
the traceback and the files the agent was given under OUT/crashes/<id>/, and goes on fuzzing, so one crash does
not end a long run; crashes are told apart by exception type and location. At the end it prints a report and
writes OUT/report.json. Exit status: 0 when nothing crashed or hung, 1 otherwise, 2 when the fuzzer could not
run.

Usage (atheris is a bench tool, not a runtime dependency: ``.venv/bin/pip install -e '.[fuzz]'``)::

    .venv/bin/python bench/fuzz_headers.py --seconds 600 [--out DIR] [--jobs N] [--timeout 10]
    .venv/bin/python bench/fuzz_headers.py --reproduce OUT/crashes/<id>/input-<sha>.bin   # replay one input

One module on purpose: atheris re-executes this file in its worker processes, so the harness, the input
decoder, the seed corpus builder and the replay tool travel together as one script.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import hashlib
import importlib.util
import io
import json
import logging
import math
import numbers
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from agent.ingest.assembler import Assembler
    from agent.ingest.header_reader import NotAnImageError
    from agent.ingest.header_values import HeaderError
    from agent.records import AcquisitionUpdate, ArrivedFile
    from agent.vocabulary import ArrivalSource

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Real scanner files (read in place, never copied into the repository).
DEFAULT_DICOM_DIR = REPO_ROOT.parent / "shared" / "dicom"
#: Real files below this size are preferred as seeds (a series folder with none gives its smallest file).
SEED_SIZE_CAP = 400_000
#: Real files taken from each series folder (spread over the folder's sorted names).
FILES_PER_SERIES = 3
#: Enhanced objects with more frames than this also give a seed with this many of their frames (parsing the
#: functional groups of 200 frames under coverage instrumentation takes most of a second).
REDUCED_FRAMES = 8
#: Tag, VR, reserved bytes and 32-bit length of the PixelData element in explicit VR little endian.
PIXEL_ELEMENT_HEADER_BYTES = 12
#: Packages whose Python code atheris instruments for coverage feedback (pydicom: most of the parsing).
INSTRUMENTED = ("agent", "engines", "pydicom")
#: The assembler's quiet period in the group mode (the agent's default).
QUIET_PERIOD_S = 20.0
#: Fallback when agent.ingest.assembler has no RETRY_DELAY_S.
DEFAULT_RETRY_DELAY_S = 1.0
#: Wall-clock base of the fake clock (detected_at of arrivals).
WALL_BASE_S = 1.7e9
#: Single-file header: mode byte, pad (3 bytes). Group header: mode byte, three companion indices, flags,
#: truncation fraction, pad (3 bytes). See Harness.
SINGLE_HEADER_BYTES = 4
GROUP_HEADER_BYTES = 9
#: Most zero bytes (pixels) written after a file's header: above the largest seed's 3.1 MB of pixels. A header
#: broken before PixelData makes pydicom walk the zeros as 8-byte elements, in time linear in their number
#: (about 0.1 s per MB, five times that under instrumentation): more would turn the run into timeouts.
MAX_PAD_BYTES = 4 << 20
#: Reproducers kept per distinct crash and worker run (a later one only if it is less than half the size).
MAX_REPRODUCERS = 4
#: The input being run, in the worker's scratch folder (the reproducer when libFuzzer ends the worker).
CURRENT_INPUT = "current-input.bin"
#: How often a worker writes its counters (and on every new crash).
STATE_INTERVAL_S = 2.0
#: A worker run is not started with less time than this left.
MIN_RUN_S = 3.0
#: Worker runs in a row that end without fuzzing before the supervisor gives up.
MAX_FAILED_STARTS = 3
#: Hangs traced again (with faulthandler) after the run to find where they hang.
MAX_HANGS_TRACED = 3

# Group-mode flag bits.
FLAG_POSITION_MASK = 0x03  # where the mutated file arrives among the companions
FLAG_DUPLICATE = 0x04  # the mutated file arrives a second time at the end
FLAG_TICK_BETWEEN = 0x08  # 0.3 s and a tick between arrivals
FLAG_HALF_WRITTEN = 0x10  # the last companion arrives cut short and is completed before the retry
FLAG_FLUSH_EACH = 0x20  # flush after every arrival
FLAG_LATE_ARRIVAL = 0x40  # the quiet period passes before the last arrival

#: libFuzzer's statistics line, e.g. ``#2048  pulse  cov: 812 ft: 2210 corp: 61/1204Kb lim: 4096 exec/s: 512 rss: 140Mb``.
_STATS_LINE = re.compile(
    r"^#(?P<n>\d+)\s+(?P<event>\w+)\s+cov: (?P<cov>\d+) ft: (?P<ft>\d+) corp: (?P<corp>\d+)/(?P<corp_size>\S+)"
    r"(?: lim: \d+)? exec/s: (?P<eps>\d+) rss: (?P<rss>\d+)Mb"
)
_DONE_LINE = re.compile(r"^Done (\d+) runs in (\d+) second")
_FINAL_STAT = re.compile(r"^stat::(\w+):\s+(\S+)")
_ARTIFACT_LINE = re.compile(r"Test unit written to (\S+)")
_FAULTHANDLER_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')

#: DICOM tokens for the mutator: tags (little endian), VRs, UIDs, delimiters, and numbers that test the checks.
DICTIONARY_TOKENS: dict[str, bytes] = {
    "magic": b"DICM",
    "tag_echo_time": b"\x18\x00\x81\x00",
    "tag_repetition_time": b"\x18\x00\x80\x00",
    "tag_echo_train_length": b"\x18\x00\x91\x00",
    "tag_slice_thickness": b"\x18\x00\x50\x00",
    "tag_spacing_between_slices": b"\x18\x00\x88\x00",
    "tag_pixel_bandwidth": b"\x18\x00\x95\x00",
    "tag_flip_angle": b"\x18\x00\x14\x13",
    "tag_mr_acquisition_type": b"\x18\x00\x23\x00",
    "tag_rows": b"\x28\x00\x10\x00",
    "tag_columns": b"\x28\x00\x11\x00",
    "tag_pixel_spacing": b"\x28\x00\x30\x00",
    "tag_number_of_frames": b"\x28\x00\x08\x00",
    "tag_bits_allocated": b"\x28\x00\x00\x01",
    "tag_pixel_representation": b"\x28\x00\x03\x01",
    "tag_image_position": b"\x20\x00\x32\x00",
    "tag_image_orientation": b"\x20\x00\x37\x00",
    "tag_images_in_acquisition": b"\x20\x00\x02\x10",
    "tag_sop_class_uid": b"\x08\x00\x16\x00",
    "tag_sop_instance_uid": b"\x08\x00\x18\x00",
    "tag_series_instance_uid": b"\x20\x00\x0e\x00",
    "tag_transfer_syntax": b"\x02\x00\x10\x00",
    "tag_meta_group_length": b"\x02\x00\x00\x00",
    "tag_per_frame_groups": b"\x00\x52\x30\x92",
    "tag_shared_groups": b"\x00\x52\x29\x92",
    "tag_mr_echo_sequence": b"\x18\x00\x14\x91",
    "tag_effective_echo_time": b"\x18\x00\x82\x90",
    "tag_plane_position_sequence": b"\x20\x00\x13\x91",
    "tag_plane_orientation_sequence": b"\x20\x00\x16\x91",
    "tag_pixel_measures_sequence": b"\x28\x00\x10\x91",
    "tag_frame_content_sequence": b"\x20\x00\x11\x91",
    "tag_in_stack_position": b"\x20\x00\x57\x90",
    "tag_pixel_data": b"\xe0\x7f\x10\x00",
    "item": b"\xfe\xff\x00\xe0",
    "item_delimiter": b"\xfe\xff\x0d\xe0",
    "sequence_delimiter": b"\xfe\xff\xdd\xe0",
    "undefined_length": b"\xff\xff\xff\xff",
    "uid_mr": b"1.2.840.10008.5.1.4.1.1.4",
    "uid_enhanced_mr": b"1.2.840.10008.5.1.4.1.1.4.1",
    "uid_implicit_le": b"1.2.840.10008.1.2",
    "uid_explicit_le": b"1.2.840.10008.1.2.1",
    "uid_explicit_be": b"1.2.840.10008.1.2.2",
    "uid_deflated": b"1.2.840.10008.1.2.1.99",
    "backslash": b"\\",
    "nan": b"NaN",
    "inf": b"inf",
    "minus_inf": b"-inf",
    "minus_1e9": b"-1e9",
    "huge": b"1e309",
    "max_double": b"1.7976931348623157e308",
    "tiny": b"1e-320",
    "minus_zero": b"-0",
    "zero_spacing": b"0\\0",
    "magnitude": b"MAGNITUDE",
    "phase": b"PHASE",
    "gradient": b"GRADIENT",
    "yes": b"YES",
    "rf": b"RF",
    "three_d": b"3D",
    "two_d": b"2D",
    **{
        f"vr_{vr.lower()}": vr.encode()
        for vr in ("CS", "DS", "IS", "SQ", "UI", "US", "UL", "FD", "FL", "OB", "OW", "UN", "LO", "SH", "UT")
    },
}


# ------------------------------------------------------------------------------------------------- the target


class InvariantError(AssertionError):
    """The agent returned or emitted something it must not (a non-finite number, a file without outcome)."""


class HarnessError(RuntimeError):
    """The harness itself failed (not a finding about the agent)."""


@dataclass(frozen=True, slots=True)
class FileImage:
    """A file as the harness writes it: ``content``, then zeros up to ``size`` bytes.

    Seeds hold a file's header and its PixelData element header only; the pixels are zeros added when the file
    is written (a sparse extension on tmpfs), so that mutations land in the header, where read_header looks,
    and a multi-megabyte file costs no more to write than its header.
    """

    name: str
    content: bytes
    size: int

    def write(self, path: Path) -> None:
        with path.open("wb") as handle:
            handle.write(self.content[: self.size])
            if self.size > len(self.content):
                handle.truncate(self.size)

    def materialise(self) -> bytes:
        return self.content[: self.size] + bytes(max(self.size - len(self.content), 0))


def pad_of(data: bytes, at: int) -> int:
    """The zero bytes after the content, from the input's 3-byte little-endian field at ``at``, at most
    MAX_PAD_BYTES."""
    return min(int.from_bytes(data[at : at + 3], "little"), MAX_PAD_BYTES)


@dataclass(slots=True)
class Trace:
    """What one execution gave the agent, for the reproducer and the counters."""

    mode: str = ""
    #: Every arrival, in order, as the agent could read it at arrival.
    arrivals: list[FileImage] = field(default_factory=list)
    #: The calls made, in order ("add_file(m.dcm, ...)", "tick at +1.10 s", ...).
    steps: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


class _FakeClock:
    """The assembler's monotonic clock, advanced by the harness."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """Runs one input against ``read_header`` or an ``Assembler``. Exceptions out of the agent propagate.

    Input layout. Single file: ``[mode][pad:3][file]``; group: ``[mode][companion:3][flags][fraction][pad:3]
    [file]``. ``mode`` bit 0 picks the group mode, bits 1-2 the number of companions (1 to 3); ``pad`` is the
    number of zero bytes written after the file (its pixels); companions are files of the pool (indices modulo
    its size); the FLAG_* bits and ``fraction`` (of the last companion, when it arrives half-written) set the
    timing.
    """

    def __init__(self, pool: Sequence[FileImage], scratch: Path) -> None:
        # Imported here, not at the top of the module: a worker imports the agent inside atheris'
        # instrument_imports() so that its code (and pydicom's) reports coverage.
        import agent.ingest.assembler as assembler_module  # noqa: PLC0415
        from agent.ingest.assembler import Assembler  # noqa: PLC0415
        from agent.ingest.header_reader import NotAnImageError, read_header  # noqa: PLC0415
        from agent.ingest.header_values import HeaderError  # noqa: PLC0415
        from agent.records import ArrivedFile  # noqa: PLC0415
        from agent.vocabulary import ArrivalSource  # noqa: PLC0415

        self._assembler_cls: type[Assembler] = Assembler
        self._read_header: Callable[[Path], object] = read_header
        self._header_error: type[HeaderError] = HeaderError
        self._not_an_image: type[NotAnImageError] = NotAnImageError
        self._arrived_cls: type[ArrivedFile] = ArrivedFile
        self._event: ArrivalSource = ArrivalSource.EVENT
        self._retry_delay_s = float(getattr(assembler_module, "RETRY_DELAY_S", DEFAULT_RETRY_DELAY_S))
        self._pool = list(pool)
        self._scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)

    def execute(self, data: bytes, trace: Trace) -> None:
        if len(data) >= GROUP_HEADER_BYTES and data[0] & 1:
            self._group(data, trace)
        else:
            payload = data[SINGLE_HEADER_BYTES:]
            self._single(FileImage("single.dcm", payload, len(payload) + pad_of(data, 1)), trace)

    def _single(self, image: FileImage, trace: Trace) -> None:
        trace.mode = "single"
        path = self._scratch / image.name
        image.write(path)
        trace.arrivals.append(image)
        trace.steps.append(f"read_header({image.name}) ({image.size} bytes)")
        try:
            parsed = self._read_header(path)
        except self._not_an_image:
            trace.counts["read_header: NotAnImageError"] += 1
            return
        except self._header_error:
            trace.counts["read_header: HeaderError"] += 1
            return
        trace.counts["read_header: parsed"] += 1
        problems = non_finite(parsed, "parsed")
        if problems:
            raise InvariantError(f"non-finite value in read_header's result: {problems[0]}")

    def _group(self, data: bytes, trace: Trace) -> None:
        trace.mode = "group"
        arrivals, flags, completions = self._plan_group(data)
        clock = _FakeClock()
        updates: list[AcquisitionUpdate] = []
        outcomes: dict[int, list[str]] = {}

        def on_file(arrived: ArrivedFile, outcome: str, reason: str, acquisition_id: str | None) -> None:
            outcomes.setdefault(id(arrived), []).append(outcome)
            trace.counts[f"assembler file: {outcome}"] += 1

        assembler = self._assembler_cls(
            updates.append, quiet_period_s=QUIET_PERIOD_S, on_file=on_file, clock=clock
        )

        def tick(advance_s: float) -> None:
            clock.now += advance_s
            trace.steps.append(f"tick() at +{clock.now:.2f} s")
            assembler.tick()

        def flush() -> None:
            trace.steps.append("flush()")
            assembler.flush()

        given: list[ArrivedFile] = []
        for index, image in enumerate(arrivals):
            if flags & FLAG_LATE_ARRIVAL and index == len(arrivals) - 1 and index > 0:
                tick(QUIET_PERIOD_S + 1.0)
            path = self._scratch / image.name
            image.write(path)
            stat = path.stat()
            arrived = self._arrived_cls(
                path=path,
                size=stat.st_size,
                mtime_ns=stat.st_mtime_ns,
                detected_at=WALL_BASE_S + clock.now,
                source=self._event,
            )
            given.append(arrived)
            trace.arrivals.append(image)
            trace.steps.append(f"add_file({image.name}) ({image.size} bytes) at +{clock.now:.2f} s")
            assembler.add_file(arrived)
            if flags & FLAG_FLUSH_EACH:
                flush()
            if flags & FLAG_TICK_BETWEEN:
                tick(0.3)
        flush()
        for image in completions:
            # The writer finishes the half-written file before the assembler reads it again.
            image.write(self._scratch / image.name)
            trace.steps.append(f"{image.name} completed ({image.size} bytes)")
        tick(self._retry_delay_s + 0.1)
        flush()
        tick(QUIET_PERIOD_S + 1.0)
        flush()
        end_all = getattr(assembler, "end_all", None)
        if callable(end_all):
            trace.steps.append("end_all()")
            end_all()
            flush()

        for update in updates:
            trace.counts[f"update: {update.kind}"] += 1
            if update.view.grid is not None:
                trace.counts["update: grid placed"] += 1
            problems = non_finite(update, "update")
            if problems:
                raise InvariantError(f"non-finite value in an emitted update: {problems[0]}")
        missing = [a.path.name for a in given if id(a) not in outcomes]
        if missing:
            raise InvariantError(f"file given to the assembler without an outcome: {missing[0]}")

    def _plan_group(self, data: bytes) -> tuple[list[FileImage], int, list[FileImage]]:
        """The arrivals of a group input (companions from the pool, the mutated file among them), its flags,
        and the half-written files as they are once complete."""
        flags, fraction = data[4], data[5]
        payload = data[GROUP_HEADER_BYTES:]
        n_companions = 1 + ((data[0] >> 1) & 3) % 3 if self._pool else 0
        companions = [
            FileImage(f"c{i}.dcm", pooled.content, pooled.size)
            for i, pooled in enumerate(self._pool[data[1 + i] % len(self._pool)] for i in range(n_companions))
        ]
        completions: list[FileImage] = []
        if flags & FLAG_HALF_WRITTEN and companions:
            complete = companions[-1]
            companions[-1] = FileImage(complete.name, complete.content, complete.size * fraction // 256)
            completions.append(complete)
        mutated = FileImage("m.dcm", payload, len(payload) + pad_of(data, 6))
        arrivals = list(companions)
        arrivals.insert((flags & FLAG_POSITION_MASK) % (len(companions) + 1), mutated)
        if flags & FLAG_DUPLICATE:
            arrivals.append(mutated)
        return arrivals, flags, completions


def non_finite(value: object, where: str, depth: int = 0) -> list[str]:
    """Paths (``update.view.grid.origin[2] = inf``) of the non-finite numbers in a record, found generically:
    dataclass fields, tuples, lists and dicts, recursively."""
    if depth > 12 or value is None or isinstance(value, str | bytes | Path | Enum | numbers.Integral):
        return []
    if isinstance(value, numbers.Real):
        return [] if math.isfinite(float(value)) else [f"{where} = {value!r}"]
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not bool(np.all(np.isfinite(value))):
            return [f"{where} (array)"]
        return []
    found: list[str] = []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            found += non_finite(getattr(value, item.name), f"{where}.{item.name}", depth + 1)
    elif isinstance(value, tuple | list):
        for index, item in enumerate(value):
            found += non_finite(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            found += non_finite(item, f"{where}[{key!r}]", depth + 1)
    return found


# ------------------------------------------------------------------------------------------------- crashes


@dataclass(frozen=True, slots=True)
class CrashKind:
    """One distinct crash: the exception type and where it was raised."""

    exception: str
    #: The innermost frame in the agent's own code (agent/, engines/), "path:line (function)".
    location: str
    #: The innermost frame of all (e.g. inside pydicom), "path (function)".
    innermost: str

    @property
    def key(self) -> str:
        return f"{self.exception}|{self.location}|{self.innermost}"

    @property
    def ident(self) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.exception).strip("-")[:40]
        return f"{name}-{hashlib.sha1(self.key.encode()).hexdigest()[:10]}"


def classify(error: BaseException) -> CrashKind | None:
    """The crash's kind, or None when no frame of the agent is involved (a harness failure)."""
    if isinstance(error, InvariantError):
        where = re.sub(r"\[\d+\]", "[*]", str(error).split(" = ")[0])
        return CrashKind("InvariantError", where, "")
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if _repo_relative(f.filename) is not None]
    if not own:
        return None
    last_own, last = own[-1], frames[-1]
    location = f"{_repo_relative(last_own.filename)}:{last_own.lineno} ({last_own.name})"
    inner_file = _repo_relative(last.filename) or _short_path(last.filename)
    return CrashKind(_exception_name(error), location, f"{inner_file} ({last.name})")


def _exception_name(error: BaseException) -> str:
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _repo_relative(filename: str) -> str | None:
    """``agent/...`` or ``engines/...`` for the project's own code, else None."""
    try:
        relative = Path(filename).resolve().relative_to(REPO_ROOT)
    except ValueError:
        return None
    return relative.as_posix() if relative.parts and relative.parts[0] in ("agent", "engines") else None


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    return "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else filename


class CrashStore:
    """Saves crash reproducers under OUT/crashes/<ident>/ and counts hits (one instance per worker run)."""

    def __init__(self, root: Path, worker: str) -> None:
        self.root = root
        self.worker = worker
        self.hits: Counter[str] = Counter()
        self._smallest: dict[str, int] = {}
        self._saved: Counter[str] = Counter()

    def record(self, kind: CrashKind, error: BaseException, data: bytes, trace: Trace) -> bool:
        """Count a hit; save the input when it is the first, or much smaller. True when a new kind."""
        new = self.hits[kind.ident] == 0
        self.hits[kind.ident] += 1
        smallest = self._smallest.get(kind.ident)
        if self._saved[kind.ident] >= MAX_REPRODUCERS or (smallest is not None and len(data) * 2 > smallest):
            return new
        self._smallest[kind.ident] = len(data)
        self._saved[kind.ident] += 1
        folder = self.root / kind.ident
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            meta.write_text(
                json.dumps(
                    {
                        "exception": kind.exception,
                        "location": kind.location,
                        "innermost": kind.innermost,
                        "message": _clip(str(error), 500),
                        "mode": trace.mode,
                        "first_worker": self.worker,
                    },
                    indent=2,
                )
            )
        sha = hashlib.sha1(data).hexdigest()[:12]
        (folder / f"input-{sha}.bin").write_bytes(data)
        files = folder / f"input-{sha}.files"
        files.mkdir(exist_ok=True)
        for order, image in enumerate(trace.arrivals):
            (files / f"{order}-{image.name}").write_bytes(image.materialise())
        tb = "".join(traceback.format_exception(error))
        (folder / f"input-{sha}.txt").write_text(
            f"{kind.exception} at {kind.location}; innermost {kind.innermost}\n"
            f"mode: {trace.mode}\n\n{tb}\nsteps (files in input-{sha}.files/, in arrival order):\n"
            + "".join(f"  {step}\n" for step in trace.steps)
            + f"\nreplay: {sys.executable} {Path(__file__).resolve()} --reproduce {folder / f'input-{sha}.bin'}\n"
        )
        return new


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------------- the worker


class WorkerLoop:
    """atheris' TestOneInput: runs the harness, catches and records unexpected exceptions, keeps counters."""

    def __init__(self, harness: Harness, out: Path, name: str, state_path: Path, current: Path) -> None:
        self._harness = harness
        self._current = current
        self._name = name
        self._state_path = state_path
        self._slowest_path = out / "slowest" / f"{name}.bin"
        self._slowest_path.parent.mkdir(parents=True, exist_ok=True)
        self._crashes = CrashStore(out / "crashes", name)
        self._executions = 0
        self._counts: Counter[str] = Counter()
        self._slowest_s = 0.0
        self._slowest_mode = ""
        self._slowest_data: bytes | None = None
        self._last_state = time.monotonic()

    def test_one_input(self, data: bytes) -> None:
        # If libFuzzer ends the process on this input (a hang, its memory limit), the supervisor takes the
        # reproducer from here: atheris' own artifact of such an input can be empty.
        self._current.write_bytes(data)
        trace = Trace()
        started = time.perf_counter()
        try:
            self._harness.execute(data, trace)
        except Exception as error:
            kind = classify(error)
            if kind is None:
                raise HarnessError("the fuzz harness failed (not the agent)") from error
            trace.counts["crash"] += 1
            if self._crashes.record(kind, error, data, trace):
                self._write_state()
        elapsed = time.perf_counter() - started
        self._executions += 1
        self._counts[f"mode: {trace.mode}"] += 1
        self._counts.update(trace.counts)
        if elapsed > self._slowest_s:
            self._slowest_s, self._slowest_mode, self._slowest_data = elapsed, trace.mode, data
            if elapsed > 1.0:
                self._write_state()
        if time.monotonic() - self._last_state >= STATE_INTERVAL_S:
            self._write_state()

    def _write_state(self) -> None:
        self._last_state = time.monotonic()
        if self._slowest_data is not None:
            self._slowest_path.write_bytes(self._slowest_data)
            self._slowest_data = None
        state = {
            "worker": self._name,
            "executions": self._executions,
            "counts": dict(self._counts),
            "crash_hits": dict(self._crashes.hits),
            "slowest_s": self._slowest_s,
            "slowest_mode": self._slowest_mode,
            "slowest_input": str(self._slowest_path),
        }
        temporary = self._state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        temporary.replace(self._state_path)


class _FormatOnlyHandler(logging.Handler):
    """Formats every agent log record and prints nothing. Unlike logging's own handlers it does not catch a
    formatting error, so a log call that cannot be formatted is a crash of the agent."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


def _quiet_logging() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger().addHandler(logging.NullHandler())
    agent_logger = logging.getLogger("agent")
    agent_logger.addHandler(_FormatOnlyHandler())
    agent_logger.setLevel(logging.DEBUG)
    agent_logger.propagate = False


def run_worker(config_path: Path, fuzzer_args: list[str]) -> int:
    """A worker process: instrument the agent, then hand over to libFuzzer (which never returns)."""
    import atheris  # noqa: PLC0415 (a bench tool only, see module docstring)

    config = json.loads(config_path.read_text())
    out = Path(config["out"])
    _quiet_logging()
    pool = load_pool(out / "pool")
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        harness = Harness(pool, Path(config["scratch"]))
    scratch = Path(config["scratch"])
    loop = WorkerLoop(harness, out, config["name"], Path(config["state"]), scratch / CURRENT_INPUT)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        return structured_mutate(data, max_size, seed, atheris.Mutate)

    atheris.Setup([sys.argv[0], *fuzzer_args], loop.test_one_input, custom_mutator=mutate)
    atheris.Fuzz()
    return 0


# ------------------------------------------------------------------------------------------------ the mutator

#: Elements the structured mutator rewrites: what read_header reads (top level and in the Enhanced functional
#: group macros), the macros themselves, and the file meta elements that steer parsing.
MUTATED_TAGS: tuple[tuple[int, int], ...] = (
    (0x0002, 0x0000), (0x0002, 0x0002), (0x0002, 0x0010), (0x0008, 0x0008), (0x0008, 0x0016), (0x0008, 0x0018),
    (0x0008, 0x0070), (0x0008, 0x1090), (0x0008, 0x9208), (0x0018, 0x0020), (0x0018, 0x0021), (0x0018, 0x0023),
    (0x0018, 0x0024), (0x0018, 0x0050), (0x0018, 0x0080), (0x0018, 0x0081), (0x0018, 0x0082), (0x0018, 0x0087),
    (0x0018, 0x0088), (0x0018, 0x0091), (0x0018, 0x0095), (0x0018, 0x1314), (0x0018, 0x9005), (0x0018, 0x9006),
    (0x0018, 0x9008), (0x0018, 0x9009), (0x0018, 0x9016), (0x0018, 0x9018), (0x0018, 0x9082), (0x0018, 0x9112),
    (0x0018, 0x9114), (0x0018, 0x9115), (0x0018, 0x9125), (0x0018, 0x9226), (0x0020, 0x000D), (0x0020, 0x000E),
    (0x0020, 0x0032), (0x0020, 0x0037), (0x0020, 0x0052), (0x0020, 0x1002), (0x0020, 0x9057), (0x0020, 0x9111),
    (0x0020, 0x9113), (0x0020, 0x9116), (0x0028, 0x0008), (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0030),
    (0x0028, 0x0100), (0x0028, 0x0103), (0x0028, 0x9110), (0x5200, 0x9229), (0x5200, 0x9230), (0x7FE0, 0x0010),
)  # fmt: skip
_TAG_NEEDLES = tuple(struct.pack("<HH", group, element) for group, element in MUTATED_TAGS)
#: Explicit VRs with a 4-byte length after two reserved bytes (the others have a 2-byte length).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TEXT_TOKENS: tuple[bytes, ...] = (
    b"", b" ", b"0", b"-0", b"1", b"-1", b"2", b"3", b"8", b"16", b"4097", b"65536", b"20001", b"-1e9", b"1e9",
    b"NaN", b"nan", b"inf", b"-inf", b"Infinity", b"1e309", b"-1e309", b"1e308", b"-1e308", b"1e-320", b"5e-324",
    b"0.0000001", b"1,5", b"0x10", b"1_0", b"+3", b"3.", b".5", b"1e", b"\\", b"\\\\", b"1\\", b"\\1", b"0\\0",
    b"1\\1", b"3\\3", b"1e-9\\1e-9", b"1\\1\\1", b"1\\0\\0\\0\\1\\0", b"1\\0\\0\\1\\0\\0", b"0\\0\\0\\0\\0\\0",
    b"1\\0\\0\\0\\0\\1", b"1e308\\1e308\\1e308", b"-1e308\\1e308\\0", b"1.2.840.10008.5.1.4.1.1.4",
    b"1.2.840.10008.5.1.4.1.1.4.1", b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.2",
    b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.4.50", b"MAGNITUDE", b"PHASE", b"M", b"P", b"GRADIENT",
    b"SPIN", b"BOTH", b"YES", b"NO", b"RF", b"RF_AND_GRADIENT", b"3D", b"2D", b"GR", b"SE", b"SP", b"IR", b"EP",
    b"ORIGINAL\\PRIMARY\\M\\ND", b"\x00", b"\xff\xfe", b"\xc3\xa9",
)  # fmt: skip
_BINARY_FORMATS = {b"US": "<H", b"SS": "<h", b"UL": "<I", b"SL": "<i", b"FL": "<f", b"FD": "<d"}
_BINARY_VALUES: dict[str, tuple[float, ...]] = {
    "<H": (0, 1, 7, 8, 12, 16, 32, 4096, 4097, 0x7FFF, 0xFFFF),
    "<h": (0, 1, -1, 16, -32768, 32767),
    "<I": (0, 1, 2, 53, 20000, 20001, 0x7FFFFFFF, 0xFFFFFFFF),
    "<i": (0, 1, -1, -(2**31), 2**31 - 1),
    "<f": (0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, 1e-45),
    "<d": (0.0, -0.0, 1.0, -1.0, 2.3, 4.6, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 1e-300),
}


def structured_mutate(
    data: bytes, max_size: int, seed: int, fallback: Callable[[bytes, int], bytes]
) -> bytes:
    """libFuzzer's mutations (``fallback``) most of the time; otherwise rewrite one element the agent reads:
    its value (a token such as ``NaN``, ``1e309``, ``0\\0`` or an odd UID, whole or one of its ``\\`` values,
    keeping the length or fixing it up) or its length field, or change the zero padding of the pixels.

    Byte-level mutations of a 100 kB header mostly land in private blobs the agent never reads; these land
    where its checks are."""
    rng = random.Random(seed)
    header = GROUP_HEADER_BYTES if data[:1] and data[0] & 1 else SINGLE_HEADER_BYTES
    if len(data) <= header or rng.random() < 0.6:
        return bytes(fallback(data, max_size))
    prefix, body = bytearray(data[:header]), bytearray(data[header:])
    if rng.random() < 0.08:
        pad = pad_of(data, header - 3)
        choice = rng.choice([0, 1, pad - 1, pad + 1, pad // 2, pad * 2, rng.randrange(1 << 24)])
        prefix[-3:] = (choice % (1 << 24)).to_bytes(3, "little")
    else:
        for _ in range(8):
            needle = rng.choice(_TAG_NEEDLES)
            positions = _find_all(body, needle, 256)
            if positions:
                _mutate_element(body, rng.choice(positions), rng)
                break
        else:
            return bytes(fallback(data, max_size))
    return bytes(prefix + body)[:max_size]


def _find_all(body: bytearray, needle: bytes, limit: int) -> list[int]:
    positions: list[int] = []
    start = body.find(needle)
    while start != -1 and len(positions) < limit:
        positions.append(start)
        start = body.find(needle, start + 1)
    return positions


def _mutate_element(body: bytearray, at: int, rng: random.Random) -> None:
    vr = bytes(body[at + 4 : at + 6])
    explicit = len(vr) == 2 and vr.isalpha() and vr.isupper()
    if explicit and vr in _LONG_VRS:
        length_at, length_size = at + 8, 4
    elif explicit:
        length_at, length_size = at + 6, 2
    else:
        length_at, length_size = at + 4, 4
    value_at = length_at + length_size
    if value_at > len(body):
        return
    length = int.from_bytes(body[length_at:value_at], "little")
    limit = 1 << (8 * length_size)
    if vr == b"SQ" or length == limit - 1 or rng.random() < 0.12:
        new_length = rng.choice(
            [0, 1, 2, length - 2, length + 2, length * 2, limit - 1, rng.randrange(limit)]
        )
        body[length_at:value_at] = (new_length % limit).to_bytes(length_size, "little")
        return
    old = bytes(body[value_at : value_at + length])
    length = len(old)  # a corrupt length field can claim more than the file holds
    binary = _BINARY_FORMATS.get(vr) if explicit else None
    if binary is not None:
        values = [rng.choice(_BINARY_VALUES[binary]) for _ in range(rng.choice([1, 1, 1, 2, 3, 6]))]
        value = b"".join(struct.pack(binary, int(v) if binary[-1] in "HhIi" else v) for v in values)
    elif b"\\" in old and rng.random() < 0.4:
        parts = old.split(b"\\")
        parts[rng.randrange(len(parts))] = rng.choice(_TEXT_TOKENS)
        value = b"\\".join(parts)
    else:
        value = rng.choice(_TEXT_TOKENS)
    if rng.random() < 0.5:
        # Same length: every enclosing length stays right, so the file still parses to this element.
        value = (value + b" " * length)[:length]
    else:
        value += b" " * (len(value) % 2)
        if len(value) >= limit:
            return
        body[length_at:value_at] = len(value).to_bytes(length_size, "little")
    body[value_at : value_at + length] = value


# ------------------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True, slots=True)
class SeedFile:
    """A seed file: ``content`` is its header (up to the PixelData element header), ``size`` its full size."""

    #: The series folder (relative to the DICOM folder) or "simulated/<format>".
    group: str
    name: str
    content: bytes
    size: int
    #: In the pool of group-mode companions (an Enhanced object of many frames is not: too slow to parse).
    companion: bool = True

    def image(self) -> FileImage:
        return FileImage(self.name, self.content, self.size)


def split_pixels(name: str, group: str, content: bytes, *, companion: bool = True) -> SeedFile:
    """The seed of a file: its bytes up to and including the PixelData element header; the pixels become
    zero padding (read_header reads only the header and checks the file's size)."""
    import pydicom  # noqa: PLC0415 (the supervisor only: a worker imports pydicom instrumented)

    keep = len(content)
    with contextlib.suppress(Exception), io.BytesIO(content) as handle:
        pydicom.dcmread(handle, stop_before_pixels=True)
        if handle.tell() < len(content):
            keep = min(handle.tell() + PIXEL_ELEMENT_HEADER_BYTES, len(content))
    return SeedFile(group, name, content[:keep], len(content), companion)


def reduced_enhanced(content: bytes, frames: int) -> bytes | None:
    """The same Enhanced object with ``frames`` of its frames (spread over all), or None when it has no more."""
    import pydicom  # noqa: PLC0415 (the supervisor only)

    try:
        ds = pydicom.dcmread(io.BytesIO(content))
        count = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        pixels = ds.get("PixelData")
        if count <= frames or per_frame is None or len(per_frame) != count or pixels is None:
            return None
        keep = sorted({round(i * (count - 1) / (frames - 1)) for i in range(frames)})
        ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([per_frame[i] for i in keep])
        frame_bytes = len(pixels) // count
        ds.PixelData = b"".join(pixels[i * frame_bytes : (i + 1) * frame_bytes] for i in keep)
        ds.NumberOfFrames = len(keep)
        with io.BytesIO() as buffer:
            ds.save_as(buffer)
            return buffer.getvalue()
    except Exception:
        return None


def select_real_files(dicom_dir: Path) -> list[SeedFile]:
    """Up to FILES_PER_SERIES small files of every folder below ``dicom_dir`` (its own top-level files, the
    catalog, excluded); a folder with no small file gives its smallest one. An Enhanced object of more than
    REDUCED_FRAMES frames is a seed as it is but not a companion; a copy with REDUCED_FRAMES of its frames is
    both."""
    folders: dict[Path, list[Path]] = {}
    for path in sorted(dicom_dir.rglob("*")):
        if path.is_file() and path.parent != dicom_dir:
            folders.setdefault(path.parent, []).append(path)
    chosen: list[SeedFile] = []
    for folder, paths in sorted(folders.items()):
        small = [p for p in paths if p.stat().st_size < SEED_SIZE_CAP]
        if small:
            spread = (
                round(i * (len(small) - 1) / max(FILES_PER_SERIES - 1, 1)) for i in range(FILES_PER_SERIES)
            )
            picks = [small[i] for i in sorted(set(spread))]
        else:
            picks = [min(paths, key=lambda p: p.stat().st_size)]
        group = folder.relative_to(dicom_dir).as_posix()
        for path in picks:
            content = path.read_bytes()
            reduced = reduced_enhanced(content, REDUCED_FRAMES)
            chosen.append(split_pixels(path.name, group, content, companion=reduced is None))
            if reduced is not None:
                chosen.append(split_pixels(f"{REDUCED_FRAMES}frames-{path.name}", group, reduced))
    return chosen


def simulate_series(folder: Path) -> tuple[list[SeedFile], str]:
    """A tiny classic (2 echoes x 2 slices of 8 x 8) and Enhanced series from the scanner simulator."""
    try:
        from engines.scanner.export import (  # noqa: PLC0415 (only the supervisor needs the simulator)
            ExportOptions,
            OutputFormat,
            SimulationRequest,
            simulate,
        )

        files: list[SeedFile] = []
        for form in (OutputFormat.CLASSIC, OutputFormat.ENHANCED):
            target = folder / form.value
            shutil.rmtree(target, ignore_errors=True)
            request = SimulationRequest(
                seed=7, fov_mm=(32.0, 32.0, 8.0), voxel_mm=(4.0, 4.0, 4.0), supersample=1
            )
            summary = simulate(request, ExportOptions(out_dir=target, format=form, deterministic_uids=True))
            files += [split_pixels(p.name, f"simulated/{form.value}", p.read_bytes()) for p in summary.paths]
    except Exception as error:  # the simulator is optional for the fuzzer: report and go on
        return [], f"scanner simulator failed ({type(error).__name__}: {error}); real files only"
    return files, ""


def write_seeds(seeds: list[SeedFile], seeds_dir: Path) -> dict[str, int]:
    """One single-file input per seed file, and for every folder two group inputs (plain, and with a
    half-written companion) that pair a file with up to three companions from its own folder, or with a file
    of another folder where it has only one."""
    shutil.rmtree(seeds_dir, ignore_errors=True)
    seeds_dir.mkdir(parents=True)
    counts: Counter[str] = Counter()

    def write(data: bytes) -> None:
        (seeds_dir / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)

    def pad(seed: SeedFile) -> bytes:
        return min(seed.size - len(seed.content), (1 << 24) - 1).to_bytes(3, "little")

    for seed in seeds:
        write(b"\x00" + pad(seed) + seed.content)
        counts["single"] += 1
    pool = [s for s in seeds if s.companion]
    by_group: dict[str, list[int]] = {}
    for index, seed in enumerate(pool):
        by_group.setdefault(seed.group, []).append(index)
    firsts = [indices[0] for indices in by_group.values()]
    for number, indices in enumerate(by_group.values()):
        mutated, companions = indices[0], indices[1:4]
        if not companions:
            companions = [firsts[(number + 1) % len(firsts)], mutated]
        picks = [i % 256 for i in (companions * 3)[:3]]
        mode = 1 | ((len(companions) - 1) << 1)
        for flags in (0, FLAG_HALF_WRITTEN | FLAG_TICK_BETWEEN):
            write(bytes([mode, *picks, flags, 128]) + pad(pool[mutated]) + pool[mutated].content)
            counts["group"] += 1
    return dict(counts)


def write_pool(seeds: list[SeedFile], pool_dir: Path) -> int:
    """The companions of group inputs: OUT/pool/NNN-name (headers) and their full sizes in index.json."""
    shutil.rmtree(pool_dir, ignore_errors=True)
    pool_dir.mkdir(parents=True)
    index: list[dict[str, Any]] = []
    for number, seed in enumerate(s for s in seeds if s.companion):
        file_name = f"{number:03d}-{seed.name}"
        (pool_dir / file_name).write_bytes(seed.content)
        index.append({"file": file_name, "size": seed.size, "group": seed.group})
    (pool_dir / "index.json").write_text(json.dumps(index, indent=2))
    return len(index)


def load_pool(pool_dir: Path) -> list[FileImage]:
    index_path = pool_dir / "index.json"
    if not index_path.is_file():
        return []
    index = json.loads(index_path.read_text())
    return [
        FileImage(item["file"], (pool_dir / item["file"]).read_bytes(), int(item["size"])) for item in index
    ]


def write_dictionary(path: Path) -> None:
    def escape(token: bytes) -> str:
        return "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02X}" for b in token)

    path.write_text("".join(f'{name}="{escape(token)}"\n' for name, token in DICTIONARY_TOKENS.items()))


# --------------------------------------------------------------------------------------------- the supervisor


@dataclass(slots=True)
class RunResult:
    """One worker run, from its libFuzzer log."""

    name: str
    log: Path
    state: Path
    returncode: int | None = None
    executions: int = 0
    cov: int = 0
    ft: int = 0
    corpus_units: int = 0
    corpus_size: str = ""
    exec_per_s: int = 0
    rss_mb: int = 0
    inited: bool = False
    slowest_unit_s: float = 0.0
    ended_by: str = ""
    #: Artifacts libFuzzer wrote (they can be empty under atheris).
    artifacts: list[str] = field(default_factory=list)
    #: The worker's scratch folder (its current input when libFuzzer ended it).
    scratch: Path | None = None
    #: For a run that libFuzzer ended on an input: "timeout", "oom" or "crash", and the saved input.
    abnormal: dict[str, str] = field(default_factory=dict)


def parse_log(result: RunResult) -> None:
    try:
        text = result.log.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        stats = _STATS_LINE.match(line)
        if stats:
            result.executions = max(result.executions, int(stats["n"]))
            result.cov, result.ft = int(stats["cov"]), int(stats["ft"])
            result.corpus_units, result.corpus_size = int(stats["corp"]), stats["corp_size"]
            result.exec_per_s, result.rss_mb = int(stats["eps"]), int(stats["rss"])
            result.inited = result.inited or stats["event"] == "INITED"
            continue
        done = _DONE_LINE.match(line)
        if done:
            result.executions = max(result.executions, int(done[1]))
            result.ended_by = result.ended_by or "time"
        final = _FINAL_STAT.match(line)
        if final and final[1] == "number_of_executed_units":
            result.executions = max(result.executions, int(final[2]))
        elif final and final[1] == "slowest_unit_time_sec":
            result.slowest_unit_s = float(final[2])
        if "ERROR: libFuzzer: timeout" in line:
            result.ended_by = "timeout"
        elif "out-of-memory" in line and "ERROR: libFuzzer" in line:
            result.ended_by = "out-of-memory"
        elif "Uncaught Python exception" in line or "ERROR: libFuzzer: deadly signal" in line:
            result.ended_by = result.ended_by or "uncaught exception"
        artifact = _ARTIFACT_LINE.search(line)
        if artifact:
            result.artifacts.append(artifact[1])


def _tail_stats(log: Path) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - 8192))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        stats = _STATS_LINE.match(line)
        if stats:
            return f"#{stats['n']} cov {stats['cov']} ft {stats['ft']} corp {stats['corp']} exec/s {stats['eps']}"
    return "starting"


@dataclass(slots=True)
class _Slot:
    index: int
    runs: int = 0
    process: subprocess.Popen[bytes] | None = None
    current: RunResult | None = None
    failed_starts: int = 0


class Supervisor:
    def __init__(self, args: argparse.Namespace, out: Path, max_len: int) -> None:
        self.args = args
        self.out = out
        self.max_len = max_len
        self.results: list[RunResult] = []
        self.scratch_root = Path(
            tempfile.mkdtemp(prefix="sct-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )

    def run(self) -> float:
        """Run the workers until the deadline; the seconds spent."""
        started = time.monotonic()
        deadline = started + self.args.seconds
        slots = [_Slot(j) for j in range(self.args.jobs)]
        last_progress = started
        try:
            while True:
                now = time.monotonic()
                for slot in slots:
                    self._service(slot, deadline, now)
                if all(s.process is None for s in slots) and (
                    now >= deadline - MIN_RUN_S or self._gave_up(slots)
                ):
                    break
                if now - last_progress >= 10.0:
                    last_progress = now
                    live = "; ".join(_tail_stats(s.current.log) for s in slots if s.current is not None)
                    print(f"[{now - started:5.0f} s] {live}", flush=True)
                time.sleep(0.2)
        finally:
            for slot in slots:
                if slot.process is not None and slot.process.poll() is None:
                    os.killpg(slot.process.pid, 9)
                    slot.process.wait()
                    self._finish(slot)
            shutil.rmtree(self.scratch_root, ignore_errors=True)
        return time.monotonic() - started

    def _gave_up(self, slots: list[_Slot]) -> bool:
        return all(s.failed_starts >= MAX_FAILED_STARTS for s in slots)

    def _service(self, slot: _Slot, deadline: float, now: float) -> None:
        if slot.process is not None:
            if slot.process.poll() is not None:
                self._finish(slot)
            elif now > deadline + self.args.timeout + 30:
                os.killpg(slot.process.pid, 9)
        elif deadline - now >= MIN_RUN_S and slot.failed_starts < MAX_FAILED_STARTS:
            self._start(slot, int(deadline - now))

    def _start(self, slot: _Slot, seconds: int) -> None:
        slot.runs += 1
        name = f"worker{slot.index}-run{slot.runs}"
        for folder in ("logs", "state", "artifacts", "corpus"):
            (self.out / folder).mkdir(parents=True, exist_ok=True)
        config = self.out / "state" / f"{name}.config.json"
        state = self.out / "state" / f"{name}.json"
        config.write_text(
            json.dumps(
                {
                    "name": name,
                    "out": str(self.out),
                    "scratch": str(self.scratch_root / name),
                    "state": str(state),
                }
            )
        )
        fuzzer_args = [
            f"-max_total_time={max(seconds, 1)}",
            f"-timeout={self.args.timeout}",
            f"-rss_limit_mb={self.args.rss_limit_mb}",
            f"-max_len={self.max_len}",
            f"-dict={self.out / 'dicom.dict'}",
            f"-artifact_prefix={self.out / 'artifacts'}/",
            "-print_final_stats=1",
            # Slow inputs (an Enhanced object of 200 frames) are chosen less often, in proportion to their time.
            "-entropic_scale_per_exec_time=1",
            str(self.out / "corpus"),
            str(self.out / "seeds"),
        ]
        log = self.out / "logs" / f"{name}.log"
        slot.current = RunResult(name=name, log=log, state=state, scratch=self.scratch_root / name)
        with log.open("wb") as handle:
            slot.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(config), *fuzzer_args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    def _finish(self, slot: _Slot) -> None:
        assert slot.process is not None and slot.current is not None
        result = slot.current
        result.returncode = slot.process.returncode
        parse_log(result)
        if not result.ended_by and result.returncode != 0:
            result.ended_by = f"exit status {result.returncode}"
        slot.failed_starts = 0 if result.inited else slot.failed_starts + 1
        if not result.inited:
            tail = result.log.read_text(errors="replace")[-3000:] if result.log.exists() else ""
            print(
                f"{result.name} ended before fuzzing (status {result.returncode}); log tail:\n{tail}",
                flush=True,
            )
        elif result.ended_by not in ("", "time"):
            self._keep_input(result)
            print(f"{result.name} ended by {result.ended_by}; restarting", flush=True)
        self.results.append(result)
        slot.process = None
        slot.current = None

    def _keep_input(self, result: RunResult) -> None:
        """Save the input a worker was running when libFuzzer ended it, with the end of its log."""
        kind = {"timeout": "timeout", "out-of-memory": "oom"}.get(result.ended_by, "crash")
        current = result.scratch / CURRENT_INPUT if result.scratch is not None else None
        if current is None or not current.is_file():
            result.abnormal = {"kind": kind, "reproducer": result.artifacts[-1] if result.artifacts else ""}
            return
        data = current.read_bytes()
        saved = self.out / "artifacts" / f"{kind}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
        saved.write_bytes(data)
        log_tail = result.log.read_text(errors="replace").splitlines()[-60:]
        saved.with_suffix(".txt").write_text(
            f"{result.name} ended by {result.ended_by}; log {result.log}\n\n" + "\n".join(log_tail) + "\n"
        )
        result.abnormal = {"kind": kind, "reproducer": str(saved)}


# -------------------------------------------------------------------------------------------------- the report


def _trace_hang(artifact: Path, out: Path, seconds: float) -> dict[str, Any]:
    """Replay a hang with faulthandler armed, to name where it hangs."""
    try:
        completed = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--reproduce",
                str(artifact),
                "--out",
                str(out),
                "--hang-after",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            cwd=REPO_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"traced": "replay did not end"}
    text = completed.stdout + completed.stderr
    trace_path = artifact.with_name(artifact.name + ".trace.txt")
    trace_path.write_text(text)
    if "Timeout (" not in text:
        outcome = completed.stdout.strip().splitlines()[-1:] or ["no output"]
        return {"traced": f"did not hang again within {seconds:g} s ({outcome[0]})", "trace": str(trace_path)}
    frames = list(_FAULTHANDLER_FRAME.finditer(text))  # most recent call first
    entry: dict[str, Any] = {"traced": "hangs again", "trace": str(trace_path)}
    if frames:
        first = frames[0]
        entry["innermost"] = (
            f"{_repo_relative(first['file']) or _short_path(first['file'])}:{first['line']} ({first['func']})"
        )
    own = [f for f in frames if _repo_relative(f["file"]) is not None]
    entry["location"] = (
        f"{_repo_relative(own[0]['file'])}:{own[0]['line']} ({own[0]['func']})"
        if own
        else "(no frame in agent/ or engines/)"
    )
    return entry


def build_report(
    supervisor: Supervisor, out: Path, seconds: float, seed_counts: dict[str, int], notes: list[str]
) -> dict[str, Any]:
    results = supervisor.results
    counts: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    slowest: dict[str, Any] = {"seconds": 0.0}
    target_executions = 0
    for result in results:
        if not result.state.exists():
            continue
        state = json.loads(result.state.read_text())
        target_executions += int(state["executions"])
        counts.update(state["counts"])
        hits.update(state["crash_hits"])
        if float(state["slowest_s"]) > slowest["seconds"]:
            slowest = {
                "seconds": round(float(state["slowest_s"]), 4),
                "mode": state["slowest_mode"],
                "input": state["slowest_input"],
            }
    libfuzzer_slowest = max((r.slowest_unit_s for r in results), default=0.0)
    if libfuzzer_slowest > slowest["seconds"]:
        slowest["libfuzzer_seconds"] = libfuzzer_slowest

    crashes: list[dict[str, Any]] = []
    crash_root = out / "crashes"
    for folder in sorted(crash_root.iterdir()) if crash_root.is_dir() else []:
        meta = json.loads((folder / "meta.json").read_text())
        reproducers = sorted(folder.glob("input-*.bin"), key=lambda p: p.stat().st_size)
        crashes.append(
            {
                "id": folder.name,
                **meta,
                "hits": hits.get(folder.name, 0),
                "reproducer": str(reproducers[0]) if reproducers else "",
                "reproducer_bytes": reproducers[0].stat().st_size if reproducers else 0,
                "traceback": str(reproducers[0].with_suffix(".txt")) if reproducers else "",
                "files": str(reproducers[0].with_suffix(".files")) if reproducers else "",
            }
        )
    hangs: list[dict[str, Any]] = []
    for result in results:
        if not result.abnormal:
            continue
        entry: dict[str, Any] = {"worker_run": result.name, "ended_by": result.ended_by, **result.abnormal}
        if entry["kind"] == "timeout":
            hangs.append(entry)
        else:
            crashes.append(
                {
                    "id": Path(entry["reproducer"]).name or result.name,
                    "exception": "out of memory (libFuzzer RSS limit)"
                    if entry["kind"] == "oom"
                    else f"worker died ({result.ended_by})",
                    "location": f"see {Path(entry['reproducer']).with_suffix('.txt')} and {result.log}",
                    "reproducer": entry["reproducer"],
                    "hits": 1,
                }
            )
    for entry in hangs[:MAX_HANGS_TRACED]:
        entry.update(_trace_hang(Path(entry["reproducer"]), out, float(supervisor.args.timeout)))
    # A libFuzzer timeout that replays within the time limit without instrumentation (which slows Python code
    # down about five times) is a slow input, not a hang; one not replayed counts as a hang.
    slow_inputs = [h for h in hangs if str(h.get("traced", "")).startswith("did not hang again")]
    hangs = [h for h in hangs if h not in slow_inputs]

    executions = sum(r.executions for r in results)
    last = max(results, key=lambda r: (r.cov, r.ft), default=None)
    corpus_dir = out / "corpus"
    return {
        "seconds_requested": supervisor.args.seconds,
        "seconds": round(seconds, 1),
        "jobs": supervisor.args.jobs,
        "timeout_s": supervisor.args.timeout,
        "worker_runs": len(results),
        "runs_ended_by": dict(Counter(r.ended_by or f"exit status {r.returncode}" for r in results)),
        "executions": executions,
        "executions_through_target": target_executions,
        "executions_per_s": round(executions / seconds, 1) if seconds > 0 else 0.0,
        "seeds": seed_counts,
        "corpus_units_in_memory": last.corpus_units if last else 0,
        "corpus_size_in_memory": last.corpus_size if last else "",
        "corpus_new_files": sum(1 for _ in corpus_dir.iterdir()) if corpus_dir.is_dir() else 0,
        "coverage": {"cov": last.cov if last else 0, "ft": last.ft if last else 0},
        "peak_rss_mb": max((r.rss_mb for r in results), default=0),
        "counts": dict(sorted(counts.items())),
        "slowest_input": slowest,
        "crashes": crashes,
        "hangs": hangs,
        "timeouts_not_reproduced": slow_inputs,
        "out": str(out),
        "notes": notes,
    }


def print_report(report: dict[str, Any]) -> None:
    counts: dict[str, int] = report["counts"]

    def group(prefix: str) -> str:
        return (
            ", ".join(f"{k.removeprefix(prefix)} {v}" for k, v in counts.items() if k.startswith(prefix))
            or "none"
        )

    seeds = report["seeds"]
    slowest = report["slowest_input"]
    lines = [
        f"fuzz_headers: {report['seconds']:.0f} s, {report['jobs']} job(s), {report['worker_runs']} worker run(s) "
        f"(ended by: {', '.join(f'{k} {v}' for k, v in report['runs_ended_by'].items())})",
        f"  executions     {report['executions']} ({report['executions_per_s']:.1f}/s)",
        f"  seeds          {seeds['single_inputs'] + seeds['group_inputs']} inputs ({seeds['single_inputs']} single, "
        f"{seeds['group_inputs']} group) from {seeds['real_files']} real files, {seeds['reduced_enhanced_files']} "
        f"Enhanced with {REDUCED_FRAMES} of their frames and {seeds['simulated_files']} simulated files; "
        f"{seeds['companions']} companions",
        f"  corpus         {report['corpus_units_in_memory']} units in memory ({report['corpus_size_in_memory']}), "
        f"{report['corpus_new_files']} files in {report['out']}/corpus",
        f"  coverage       cov {report['coverage']['cov']}, ft {report['coverage']['ft']} (libFuzzer, Python edges)",
        f"  modes          {group('mode: ')}",
        f"  read_header    {group('read_header: ')}",
        f"  assembler      files: {group('assembler file: ')}; updates: {group('update: ')}",
        f"  slowest input  {slowest['seconds']:.3f} s ({slowest.get('mode', '-')}: {slowest.get('input', '-')})",
        f"  crashes        {len(report['crashes'])} distinct",
    ]
    for number, crash in enumerate(report["crashes"], 1):
        inner = f"; innermost {crash['innermost']}" if crash.get("innermost") else ""
        lines.append(
            f"    {number}. {crash['exception']} at {crash['location']}{inner}; hits {crash['hits']}"
        )
        if crash.get("message"):
            lines.append(f"       {_clip(crash['message'], 160)}")
        lines.append(f"       reproducer {crash['reproducer']}")
    lines.append(
        f"  hangs          {len(report['hangs'])} (over -timeout {report['timeout_s']} s, and again when replayed)"
    )
    for number, hang in enumerate(report["hangs"], 1):
        where = f" at {hang['location']}" if hang.get("location") else ""
        inner = f"; innermost {hang['innermost']}" if hang.get("innermost") else ""
        lines.append(f"    {number}. {hang.get('traced', 'not traced again')}{where}{inner}")
        lines.append(f"       reproducer {hang['reproducer']}")
    slow = report["timeouts_not_reproduced"]
    if slow:
        lines.append(
            f"  slow inputs    {len(slow)} over -timeout under instrumentation only (replayed without it):"
        )
        for number, entry in enumerate(slow, 1):
            lines.append(f"    {number}. {entry['traced']}")
            lines.append(f"       reproducer {entry['reproducer']}")
    lines += [f"  note: {note}" for note in report["notes"]]
    lines.append(f"  report         {report['out']}/report.json")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------- commands


def supervise(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("atheris") is None:
        print(
            "fuzz_headers: atheris is not installed; run: .venv/bin/pip install -e '.[fuzz]'", file=sys.stderr
        )
        return 2
    out: Path = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="sct-fuzz-out-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)
    notes: list[str] = []
    seeds: list[SeedFile] = []
    if args.dicom_dir.is_dir():
        seeds += select_real_files(args.dicom_dir)
    else:
        notes.append(f"no real DICOM files: {args.dicom_dir} is absent")
        print(f"fuzz_headers: {notes[-1]}; using simulated files only", flush=True)
    simulated, problem = simulate_series(out / "simulated")
    seeds += simulated
    if problem:
        notes.append(problem)
        print(f"fuzz_headers: {problem}", flush=True)
    if not seeds:
        print("fuzz_headers: no seed files at all", file=sys.stderr)
        return 2
    reduced = sum(1 for s in seeds if s.name.startswith(f"{REDUCED_FRAMES}frames-"))
    seed_counts = {
        "real_files": len(seeds) - len(simulated) - reduced,
        "reduced_enhanced_files": reduced,
        "simulated_files": len(simulated),
        "companions": write_pool(seeds, out / "pool"),
        **{f"{k}_inputs": v for k, v in write_seeds(seeds, out / "seeds").items()},
    }
    write_dictionary(out / "dicom.dict")
    max_len = max(len(s.content) for s in seeds) + GROUP_HEADER_BYTES + 4096
    print(
        f"fuzz_headers: {len(seeds)} seed files ({seed_counts['real_files']} real, {reduced} of them with "
        f"{REDUCED_FRAMES} frames, {len(simulated)} simulated), {args.jobs} job(s) for {args.seconds:g} s, "
        f"timeout {args.timeout} s per input; output in {out}",
        flush=True,
    )
    supervisor = Supervisor(args, out, max_len)
    seconds = supervisor.run()
    if not any(r.inited for r in supervisor.results):
        print("fuzz_headers: no worker got to fuzzing; see the logs above", file=sys.stderr)
        return 2
    report = build_report(supervisor, out, seconds, seed_counts, notes)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return 1 if report["crashes"] or report["hangs"] else 0


def reproduce(path: Path, out: Path | None, hang_after: float | None) -> int:
    """Replay one input without atheris; print the traceback of a crash (status 1) or the outcome (0)."""
    data = path.read_bytes()
    if out is None:
        out = next((p for p in path.resolve().parents if (p / "pool").is_dir()), None)
    pool = load_pool(out / "pool") if out is not None else []
    if data[:1] and data[0] & 1 and not pool:
        print(
            "fuzz_headers: a group input needs OUT/pool (pass --out); replaying without companions",
            file=sys.stderr,
        )
    _quiet_logging()
    scratch = Path(tempfile.mkdtemp(prefix="sct-fuzz-replay-"))
    try:
        harness = Harness(pool, scratch)
        if hang_after is not None:
            faulthandler.dump_traceback_later(hang_after, exit=True)
        trace = Trace()
        started = time.perf_counter()
        try:
            harness.execute(data, trace)
        except Exception as error:
            kind = classify(error)
            traceback.print_exception(error)
            print("steps:\n" + "".join(f"  {step}\n" for step in trace.steps), file=sys.stderr)
            print(f"crash: {kind.exception + ' at ' + kind.location if kind else 'in the harness'}")
            return 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        elapsed = time.perf_counter() - started
        print(f"no crash: {trace.mode} mode, {elapsed:.3f} s, {dict(trace.counts)}")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--worker"] and len(arguments) >= 2:
        return run_worker(Path(arguments[1]), arguments[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to fuzz (default 600)")
    parser.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument(
        "--timeout", type=int, default=10, help="seconds one input may take before it is a hang"
    )
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="libFuzzer's memory limit per worker")
    parser.add_argument(
        "--dicom-dir", type=Path, default=DEFAULT_DICOM_DIR, help="real scanner files (seeds)"
    )
    parser.add_argument("--reproduce", type=Path, metavar="INPUT", help="replay one saved input and exit")
    parser.add_argument("--hang-after", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(arguments)
    if args.reproduce is not None:
        return reproduce(args.reproduce, args.out, args.hang_after)
    if args.jobs < 1 or args.seconds <= 0 or args.timeout < 1:
        parser.error("--jobs, --seconds and --timeout must be positive")
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
