"""``sct-agent run``: the agent as a long-running service (systemd ``Type=notify``, or a terminal).

Exit status: 0 after a clean stop (SIGTERM or Ctrl-C), 78 (EX_CONFIG) when the configuration, a protocol file
or the model is unusable (systemd's unit does not restart on it: a restart cannot fix a typo), 1 when the
pipeline fails at run time.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.ops import sd_notify
from agent.ops.config import AgentConfig, ConfigError
from agent.ops.config_loader import describe_config, load_config
from agent.ops.log_format import configure_logging, priority, stderr_is_journal
from agent.service import AgentService
from agent.validation.protocols import ProtocolError
from engines.model.manifest import ManifestError, WeightsIntegrityError

logger = logging.getLogger("agent")

EXIT_CONFIG = 78
#: Health check period when systemd's watchdog is off (s); with it on, half its interval.
HEALTH_PERIOD_S = 5.0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration (default: built-in defaults)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as error:
        # Before logging is configured; under systemd the journal still files it as an error.
        prefix = f"<{priority(logging.ERROR)}>" if stderr_is_journal() else ""
        print(f"{prefix}sct-agent run: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(describe_config(config))
        return 0
    configure_logging(config)
    return run_agent(config)


def run_agent(config: AgentConfig, stop: threading.Event | None = None) -> int:
    """Start the pipeline, serve until SIGTERM/SIGINT (or ``stop``), then stop cleanly."""
    stop = stop or threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s; stopping after the slab in flight", signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        return _serve(config, stop)
    finally:
        # Leave the process as found: a caller (a test, an embedding program) gets its own Ctrl-C back.
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve(config: AgentConfig, stop: threading.Event) -> int:
    pipeline = AgentService(config)
    try:
        endpoints = pipeline.start()
    except (ConfigError, ProtocolError, ManifestError, WeightsIntegrityError, ValueError) as error:
        # Logged only (stderr either way): a second, unformatted line would lose its priority in the journal
        # and break the one-JSON-object-per-line format.
        logger.error("cannot start: %s", error)
        return EXIT_CONFIG
    except OSError as error:
        logger.error("cannot start: %s", error)
        return 1
    sd_notify.ready(f"publishing on {endpoints.publish}")
    print(
        f"sct-agent ready: watching {config.watch.folder}, publishing on {endpoints.publish}, "
        f"metrics {endpoints.metrics_url or 'off'}, status page {endpoints.page_url or 'off'}"
        + (f", receiving C-STORE as {endpoints.receive}" if endpoints.receive else ""),
        flush=True,
    )
    watchdog = sd_notify.watchdog_interval_s()
    period = min(HEALTH_PERIOD_S, watchdog / 2) if watchdog else HEALTH_PERIOD_S
    status = 0
    try:
        while not stop.wait(period):
            if pipeline.healthy():
                sd_notify.watchdog_ping()
            else:
                logger.error("a pipeline stage died; withholding the watchdog ping so systemd restarts us")
                status = 1
                break
    finally:
        sd_notify.stopping()
        started = time.perf_counter()
        pipeline.stop()
        logger.info("stopped in %.2f s", time.perf_counter() - started)
    return status
