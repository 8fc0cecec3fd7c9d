"""sct-agent: synthetic CT from dual-echo MRI at the scanner's edge.

Subcommands are the tools of the people who use the product: the agent itself (`run`), the protocol check IT
and the MRI technologist run on a test export before the first patient (`check`), the subscriber (`listen`),
CURVE keys for both (`keys`), the status page's users and token (`page-user`,
`page-token`), the inference engine IT builds once per machine (`engine build`), the preflight IT
runs before the service starts or when it will not (`doctor`), sending sCT DICOM series again (`resend`), and,
for developers and evaluators, the simulated scanner (`simulate`), the demo, training and evaluation of the model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__

#: Every subcommand: its module (imported only when that subcommand runs, so that ``sct-agent --help`` and
#: ``--version`` answer without loading torch) and the one line ``--help`` shows for it.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("agent.cli.run", "run the agent: watch the export folder, judge, stream sCT, publish"),
    "check": (
        "agent.cli.check",
        "judge the MR acquisitions in a folder against the protocols, as the agent would",
    ),
    "listen": (
        "agent.cli.listen",
        "subscribe to an agent, print its status and save the sCT volumes it publishes",
    ),
    "engine": (
        "agent.cli.engine",
        "build, cache and accept the inference engine (TensorRT, CUDA or CPU) before the first patient",
    ),
    "doctor": (
        "agent.cli.doctor",
        "check the configuration, model, engine cache, keys, ports and folders before the service starts",
    ),
    "serve": (
        "agent.cli.serve",
        "serve the sCT engine to agents through Triton Inference Server (a GPU pool for several scanners)",
    ),
    "keys": ("agent.cli.keys", "create CURVE key pairs for the publisher and its subscribers"),
    "page-user": ("agent.cli.page_user", "add or change a status page user (basic auth), or remove one"),
    "page-token": ("agent.cli.page_token", "make the status page's access token file (token auth, kiosks)"),
    "resend": (
        "agent.cli.resend",
        "send sCT DICOM series folders to a DICOM peer (C-STORE), e.g. after the PACS was down",
    ),
    "simulate": ("agent.cli.simulate", "export a simulated phantom case as a scanner would"),
    "demo": (
        "agent.cli.demo",
        "start the agent, play a scanner exporting a passing and a deviating series, receive the sCT",
    ),
    "train": ("agent.cli.train", "train (or resume training) the sCT model on simulated phantoms"),
    "evaluate": (
        "agent.cli.evaluate",
        "measure sCT accuracy on held-out phantoms or a DICOM sCT/CT pair",
    ),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the subcommand ``argv`` names is imported and given its arguments; the
    others are listed by name and help line."""
    parser = argparse.ArgumentParser(
        prog="sct-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sct-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module, help_line) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_line)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    handler = getattr(args, "handler", None)
    if handler is None:
        return 2
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
