"""``sct-agent simulate``: write a phantom case into a folder the way a scanner export does.

The agent is developed and benchmarked against this command, so every way a real export can differ (format,
order, pace, half-written or lost files, protocol deviations) is one option here. Arguments are checked before
the phantom is simulated: a typo costs milliseconds, not a simulation, and is reported with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engines.phantom.pathology import PATHOLOGIES, parse_pathologies
from engines.scanner.export import (
    EmissionOrder,
    ExportOptions,
    ExportSummary,
    OutputFormat,
    SimulationRequest,
    check_request,
    simulate,
)
from engines.scanner.writer import WriteStyle

#: Exit status for arguments the command cannot use (argparse uses the same).
EXIT_BAD_ARGUMENTS = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``simulate`` on the ``sct-agent`` sub-command parsers."""
    parser = subparsers.add_parser(
        "simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="export folder (created if missing)"
    )
    parser.add_argument(
        "--seed", required=True, type=int, metavar="N", help="phantom seed (one seed, one person)"
    )
    parser.add_argument(
        "--format",
        choices=[f.value for f in OutputFormat],
        default=OutputFormat.CLASSIC.value,
        help="classic: a Siemens-style file per slice and echo; enhanced: one Philips-style multi-frame file",
    )
    parser.add_argument(
        "--rate", type=float, metavar="FILES_PER_S", help="pace the export (default: as fast as possible)"
    )
    parser.add_argument(
        "--order",
        choices=[o.value for o in EmissionOrder],
        default=EmissionOrder.SLICE.value,
        help="slice: all echoes of a slice, then the next slice; echo: all of echo 1, then echo 2",
    )
    parser.add_argument(
        "--write",
        choices=[w.value for w in WriteStyle],
        default=WriteStyle.ATOMIC.value,
        help="atomic: hidden temp name, fsync, rename; slow: final name written in chunks with pauses",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="protocol deviation (repeatable): EchoTimeN, RepetitionTime, FlipAngle, PixelBandwidth and "
        "MagneticFieldStrength change the physics; any other DICOM keyword is written verbatim",
    )
    parser.add_argument(
        "--echoes", type=int, metavar="N", help="number of echoes (default: the protocol's 2)"
    )
    parser.add_argument(
        "--drop-slices",
        default="",
        metavar="K,K",
        help="0-based slice indices never written (all their echoes)",
    )
    parser.add_argument(
        "--truncate-one", action="store_true", help="cut one file short, as a broken transfer does"
    )
    parser.add_argument(
        "--ct", type=Path, metavar="DIR", help="also write the simulated reference CT series here"
    )
    parser.add_argument("--fov-mm", metavar="R,C,S", help="field of view: rows x columns x slab, mm")
    parser.add_argument(
        "--voxel-mm", metavar="R,C,S", help="voxel: row spacing, column spacing, slice spacing, mm"
    )
    parser.add_argument(
        "--supersample", type=int, metavar="N", help="phantom sub-voxels per axis (default 2)"
    )
    parser.add_argument(
        "--pathology",
        dest="pathologies",
        action="append",
        default=[],
        choices=[p.value for p in PATHOLOGIES],
        metavar="NAME",
        help="add pathology the model never saw (repeatable): "
        f"{', '.join(p.value for p in PATHOLOGIES)}; placed from the seed, headers unchanged",
    )
    parser.add_argument(
        "--deterministic-uids",
        action="store_true",
        help="derive UIDs and timestamps from the case (reproducible files); default: fresh UIDs per run",
    )
    parser.set_defaults(handler=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    """Check the arguments, simulate, export, and print a short summary (no patient identifiers)."""
    try:
        request, options = _request_and_options(args)
        check_request(request, options)
    except ValueError as error:
        print(f"sct-agent simulate: error: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    summary = simulate(request, options)
    print(describe(summary))
    return 0


def _request_and_options(args: argparse.Namespace) -> tuple[SimulationRequest, ExportOptions]:
    request_fields: dict[str, Any] = {
        "seed": args.seed,
        "echoes": args.echoes,
        "settings": tuple(args.settings),
        "fov_mm": _triple("--fov-mm", args.fov_mm),
        "voxel_mm": _triple("--voxel-mm", args.voxel_mm),
        "pathologies": parse_pathologies(args.pathologies),
    }
    if args.supersample is not None:
        request_fields["supersample"] = args.supersample
    request = SimulationRequest(**request_fields)
    options = ExportOptions(
        out_dir=args.out,
        format=OutputFormat(args.format),
        rate_files_per_s=args.rate,
        order=EmissionOrder(args.order),
        write_style=WriteStyle(args.write),
        drop_slices=_slice_list(args.drop_slices),
        truncate_one=args.truncate_one,
        ct_dir=args.ct,
        deterministic_uids=args.deterministic_uids,
    )
    return request, options


def _triple(option: str, text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{option}: found {text!r}; expected three numbers in mm, e.g. 250,250,90") from None
    if len(values) != 3:
        raise ValueError(f"{option}: found {text!r}; expected three numbers in mm, e.g. 250,250,90")
    return (values[0], values[1], values[2])


def _slice_list(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(
            f"--drop-slices: found {text!r}; expected comma-separated 0-based slice indices, e.g. 40,41"
        ) from None


def describe(summary: ExportSummary) -> str:
    """A few lines for a person: what was written where, how big, how fast."""
    echoes, slices, rows, columns = summary.shape
    form = "classic MR files" if summary.format is OutputFormat.CLASSIC else "Enhanced MR object"
    lines = [
        f"simulated {echoes} echo(es) x {slices} slices of {rows} x {columns} "
        f"(phantom {summary.simulation_seconds:.1f} s)"
        + (f" with {', '.join(summary.pathologies)}" if summary.pathologies else ""),
        f"wrote {summary.file_count} {form} ({summary.images} images, {summary.total_bytes / 1e6:.1f} MB) "
        f"to {summary.out_dir} in {summary.seconds:.2f} s",
        f"series {summary.series_instance_uid}",
    ]
    if summary.dropped_slices:
        lines.append(f"dropped slices {', '.join(str(k) for k in summary.dropped_slices)}")
    if summary.truncated_path is not None:
        lines.append(f"truncated {summary.truncated_path.name}")
    if summary.ct_paths:
        lines.append(
            f"reference CT: {len(summary.ct_paths)} files ({summary.ct_bytes / 1e6:.1f} MB) to "
            f"{summary.ct_paths[0].parent} in {summary.ct_seconds:.2f} s, series {summary.ct_series_instance_uid}"
        )
    return "\n".join(lines)
