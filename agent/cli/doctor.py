"""``sct-agent doctor``: check, before the service starts (or when it will not), everything it needs.

One line per check, OK, WARN or FAIL, each naming the setting, the value found and what is expected: the
configuration (the same loader as ``run``), the protocol files, the model and its weights' sha256, the engine
cache (whether this machine's engine is built and accepted, or how long the first start will take to build it;
nothing is built), the CURVE keys, the status page's certificate and credential files, the ports (bound and released), the export folder, free space and the systemd
unit. Exit status 0 when nothing FAILs (WARNs allowed), 1 otherwise. Run it as the service user with the
service's configuration, since access and ownership are checked for whoever runs it:
``sudo -u sct-agent /opt/sct-agent/.venv/bin/sct-agent doctor --config /etc/sct-agent/agent.toml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from agent.ops import preflight, preflight_host
from agent.ops.preflight import Check, Status

EXIT_FAIL = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the agent's TOML configuration (default: built-in defaults)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the checks as JSON (status, name, attribute, message)"
    )
    parser.set_defaults(handler=run)


def run_checks(config_path: Path | None) -> list[Check]:
    """Every check, in the order printed; only the configuration's when it does not load."""
    config_check, config = preflight.check_config(config_path)
    if config is None:
        return [config_check]
    model_check, manifest = preflight.check_model(config)
    return [
        config_check,
        *preflight.check_protocols(config, manifest),
        model_check,
        preflight.check_engine_cache_dir(config),
        preflight.check_engine(config, manifest, config_path),
        *preflight.check_keys(config),
        *preflight.check_status_page(config),
        *preflight_host.check_ports(config),
        *preflight_host.check_export_folder(config.watch),
        *preflight_host.check_free_spaces(config),
        preflight_host.check_systemd_unit(),
    ]


def run(args: argparse.Namespace) -> int:
    # The checks call the agent's own start-up code, which logs what it decides (CURVE on, plain off loopback);
    # the report below says it once, so log records go nowhere (a NullHandler keeps logging's last resort quiet).
    logging.getLogger().addHandler(logging.NullHandler())
    checks = run_checks(args.config)
    failed = any(check.status is Status.FAIL for check in checks)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not failed,
                    "checks": [
                        {
                            "name": c.name,
                            "status": c.status.value,
                            "attribute": c.attribute,
                            "message": c.message,
                        }
                        for c in checks
                    ],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        for check in checks:
            print(check.line())
        if len(checks) == 1 and failed:
            print("the other checks need a configuration that loads")
        counts = {status: sum(c.status is status for c in checks) for status in Status}
        print(
            f"sct-agent doctor: {counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.OK]} OK"
            + (": the agent will not start or not work until each FAIL is fixed" if failed else "")
        )
    sys.stdout.flush()
    return EXIT_FAIL if failed else 0
