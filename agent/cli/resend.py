"""``sct-agent resend``: send sCT DICOM series that are on disk to a DICOM peer, for hospital IT.

The agent sends each series once, with retries (``dicom.store_peer``); when the PACS stays down longer than
those retries, the series stays complete in ``dicom.folder`` and the failure is logged, counted and reported
on the status topic. This command sends such series (or any series folder) afterwards:

    sct-agent resend /var/lib/sct-agent/dicom/sct-3f9a1c0e7b2d4a68-1007 --peer PACS@10.0.0.20:104

Exit status: 0 when every series was stored, 1 when any was not, 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from agent.dicom_out.c_store import StoreError, StorePeer, store_series

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_BAD_ARGUMENTS: Final = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "resend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("series", type=Path, nargs="+", help="series folders written by the agent")
    parser.add_argument("--peer", required=True, help="AE_TITLE@host:port")
    parser.add_argument("--calling-ae", default="SCT-EDGE", help="our AE title (default SCT-EDGE)")
    parser.add_argument("--attempts", type=int, default=3, help="associations tried per series (default 3)")
    parser.set_defaults(handler=run_resend)


def run_resend(args: argparse.Namespace) -> int:
    try:
        peer = StorePeer.parse(args.peer)
    except ValueError as error:
        print(f"sct-agent resend: error: --peer: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    if args.attempts < 1:
        print(f"sct-agent resend: error: --attempts: found {args.attempts}; expected >= 1", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    status = EXIT_OK
    for folder in args.series:
        files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if not files:
            print(f"{folder}: no .dcm files (expected a series folder written by the agent)", file=sys.stderr)
            status = EXIT_FAILED
            continue
        try:
            result = store_series(files, peer, calling_ae=args.calling_ae, attempts=args.attempts)
        except StoreError as error:
            print(f"{folder.name}: NOT stored: {error}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        print(f"{folder.name}: {result.stored} instances stored at {peer} ({result.attempts} attempt(s))")
    return status
