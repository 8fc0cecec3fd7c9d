"""``sct-agent listen``: subscribe to an agent, print what it says, and save every finished sCT volume.

One line per status message (verdicts with every reason, progress, errors), per finished volume and per sequence
gap; the regions of each volume its confidence says not to trust (``flagged``), or that there are none. Each volume
goes to ``DIR/<acquisition_id>/``: ``sct.npy`` (int16 HU, ``[slice, row, column]``), ``confidence.npy`` (uint8,
same axes, when the model has a confidence output),
``geometry.json`` (voxel-to-LPS affine, shape, spacing, model, protocol, checksum) and ``preview.png``
(mid-sagittal and mid-axial views, CT window W1500/L300, labelled SYNTHETIC CT). Each file is written to a temp
name and renamed, ``geometry.json`` last, so a file that exists is whole.

It asks the agent's snapshot socket (``--snapshot``, by default the publish port + 1) for the current state
first, so a listener started mid-series, or after one, still saves the whole volume; gaps are healed by asking
again (docs/protocol.md). Off loopback the agent runs CURVE: pass its public key (``--server-key``) and this
listener's secret key (``--client-key``, from ``sct-agent keys client``).

Exit status: 0 after ``--count`` volumes, 1 after ``--timeout`` seconds without any message (heartbeats count),
2 for unusable arguments (key files included), 130 on Ctrl-C (after closing the socket).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, TextIO

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from agent.cli.montage import PIXELS_PER_MM, to_lps
from agent.client import ReceivedVolume, SctClient
from agent.publish.curve_keys import CurveClient, KeyFileError, curve_client
from agent.publish.endpoints import default_snapshot_endpoint
from agent.publish.wire import AXES, UNITS, WIRE_DTYPE, StatusMessage
from agent.vocabulary import StatusKind
from sct_core.geometry import VolumeGeometry

DEFAULT_ENDPOINT: Final = "tcp://127.0.0.1:5556"
DEFAULT_OUT: Final = Path("sct-received")
EXIT_OK: Final = 0
EXIT_TIMEOUT: Final = 1
EXIT_BAD_ARGUMENTS: Final = 2
EXIT_INTERRUPTED: Final = 130
#: How often the receive loop wakes to check the ``--timeout`` clock (s).
POLL_S: Final = 0.25
#: CT display window of the preview: width 1500 HU around level 300 HU (bone and soft tissue).
CT_WINDOW_WIDTH_HU: Final = 1500.0
CT_WINDOW_LEVEL_HU: Final = 300.0
PREVIEW_LABEL: Final = "SYNTHETIC CT"
LABEL_HEIGHT: Final = 16
PANEL_GAP: Final = 4
#: An acquisition id becomes a directory name; anything but these characters (or a dot name) is refused.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SCT_FILE: Final = "sct.npy"
GEOMETRY_FILE: Final = "geometry.json"
PREVIEW_FILE: Final = "preview.png"
CONFIDENCE_FILE: Final = "confidence.npy"


@dataclass(frozen=True, slots=True)
class ListenOptions:
    endpoint: str = DEFAULT_ENDPOINT
    out: Path = DEFAULT_OUT
    #: Exit after this many finished volumes (None: never).
    count: int | None = None
    #: Exit with status 1 after this many seconds without any message (None: never).
    timeout_s: float | None = None
    #: The agent's snapshot endpoint; "" = derived from ``endpoint`` as the agent derives it; None = no snapshots.
    snapshot: str | None = ""
    curve: CurveClient | None = None

    @property
    def snapshot_endpoint(self) -> str | None:
        if self.snapshot is None:
            return None
        return self.snapshot or default_snapshot_endpoint(self.endpoint)


# ---------------------------------------------------------------------------------------------- arguments


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``listen`` on the ``sct-agent`` sub-command parsers."""
    parser = subparsers.add_parser(
        "listen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run_listen)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, metavar="E", help=f"default {DEFAULT_ENDPOINT}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where volumes go (default ./{DEFAULT_OUT})",
    )
    parser.add_argument("--count", type=int, metavar="N", help="exit after N finished volumes")
    parser.add_argument(
        "--timeout", type=float, metavar="S", help="exit with status 1 after S seconds without any message"
    )
    parser.add_argument(
        "--snapshot",
        default="",
        metavar="E",
        help="the agent's snapshot endpoint (default: the publish port + 1); 'none' = live messages only",
    )
    parser.add_argument("--server-key", type=Path, metavar="FILE", help="the agent's public key (server.key)")
    parser.add_argument(
        "--client-key", type=Path, metavar="FILE", help="this listener's secret key (NAME.key_secret)"
    )


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    """Run ``listen`` with its own arguments (without the ``sct-agent listen`` prefix); for tests and scripts."""
    parser = argparse.ArgumentParser(prog="sct-agent listen", description=__doc__)
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_ARGUMENTS
    return run_listen(args, stdout=stdout)


def run_listen(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    """Check the arguments, then listen until done; see the module docstring for the exit status."""
    out = sys.stdout if stdout is None else stdout
    if args.count is not None and args.count < 1:
        print(f"sct-agent listen: error: --count: found {args.count}; expected N >= 1", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    if args.timeout is not None and not args.timeout > 0:
        print(
            f"sct-agent listen: error: --timeout: found {args.timeout}; expected S > 0 seconds",
            file=sys.stderr,
        )
        return EXIT_BAD_ARGUMENTS
    curve = None
    if (args.server_key is None) != (args.client_key is None):
        print("sct-agent listen: error: --server-key and --client-key go together (CURVE)", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    if args.server_key is not None:
        try:
            curve = curve_client(args.server_key, args.client_key)
        except KeyFileError as error:
            print(f"sct-agent listen: error: {error}", file=sys.stderr)
            return EXIT_BAD_ARGUMENTS
    options = ListenOptions(
        endpoint=args.endpoint,
        out=args.out,
        count=args.count,
        timeout_s=args.timeout,
        snapshot=None if args.snapshot == "none" else args.snapshot,
        curve=curve,
    )
    return listen(options, stdout=out)


# -------------------------------------------------------------------------------------------------- loop


def listen(options: ListenOptions, *, stdout: TextIO) -> int:
    """Receive until ``count`` volumes are saved, the timeout passes, or Ctrl-C."""

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=stdout, flush=True)

    saved = 0
    started = time.monotonic()
    try:
        with SctClient(
            options.endpoint, snapshot_endpoint=options.snapshot_endpoint, curve=options.curve
        ) as client:
            say(
                f"listening on {options.endpoint} (snapshots {options.snapshot_endpoint or 'off'}, "
                f"{'CURVE' if options.curve else 'plain'}); saving volumes under {options.out}"
            )
            publisher: str | None = None
            gaps_seen = rejected_seen = 0
            while options.count is None or saved < options.count:
                message = client.receive(_next_wait(client, options.timeout_s, started))
                if client.rejected > rejected_seen:
                    rejected_seen = client.rejected
                    say(f"rejected a message: {client.last_error}")
                if message is None:
                    quiet = client.seconds_since_last_message
                    quiet = time.monotonic() - started if quiet is None else quiet
                    if options.timeout_s is not None and quiet >= options.timeout_s:
                        say(f"no message for {quiet:.1f} s (--timeout {options.timeout_s:g}); giving up")
                        return EXIT_TIMEOUT
                    continue
                if message.publisher_id != publisher:
                    publisher = message.publisher_id
                    say(f"publisher {publisher} (seq {message.seq})")
                for gap in client.gaps[gaps_seen:]:
                    say(
                        f"gap: expected seq {gap.expected}, got {gap.got} ({gap.got - gap.expected} message(s) missed)"
                    )
                gaps_seen = len(client.gaps)
                if isinstance(message, StatusMessage):
                    say(describe_status(message))
                while (volume := client.pop_volume()) is not None:
                    saved += 1
                    try:
                        path = save_volume(volume, options.out)
                    except (ValueError, OSError) as error:
                        say(f"volume {volume.acquisition_id!r} received but NOT saved: {error}")
                        continue
                    say(describe_volume(volume, path))
    except KeyboardInterrupt:
        print("sct-agent listen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _next_wait(client: SctClient, timeout_s: float | None, started: float) -> float:
    """Wake up at least every POLL_S, and exactly when ``--timeout`` would run out."""
    if timeout_s is None:
        return POLL_S
    quiet = client.seconds_since_last_message
    quiet = time.monotonic() - started if quiet is None else quiet
    return max(0.0, min(POLL_S, timeout_s - quiet))


# ------------------------------------------------------------------------------------------------- lines


def describe_status(message: StatusMessage) -> str:
    """One line for a status message: verdicts with the console series and every reason, images received and
    progress as k/n, errors with their stage."""
    body = message.body
    subject = message.acquisition_id or "-"
    if message.kind == StatusKind.VERDICT:
        outcome = str(body.get("outcome", "?")).upper()
        stage = "final" if body.get("final") else "provisional"
        line = (
            f"verdict {subject}{_series(body)}: {outcome} ({stage}, protocol {body.get('protocol_id', '?')}"
        )
        line += f" {body.get('protocol_version', '')}".rstrip() + ")"
        reasons = [_reason_text(r) for r in body.get("reasons", [])]
        if reasons:
            line += ": " + "; ".join(reasons)
        pending = body.get("pending") or []
        if pending:
            line += f"; pending {', '.join(str(p) for p in pending)}"
        return line
    plain = _plain_status(message.kind, subject, body)
    if plain is not None:
        return plain
    details = ", ".join(f"{k}={v}" for k, v in body.items())
    return f"{message.kind} {subject}" + (f": {details}" if details else "")


def _series(body: Mapping[str, Any]) -> str:
    """`` series 7 'sct_dual_echo'``: the console series a 1.3 event names; "" from an older agent."""
    if "series_number" not in body and "series_description" not in body:
        return ""
    number = body.get("series_number")
    description = body.get("series_description") or ""
    label = f" series {number if number is not None else '?'}"
    return label + (f" {description!r}" if description else "")


def _received(subject: str, body: Mapping[str, Any]) -> str:
    """``received <id> series 7 'sct_dual_echo': 84/200 images``, and how the acquisition ended once it has."""
    expected = body.get("images_expected")
    line = f"received {subject}{_series(body)}: {body.get('images_received', '?')}"
    line += f"/{expected} images" if expected is not None else " images (total not stated)"
    if body.get("ended"):
        line += f", ended ({body.get('ended_by') or '?'})"
    return line


def _plain_status(kind: str, subject: str, body: Mapping[str, Any]) -> str | None:
    """The line for the kinds that need no more than their body's fields; None for the others."""
    if kind == StatusKind.RECEIVED:
        return _received(subject, body)
    if kind == StatusKind.FLAGGED:
        return _flagged(subject, body)
    if kind == StatusKind.PROGRESS:
        if body.get("restarted"):
            return f"progress {subject}: stream restarted ({body.get('reason', '?')})"
        return f"progress {subject}: slabs {body.get('slabs_done', '?')}/{body.get('slab_count', '?')}"
    lines: dict[str, Callable[[], str]] = {
        StatusKind.DICOM: lambda: (
            f"DICOM {subject}: {'' if body.get('ok') else 'FAILED '}{body.get('step', '?')}: "
            f"{body.get('message', '')}"
        ),
        StatusKind.ERROR: lambda: f"ERROR {subject}: {body.get('stage', '?')}: {body.get('message', '')}",
        StatusKind.REFUSED: lambda: f"REFUSED {subject}: {body.get('message', '')}",
        StatusKind.WATCH: lambda: (
            f"WATCH FOLDER {'available' if body.get('available') else 'UNAVAILABLE'}: {body.get('message', '')}"
        ),
    }
    line = lines.get(kind)
    return line() if line is not None else None


def _flagged(subject: str, body: Mapping[str, Any]) -> str:
    """``FLAGGED <id>: 2 region(s), 2.8 mL: sCT not trusted in slices 41-53 ...``; in lower case when the volume
    was checked and nothing was found, or not checked at all."""
    count = body.get("flagged")
    message = body.get("message", "")
    if not body.get("checked") or count is None:
        return f"flagged {subject}: not checked: {message}"
    if count == 0:
        return f"flagged {subject}: 0 regions: {message}"
    return f"FLAGGED {subject}: {count} region(s), {float(body.get('volume_ml') or 0.0):.1f} mL: {message}"


def _reason_text(reason: object) -> str:
    if isinstance(reason, Mapping):
        if "text" in reason:
            return str(reason["text"])
        return (
            f"{reason.get('attribute', '?')}: found {reason.get('found', '?')}, "
            f"required {reason.get('required', '?')} (protocol {reason.get('protocol_id', '?')})"
        )
    return str(reason)


def describe_volume(volume: ReceivedVolume, path: Path) -> str:
    geometry = volume.geometry
    shape = "x".join(str(n) for n in geometry.shape)
    spacing = " x ".join(f"{s:g}" for s in geometry.spacing)
    if volume.complete_from_slabs:
        slabs = f"slabs {volume.slabs_received}/{volume.slab_count}" + (
            ", equal to the volume message"
            if volume.matches_volume_message
            else ", DIFFER from the volume message"
        )
    elif volume.republished:
        slabs = "republished by a restarted agent (computed before the restart)"
    elif volume.from_snapshot:
        slabs = "from the snapshot (published before this listener connected)"
    else:
        slabs = f"slabs {volume.slabs_received}/{volume.slab_count} (missed some; used the volume message)"
    if volume.confidence is None:
        confidence = "no confidence (not checked)"
    elif volume.flagged:
        confidence = f"confidence: {volume.flagged} region(s) NOT TO TRUST"
    else:
        confidence = "confidence: nothing flagged"
    return (
        f"volume {volume.acquisition_id}: {shape} voxels, spacing {spacing} mm, model {volume.model_id} "
        f"{volume.model_version}, protocol {volume.protocol_id}, checksum ok (sha256 {volume.sha256[:12]}), "
        f"{slabs}; {confidence}; saved {path}"
    )


# ------------------------------------------------------------------------------------------------ saving


def save_volume(volume: ReceivedVolume, out: Path) -> Path:
    """Write ``sct.npy``, ``preview.png`` and then ``geometry.json`` atomically into ``out/<acquisition_id>/``."""
    if not _SAFE_NAME.fullmatch(volume.acquisition_id):
        raise ValueError(
            f"acquisition_id: found {volume.acquisition_id!r}; expected letters, digits, '.', '_' or '-' "
            "(it becomes a directory name)"
        )
    folder = out / volume.acquisition_id
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.ascontiguousarray(volume.hu, dtype=WIRE_DTYPE)
    _write_atomic(folder / SCT_FILE, lambda f: np.save(f, hu, allow_pickle=False))
    if volume.confidence is not None:
        confidence = np.ascontiguousarray(volume.confidence)
        _write_atomic(folder / CONFIDENCE_FILE, lambda f: np.save(f, confidence, allow_pickle=False))
    preview = io.BytesIO()
    render_preview(hu, volume.geometry).save(preview, format="PNG")
    _write_atomic(folder / PREVIEW_FILE, lambda f: f.write(preview.getvalue()))
    text = json.dumps(geometry_record(volume), indent=2) + "\n"
    _write_atomic(folder / GEOMETRY_FILE, lambda f: f.write(text.encode("utf-8")))
    return folder


def geometry_record(volume: ReceivedVolume) -> dict[str, Any]:
    """What ``geometry.json`` holds. ``sha256`` is of the voxel data as on the wire, not of the .npy file."""
    geometry = volume.geometry
    return {
        "acquisition_id": volume.acquisition_id,
        "synthetic": True,
        "shape": list(geometry.shape),
        "spacing_mm": list(geometry.spacing),
        "axes": AXES,
        "affine_lps": geometry.affine.tolist(),
        "dtype": WIRE_DTYPE,
        "units": UNITS,
        "model": {"id": volume.model_id, "version": volume.model_version},
        "protocol_id": volume.protocol_id,
        "sha256": volume.sha256,
        "sha256_of": "int16 little-endian voxel data in C order (the wire payload), not the .npy file",
        "slab_count": volume.slab_count,
        "slabs_received": volume.slabs_received,
        "complete_from_slabs": volume.complete_from_slabs,
        "matches_volume_message": volume.matches_volume_message,
        "publisher_id": volume.publisher_id,
        "seq": volume.seq,
        "received_at": volume.received_at,
        "confidence": None
        if volume.confidence is None
        else {
            "file": CONFIDENCE_FILE,
            "dtype": "|u1",
            "method": volume.confidence_method,
            "threshold": volume.confidence_threshold,
            "flagged": volume.flagged,
            "regions": [r.as_json() for r in volume.regions],
        },
    }


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old file or the new one, never half."""
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        temp = Path(handle.name)
        try:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            temp.unlink(missing_ok=True)
            raise
    try:
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------- preview


def render_preview(hu: npt.NDArray[np.int16], geometry: VolumeGeometry) -> Image.Image:
    """Mid-sagittal and mid-axial views side by side in the CT window W1500/L300, labelled SYNTHETIC CT."""
    try:
        lps, spacing = to_lps(hu, geometry)
        sagittal = lps[lps.shape[0] // 2].T[::-1]  # rows superior -> inferior, columns anterior -> posterior
        axial = lps[:, :, lps.shape[2] // 2].T  # rows anterior -> posterior, columns patient right -> left
        views = [(sagittal, spacing[2], spacing[1]), (axial, spacing[1], spacing[0])]
    except ValueError:
        # Too oblique to name patient axes: show the middle slice and the middle row as acquired.
        array = np.asarray(hu, dtype=np.float32)
        s = geometry.spacing
        views = [(array[array.shape[0] // 2], s[1], s[2]), (array[:, array.shape[1] // 2], s[0], s[2])]
    images = [_display(image, rows_mm, cols_mm) for image, rows_mm, cols_mm in views]
    width = sum(image.width for image in images) + PANEL_GAP * (len(images) - 1)
    height = LABEL_HEIGHT + max(image.height for image in images)
    canvas = Image.new("L", (width, height), 0)
    x = 0
    for image in images:
        canvas.paste(image, (x, LABEL_HEIGHT))
        x += image.width + PANEL_GAP
    label = f"{PREVIEW_LABEL}  W{CT_WINDOW_WIDTH_HU:g} L{CT_WINDOW_LEVEL_HU:g}"
    ImageDraw.Draw(canvas).text((4, 2), label, fill=255)
    return canvas


def _display(image: npt.NDArray[np.float32], rows_mm: float, cols_mm: float) -> Image.Image:
    low = CT_WINDOW_LEVEL_HU - CT_WINDOW_WIDTH_HU / 2
    scaled = np.clip((image - low) / CT_WINDOW_WIDTH_HU, 0.0, 1.0) * 255.0 + 0.5
    height = max(1, round(image.shape[0] * rows_mm * PIXELS_PER_MM))
    width = max(1, round(image.shape[1] * cols_mm * PIXELS_PER_MM))
    picture = Image.fromarray(np.ascontiguousarray(scaled, dtype=np.uint8))
    return picture.resize((width, height), Image.Resampling.BILINEAR)
