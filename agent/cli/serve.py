"""``sct-agent serve``: serve the sCT engine to agents on other processes or hosts through Triton Inference Server.

Runs on a GPU server shared by several scanners (or beside an agent on one box): agents with ``engine.backend =
"triton"`` send it their slab windows and get the network output back (docs/scale-out.md). The model is the one in
``--model`` (default: the one shipped in the package) and is served as ``<model_id>-<version>``; agents refuse a
server whose weights differ from their manifest's.

Run it from its own environment made from the system's Python 3.11 (``make serve-env``; PyTriton's model stub
loads the system's libpython): ``.venv-serve/bin/sct-agent serve``. Under systemd (``systemd/sct-serve.service``)
it tells systemd it is ready only when the engine is warm and the model loaded.

Exit status: 0 on SIGTERM or Ctrl-C, 2 for unusable arguments or an environment PyTriton cannot run in, 1 when
the server failed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_BAD_ARGUMENTS: Final = 2

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engines.backends.base import Precision  # noqa: PLC0415 - torch, only for this subcommand
    from engines.backends.registry import AUTO, BACKENDS  # noqa: PLC0415
    from engines.backends.triton_client import TritonBackend  # noqa: PLC0415

    parser = subparsers.add_parser(
        "serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, metavar="DIR", help="model folder (default: the shipped model)")
    local = [name for name in BACKENDS if name != TritonBackend.name]
    parser.add_argument(
        "--backend", default=AUTO, choices=[AUTO, *local], help="engine backend (default auto)"
    )
    parser.add_argument("--precision", choices=[p.value for p in Precision], help="backend precision")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (0 = all cores)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="compiled engine cache")
    parser.add_argument("--address", default="127.0.0.1", help="address of the gRPC and metrics endpoints")
    parser.add_argument("--grpc-port", type=int, default=8001, metavar="PORT")
    parser.add_argument(
        "--http-port", type=int, default=8000, metavar="PORT", help="PyTriton's control port (loopback)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8002, metavar="PORT", help="Triton's Prometheus metrics"
    )
    parser.add_argument(
        "--max-batch", type=int, default=4, metavar="N", help="windows Triton joins into one batch"
    )
    parser.add_argument(
        "--batch-delay-us", type=int, default=2000, metavar="US", help="how long Triton waits to fill a batch"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=16,
        metavar="N",
        help="waiting requests beyond which Triton refuses at once",
    )
    parser.add_argument(
        "--slab-depth",
        type=int,
        action="append",
        metavar="N",
        help="slab depth agents use (repeatable; default the manifest's): warmed before ready",
    )
    parser.add_argument(
        "--matrix",
        action="append",
        metavar="ROWSxCOLS",
        help="in-plane matrix agents send (repeatable; default the manifest's): warmed before ready",
    )
    parser.add_argument(
        "--max-shapes",
        type=int,
        default=4,
        metavar="N",
        help="window shapes kept built and warm (least used closed)",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="server key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE", help="require client certificates signed by this CA"
    )
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="require this access token")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext or no authentication on a non-loopback address",
    )
    parser.add_argument(
        "--workspace", type=Path, metavar="DIR", help="PyTriton's workspace (default: a temp folder)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from agent.ops import sd_notify  # noqa: PLC0415
    from engines.backends.base import Precision  # noqa: PLC0415
    from engines.model.manifest import ManifestError, ModelManifest, default_manifest  # noqa: PLC0415
    from engines.serving.triton_server import (  # noqa: PLC0415
        ServeConfigError,
        ServeSettings,
        serve,
        serve_environment_problem,
        warm_windows,
    )

    problem = serve_environment_problem()
    if problem is not None:
        print(f"sct-agent serve: {problem}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        manifest = ModelManifest.load(args.model) if args.model else default_manifest()
        windows = warm_windows(
            manifest,
            args.slab_depth or [manifest.slab.depth],
            [_matrix(text) for text in args.matrix] if args.matrix else [manifest.matrix],
        )
        settings = ServeSettings(
            manifest=manifest,
            backend=args.backend,
            precision=Precision(args.precision) if args.precision else None,
            threads=args.threads or None,
            cache_dir=args.cache_dir,
            address=args.address,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            max_batch=args.max_batch,
            batch_delay_us=args.batch_delay_us,
            max_queue=args.max_queue,
            warm_windows=windows,
            max_shapes=args.max_shapes,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            tls_client_ca_file=args.tls_client_ca,
            token_file=args.token_file,
            insecure=args.insecure,
            workspace=args.workspace,
        )
        settings.check()
    except (ManifestError, ServeConfigError, ValueError) as error:
        print(f"sct-agent serve: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # PyTriton's serve loop stops the server on it

    def ready(where: str) -> None:
        sd_notify.ready(f"serving {manifest.label} on {where}")

    signal.signal(signal.SIGTERM, stop)
    sd_notify.status("warming up the sCT engine")
    try:
        serve(settings, on_ready=ready)
    except KeyboardInterrupt:
        pass
    except Exception:
        logger.exception("the Triton server failed")
        return EXIT_FAILED
    finally:
        sd_notify.stopping()
    return EXIT_OK


def _matrix(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit() or int(rows) < 1 or int(cols) < 1:
        raise ValueError(f"--matrix: found {text!r}, expected ROWSxCOLS, e.g. 338x338")
    return int(rows), int(cols)
