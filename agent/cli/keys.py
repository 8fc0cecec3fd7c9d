"""``sct-agent keys``: make CURVE key pairs for the publisher and its subscribers, and say where each file goes.

    sct-agent keys server --out /etc/sct-agent/curve            # once per agent
    sct-agent keys client robot-or1 --out ./robot-or1-keys       # once per robot or navigation system

Each pair is a public ``NAME.key`` (hand it out freely) and a secret ``NAME.key_secret`` (mode 0600; it never
leaves the machine that uses it). Existing files are never overwritten. The printed instructions name the
config keys (``publish.secret_key_file``, ``publish.allowed_keys_folder``) and the exact commands, so hospital
IT does not have to read the protocol document to install a robot.

Exit status: 0 when the pair was written, 1 when it could not be (the file exists, the folder is not writable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final, TextIO

from agent.publish.curve_keys import KeyFileError, create_key_pair

SERVER_NAME: Final = "server"
DEFAULT_ALLOWED: Final = Path("/etc/sct-agent/curve/allowed")
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    server = roles.add_parser("server", help="the agent's key pair (publish.secret_key_file)")
    server.add_argument("--out", type=Path, default=Path("/etc/sct-agent/curve"), help="folder for the pair")
    server.add_argument("--name", default=SERVER_NAME, help="file name stem (default: server)")
    server.set_defaults(handler=_main)
    client = roles.add_parser(
        "client", help="a subscriber's key pair (its public key goes on the allow-list)"
    )
    client.add_argument("name", help="the subscriber, e.g. robot-or1 (file name stem)")
    client.add_argument("--out", type=Path, default=Path(), help="folder for the pair (default: here)")
    client.add_argument(
        "--allowed",
        type=Path,
        default=DEFAULT_ALLOWED,
        help="the agent's publish.allowed_keys_folder, named in the printed instructions",
    )
    client.set_defaults(handler=_main)


def _main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    try:
        public, secret = create_key_pair(args.out, args.name)
    except KeyFileError as error:
        print(f"sct-agent keys: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"sct-agent keys: cannot write in {args.out}: {error.strerror}", file=sys.stderr)
        return EXIT_FAILED
    if args.role == "server":
        out.write(server_instructions(public, secret))
    else:
        out.write(client_instructions(public, secret, args.allowed))
    return EXIT_OK


def server_instructions(public: Path, secret: Path) -> str:
    public, secret = public.absolute(), secret.absolute()
    return f"""Wrote the publisher's key pair:
  {secret}  (secret, mode 0600)
  {public}  (public)

Install on the agent's machine:
  chown sct-agent:sct-agent {secret}
  chmod 600 {secret}
and in /etc/sct-agent/agent.toml:
  [publish]
  secret_key_file = "{secret}"
  allowed_keys_folder = "{DEFAULT_ALLOWED}"   # the subscribers' .key files
The agent refuses to start if others can read the secret key file.

Give {public.name} to every subscriber (robot, navigation system): it is public and lets
them check that they talk to this agent.
"""


def client_instructions(public: Path, secret: Path, allowed: Path) -> str:
    public, secret = public.absolute(), secret.absolute()
    return f"""Wrote a subscriber key pair:
  {secret}  (secret, mode 0600: stays on the subscriber)
  {public}  (public)

On the agent's machine, allow this subscriber:
  install -m 644 {public.name} {allowed}/
  systemctl restart sct-agent        # the allow-list is read at start

On the subscriber, connect with the publisher's public key (server.key) and this secret key, e.g.:
  sct-agent listen --endpoint tcp://AGENT:5556 --server-key server.key --client-key {secret.name}
or in Python:
  SctClient(endpoint, snapshot_endpoint=..., curve=curve_client(Path("server.key"), Path("{secret.name}")))
A subscriber whose key is not in {allowed} receives nothing.
"""
