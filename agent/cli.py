"""sct-agent: synthetic CT from dual-echo MRI at the scanner's edge.

Subcommands are the tools of the people who use the product: the simulated scanner and the demo for developers
and evaluators, the agent itself (`run`), its subscriber (`listen`), CURVE keys for both (`keys`), sending sCT DICOM series again (`resend`), and the protocol check IT and the MRI
technologist run on a test export before the first patient (`check`).
"""

from __future__ import annotations

import argparse
import sys

from agent import check, demo, evaluate, keys, listen, resend, run, simulate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sct-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(subparsers)
    listen.add_parser(subparsers)
    check.add_parser(subparsers)
    keys.add_parser(subparsers)
    resend.add_parser(subparsers)
    simulate.add_parser(subparsers)
    demo.add_parser(subparsers)
    train.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        return 2
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
