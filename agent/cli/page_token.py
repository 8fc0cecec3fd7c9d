"""``sct-agent page-token``: make the status page's access token (a random 32-byte token in a file, mode 0600).

    sct-agent page-token --file /etc/sct-agent/page-token              # a new file; refuses to overwrite one
    sct-agent page-token --file /etc/sct-agent/page-token --replace    # a new token: every kiosk must get it

A kiosk browser opens ``https://HOST:PORT/?token=TOKEN`` once: the agent answers with a cookie and the same
address without the token. Other clients send ``Authorization: Bearer TOKEN``. Replacing the token ends every
cookie made with the old one (the running agent re-reads the file when it changes). Use it with
``status_page.auth = "token"`` and ``status_page.token_file``.

Exit status: 0 when the file was written, 1 when it was not (it exists and --replace was not given, the folder is
not writable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final, TextIO

from agent.status_page.credentials import create_token_file

DEFAULT_TOKEN_FILE: Final = Path("/etc/sct-agent/page-token")
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "page-token", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--file",
        type=Path,
        default=DEFAULT_TOKEN_FILE,
        help=f"the token file (default: {DEFAULT_TOKEN_FILE})",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing token (every kiosk then needs the new one)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    path: Path = args.file
    try:
        token = create_token_file(path, replace=args.replace)
    except FileExistsError as error:
        print(f"sct-agent page-token: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"sct-agent page-token: cannot write {path}: {error.strerror}", file=sys.stderr)
        return EXIT_FAILED
    out.write(
        f"""Wrote a new token to {path.absolute()} (mode 0600).

The agent reads it as the service user; on the agent's machine:
  chown sct-agent:sct-agent {path.absolute()}
and in /etc/sct-agent/agent.toml:
  [status_page]
  auth = "token"
  token_file = "{path.absolute()}"

Kiosk browser: open once  https://HOST:PORT/?token={token}
Other clients: send       Authorization: Bearer {token}
Keep the token as you would a password.
"""
    )
    return EXIT_OK
