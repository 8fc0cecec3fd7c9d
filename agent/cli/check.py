"""``sct-agent check PATH``: judge the acquisitions in a folder the way the running agent would.

Hospital IT and the MRI technologist run this on a test export before the first patient: it reads every file
under PATH (recursively) through the agent's own header reader, grouping and validator, so its verdict is the
agent's verdict. For each acquisition it prints the normalised view (scanner, sequence, timing, the echoes with
their echo times and slice counts, image kinds, bandwidth, voxel, orientation, completeness), then the verdict of
each protocol with every reason, then whether the agent would run the shipped model on it: that line comes
from :func:`agent.validation.inference_gate.decide`, the function the agent's validator stage calls, so a
protocol pass the agent would still not act on (a protocol the model is not validated for, phase images) is
said in so many words. Skipped and unreadable files are listed with their reasons.

Nothing is published and no model is run. Exit status: 0 when every acquisition passes (one of the protocols
judged, or the one chosen with ``--protocol``), 1 when any fails or no acquisition was found, 2 for a usage
error (PATH missing, a protocol that cannot be loaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from agent.cli.view_text import describe_view, orientation_text
from agent.file_labels import file_label
from agent.ingest.assembler import Assembler
from agent.ingest.watcher import name_skip_reason
from agent.records import AcquisitionUpdate, AcquisitionView, ArrivedFile, Verdict
from agent.validation.inference_gate import InferenceDecision, decide
from agent.validation.protocol_files import SHIPPED_PROTOCOLS_DIR, load_protocol, load_protocols
from agent.validation.protocols import ProtocolError, SequenceProtocol
from agent.validation.rules import evaluate, format_verdict
from agent.vocabulary import ArrivalSource, FileOutcome, Outcome, UpdateKind
from engines.model.manifest import ManifestError, default_manifest

EXIT_PASS: Final = 0
EXIT_FAIL: Final = 1
EXIT_USAGE: Final = 2


@dataclass(slots=True)
class _FileNote:
    path: Path
    outcome: str
    reason: str


@dataclass(slots=True)
class CheckedAcquisition:
    view: AcquisitionView
    folders: set[Path] = field(default_factory=set)
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def passes(self) -> bool:
        return any(v.outcome is Outcome.PASS for v in self.verdicts)

    def inference(self, model_protocols: frozenset[str]) -> InferenceDecision | None:
        """What the running agent would decide: the same function its validator stage calls."""
        return decide(self.verdicts, self.view, model_protocols) if self.verdicts else None


@dataclass(slots=True)
class CheckReport:
    """Everything ``check`` found under one PATH."""

    path: Path
    protocols: tuple[SequenceProtocol, ...]
    acquisitions: list[CheckedAcquisition]
    #: Files that were skipped, bad or duplicates, with their reasons.
    notes: list[_FileNote]
    files_read: int
    #: Protocols the shipped model is validated for (a pass against another one would not run the model).
    model_protocols: frozenset[str] = frozenset()

    @property
    def status(self) -> int:
        passed = bool(self.acquisitions) and all(a.passes for a in self.acquisitions)
        return EXIT_PASS if passed else EXIT_FAIL


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run_check)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, metavar="PATH", help="a DICOM file or a folder (read recursively)")
    parser.add_argument(
        "--protocol",
        action="append",
        default=[],
        metavar="ID|FILE",
        help="judge against this protocol only: an id from the protocols folder or a .toml file (repeatable); "
        "default: every protocol in the folder",
    )
    parser.add_argument(
        "--protocols-dir",
        type=Path,
        default=SHIPPED_PROTOCOLS_DIR,
        metavar="DIR",
        help="folder of protocol files (default: the shipped sequence_protocols/)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    """``check`` with its own arguments (without the ``sct-agent check`` prefix); for tests and scripts."""
    parser = argparse.ArgumentParser(prog="sct-agent check", description=__doc__)
    _add_arguments(parser)
    return run_check(parser.parse_args(argv), stdout=stdout)


def run_check(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    path: Path = args.path
    if not path.exists():
        print(f"sct-agent check: PATH: found no file or folder {path}; expected DICOM files", file=sys.stderr)
        return EXIT_USAGE
    try:
        protocols = _protocols(args.protocol, args.protocols_dir)
    except ProtocolError as error:
        print(f"sct-agent check: {error}", file=sys.stderr)
        return EXIT_USAGE
    # Every skipped or bad file is listed in the output; the assembler's log lines would say it twice.
    assembler_log = logging.getLogger("agent.ingest.assembler")
    level = assembler_log.level
    assembler_log.setLevel(logging.ERROR)
    try:
        report = check_path(path, protocols)
    finally:
        assembler_log.setLevel(level)
    report.model_protocols = _model_protocols()
    if args.json:
        json.dump(_document(report), out, indent=2)
        out.write("\n")
    else:
        _print_text(out, report)
    return report.status


def check_path(path: Path, protocols: Sequence[SequenceProtocol]) -> CheckReport:
    """Read every file under ``path``, end every acquisition, and judge each against every protocol."""
    updates: list[AcquisitionUpdate] = []
    notes: list[_FileNote] = []
    folders: dict[str, set[Path]] = {}
    root = path if path.is_dir() else path.parent

    def on_file(arrived: ArrivedFile, outcome: str, reason: str, acquisition_id: str | None) -> None:
        if acquisition_id is not None:
            folders.setdefault(acquisition_id, set()).add(arrived.path.parent)
        if outcome not in (FileOutcome.ACCEPTED,):
            notes.append(_FileNote(arrived.path, outcome, reason))

    # The quiet period never runs out here: end_all() ends what the folder holds.
    assembler = Assembler(updates.append, quiet_period_s=float("inf"), on_file=on_file)
    files = _files(path, notes)
    for file in files:
        stat = file.stat()
        arrived = ArrivedFile(file, stat.st_size, stat.st_mtime_ns, time.time(), ArrivalSource.STARTUP_SCAN)
        # A file in a folder is complete: no second read after a pause.
        assembler.add_file(arrived, retry=True)
    assembler.end_all()
    now = time.time()
    acquisitions = []
    for update in updates:
        if update.kind is UpdateKind.IMAGES:
            continue
        found = {
            f.relative_to(root) if f.is_relative_to(root) else f
            for f in folders.get(update.view.acquisition_id, set())
        }
        acquisition = CheckedAcquisition(view=update.view, folders=found)
        acquisition.verdicts = [evaluate(p, update.view, final=True, now=now) for p in protocols]
        acquisitions.append(acquisition)
    acquisitions.sort(key=lambda a: (sorted(str(f) for f in a.folders), a.view.series_numbers))
    return CheckReport(path, tuple(protocols), acquisitions, notes, len(files))


def _files(path: Path, notes: list[_FileNote]) -> list[Path]:
    """The files the agent's watcher would hand over; the names it skips (temporary, hidden, DICOMDIR) are
    noted instead of read."""
    if path.is_file():
        return [path]
    found = []
    for folder, _, names in os.walk(path):
        for name in names:
            file = Path(folder) / name
            reason = name_skip_reason(file, path)
            if reason is None:
                found.append(file)
                continue
            text = (
                f"{name}: file name: found {reason}; expected a name the agent's watcher reads "
                "(not temporary, hidden or DICOMDIR)"
            )
            notes.append(_FileNote(file, FileOutcome.SKIPPED, text))
    return sorted(found)


def _protocols(selected: Sequence[str], folder: Path) -> tuple[SequenceProtocol, ...]:
    if not selected:
        return load_protocols(folder)
    protocols: list[SequenceProtocol] = []
    ids: list[str] = []
    for item in selected:
        candidate = Path(item)
        if candidate.suffix == ".toml" or candidate.is_file():
            protocols.append(load_protocol(candidate))
        else:
            ids.append(item)
    if ids:
        protocols.extend(load_protocols(folder, tuple(ids)))
    return tuple(protocols)


def _model_protocols() -> frozenset[str]:
    """Protocols the shipped model is validated for: a pass against any other is a pass the agent would not
    act on with this model."""
    try:
        return frozenset(default_manifest().validated_protocols)
    except (ManifestError, OSError):
        return frozenset()


# ------------------------------------------------------------------------------------------------- output


def _title(index: int, total: int, acquisition: CheckedAcquisition) -> str:
    view = acquisition.view
    series = ", ".join(str(n) for n in view.series_numbers) or "?"
    folders = ", ".join(sorted(str(f) for f in acquisition.folders)) or "."
    word = "series" if len(view.series_numbers) <= 1 else "series (joined)"
    return (
        f"Acquisition {index} of {total}: {word} {series}, {view.sop_class}, {view.vendor}; "
        f"acquisition id {view.acquisition_id}; in {folders}"
    )


def _note_reason(note: _FileNote) -> str:
    """The reason without the file: the agent's reasons name it by its label (its logs must not carry file
    names, which may be the patient's); this command is run by the technologist on files they chose and shows
    the path beside it instead."""
    return note.reason.removeprefix(f"{file_label(note.path)}: ").removeprefix(f"{note.path.name}: ")


def _print_text(out: TextIO, report: CheckReport) -> None:
    path, acquisitions, model_protocols = report.path, report.acquisitions, report.model_protocols
    names = ", ".join(f"{p.id} {p.version}" for p in report.protocols)
    print(
        f"sct-agent check {path}: {report.files_read} files, {len(acquisitions)} acquisitions; protocols: {names}",
        file=out,
    )
    by_outcome: dict[str, list[_FileNote]] = {}
    for note in report.notes:
        by_outcome.setdefault(note.outcome, []).append(note)
    root = path if path.is_dir() else path.parent
    for outcome, items in sorted(by_outcome.items()):
        print(f"{len(items)} file{'s' if len(items) != 1 else ''} {outcome}:", file=out)
        for note in items:
            shown = note.path.relative_to(root) if note.path.is_relative_to(root) else note.path
            print(f"  {shown}: {_note_reason(note)}", file=out)
    for index, acquisition in enumerate(acquisitions, start=1):
        print(file=out)
        print(_title(index, len(acquisitions), acquisition), file=out)
        for line in describe_view(acquisition.view):
            print(f"  {line}", file=out)
        for verdict in acquisition.verdicts:
            for line in format_verdict(verdict).splitlines():
                print(f"  {line}", file=out)
        print(f"  {_inference_text(acquisition.inference(model_protocols))}", file=out)
    passed = sum(a.passes for a in acquisitions)
    print(file=out)
    if not acquisitions:
        print("No MR acquisition found: FAIL", file=out)
    else:
        inferred = sum(bool((d := a.inference(model_protocols)) and d.allowed) for a in acquisitions)
        print(
            f"The agent would run the shipped model on {inferred} of {len(acquisitions)} acquisitions "
            "(decided as the running agent decides: agent.validation.inference_gate).",
            file=out,
        )
        result = "PASS" if passed == len(acquisitions) else "FAIL"
        print(f"{passed} of {len(acquisitions)} acquisitions pass: {result}", file=out)


def _inference_text(decision: InferenceDecision | None) -> str:
    if decision is None:
        return "Inference: no protocol judged"
    if decision.allowed:
        return f"Inference: the agent would run the shipped model (protocol {decision.verdict.protocol_id})"
    return f"Inference: the agent would NOT run the shipped model: {decision.reason}"


def _inference_document(decision: InferenceDecision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {
        "allowed": decision.allowed,
        "protocol_id": decision.verdict.protocol_id,
        "reason": decision.reason,
    }


def _view_document(view: AcquisitionView) -> dict[str, Any]:
    return {
        "acquisition_id": view.acquisition_id,
        "sop_class": view.sop_class,
        "series_numbers": list(view.series_numbers),
        "vendor": view.vendor,
        "manufacturer": view.manufacturer,
        "model_name": view.model_name,
        "software_versions": view.software_versions,
        "magnetic_field_strength_t": view.magnetic_field_strength_t,
        "mr_acquisition_type": view.mr_acquisition_type,
        "sequence_family": view.sequence_family,
        "scanning_sequence": list(view.scanning_sequence),
        "sequence_variant": list(view.sequence_variant),
        "sequence_name": view.sequence_name,
        "sequence_evidence": list(view.sequence_evidence),
        "inversion_time_ms": view.inversion_time_ms,
        "repetition_time_ms": view.repetition_time_ms,
        "flip_angle_deg": view.flip_angle_deg,
        "echoes": [{"echo_time_ms": te, "slices": n} for te, n in view.echoes],
        "expected_echoes": view.expected_echoes,
        "expected_slices": view.expected_slices,
        "counts_source": {"echoes": view.counts_source[0], "slices": view.counts_source[1]},
        "image_kind": view.image_kind,
        "image_type": list(view.image_type),
        "image_flags": list(view.image_flags),
        "other_images": {kind: count for kind, count in view.other_images},
        "pixel_bandwidth_hz": view.pixel_bandwidth_hz,
        "water_fat_shift_px": view.water_fat_shift_px,
        "pixel_spacing_mm": list(view.pixel_spacing_mm) if view.pixel_spacing_mm else None,
        "slice_spacing_mm": view.slice_spacing_mm,
        "slice_thickness_mm": view.slice_thickness_mm,
        "rows": view.rows,
        "columns": view.columns,
        "image_orientation": list(view.image_orientation) if view.image_orientation else None,
        "orientation": orientation_text(view.image_orientation),
        "affine_lps": view.grid.affine.tolist() if view.grid is not None else None,
        "complete": view.complete,
        "ended_by": view.ended_by,
        "inconsistencies": list(view.inconsistencies),
    }


def _verdict_document(verdict: Verdict, model_protocols: frozenset[str]) -> dict[str, Any]:
    return {
        "protocol_id": verdict.protocol_id,
        "protocol_version": verdict.protocol_version,
        "outcome": verdict.outcome.value,
        "model_validated": verdict.protocol_id in model_protocols,
        "reasons": [
            {
                "attribute": r.attribute,
                "found": r.found,
                "required": r.required,
                "category": str(r.category),
                "text": r.text(),
            }
            for r in verdict.reasons
        ],
    }


def _document(report: CheckReport) -> dict[str, Any]:
    return {
        "path": str(report.path),
        "protocols": [{"id": p.id, "version": p.version, "path": str(p.path)} for p in report.protocols],
        "files": {
            "read": report.files_read,
            "not_used": [
                {"path": str(n.path), "outcome": n.outcome, "reason": _note_reason(n)} for n in report.notes
            ],
        },
        "acquisitions": [
            {
                "folders": sorted(str(f) for f in a.folders),
                "view": _view_document(a.view),
                "verdicts": [_verdict_document(v, report.model_protocols) for v in a.verdicts],
                "passes": a.passes,
                "inference": _inference_document(a.inference(report.model_protocols)),
            }
            for a in report.acquisitions
        ],
        "exit_status": report.status,
    }
