"""``sct-agent page-user``: add a person to the status page's users file, change their password, or remove them.

    sct-agent page-user technologist --file /etc/sct-agent/page-users      # asks for the password twice
    printf '%s\n' "$PASSWORD" | sct-agent page-user kiosk --file FILE     # from a script: one line on stdin
    sct-agent page-user technologist --file FILE --delete

The file holds a salted PBKDF2-SHA256 hash per person, never a password; it is created with mode 0600 and
replaced atomically, keeping its owner, so the running agent (which re-reads it when it changes) never sees half
of it. Use it with ``status_page.auth = "basic"`` and ``status_page.basic_users_file``.

Exit status: 0 when the file was written, 1 when it could not be (a bad name, a short password, the two entries
differ, the file is not writable).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Final, TextIO

from agent.status_page.credentials import MIN_PASSWORD_LENGTH, remove_user, set_user

DEFAULT_USERS_FILE: Final = Path("/etc/sct-agent/page-users")
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "page-user", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="the person's user name (letters, digits, ._@-)")
    parser.add_argument(
        "--file",
        type=Path,
        default=DEFAULT_USERS_FILE,
        help=f"the users file (default: {DEFAULT_USERS_FILE})",
    )
    parser.add_argument("--delete", action="store_true", help="remove the user instead")
    parser.set_defaults(handler=run)


def read_password(stdin: TextIO) -> str:
    """Twice from the terminal without echo; else one line from stdin (a script, a pipe)."""
    if stdin.isatty():
        first = getpass.getpass(f"password (at least {MIN_PASSWORD_LENGTH} characters): ")
        if getpass.getpass("the same password again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    path: Path = args.file
    try:
        if args.delete:
            if not path.exists() or not remove_user(path, args.name):
                print(f"sct-agent page-user: {args.name!r} is not in {path}", file=sys.stderr)
                return EXIT_FAILED
            out.write(f"Removed {args.name} from {path}; the agent re-reads it at the next request.\n")
            return EXIT_OK
        added = set_user(path, args.name, read_password(stdin))
    except ValueError as error:
        print(f"sct-agent page-user: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"sct-agent page-user: cannot write {path}: {error.strerror}", file=sys.stderr)
        return EXIT_FAILED
    done = "Added" if added else "Changed the password of"
    out.write(
        f"""{done} {args.name} in {path.absolute()} (mode 0600, salted PBKDF2-SHA256).

The agent reads it as the service user; on the agent's machine:
  chown sct-agent:sct-agent {path.absolute()}
and in /etc/sct-agent/agent.toml:
  [status_page]
  auth = "basic"
  basic_users_file = "{path.absolute()}"
A running agent re-reads the file when it changes; no restart is needed.
"""
    )
    return EXIT_OK
