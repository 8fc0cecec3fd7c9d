"""``sct-agent engine build``: compile, cache and accept the engine the agent will run, before the first patient.

The agent builds a missing engine on its first start anyway, but a TensorRT or inductor build takes a minute or
more; IT runs this once after installing (or after a driver, model or agent update), with the same configuration
file as the service, and sees a progress bar, the backend ``auto`` chose (and why it passed over faster ones),
and the acceptance figures against the fp32 reference. Run it as the service user so the cache belongs to it:
``sudo -u sct-agent sct-agent engine build --config /etc/sct-agent/agent.toml``.

``sct-agent engine calibrate-confidence --model DIR`` calibrates a model folder's confidence on normal validation
phantoms (docs/model.md, Confidence): it writes the statistics file and the manifest's ``confidence`` section and
leaves the weights untouched. Packaging a trained model runs the same step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from agent.ops.config import ConfigError
from agent.ops.config_loader import load_config
from engines.backends.base import BackendOptions, BackendUnavailableError
from engines.backends.registry import AUTO, BACKENDS
from engines.backends.remote_link import RemoteInferenceError
from engines.confidence.calibrate import (
    DEFAULT_CHECK_SEEDS,
    DEFAULT_COMPONENTS,
    DEFAULT_FIT_SEEDS,
    CalibrationSettings,
    calibrate_model,
)
from engines.confidence.input_features import CONTEXTS, Context
from engines.inference.engine import SctEngine
from engines.model.manifest import ManifestError, ModelManifest, default_manifest
from engines.serving.contract import ServedModelMismatchError

EXIT_CONFIG = 78
BAR_WIDTH = 30


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build (or load and accept) the configured engine and cache it")
    build.add_argument("--config", type=Path, metavar="FILE", help="the agent's TOML configuration")
    build.add_argument("--backend", choices=[AUTO, *BACKENDS], help="override engine.backend")
    build.add_argument(
        "--in-plane",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLUMNS"),
        help="image matrix to build for (default: the model's, e.g. 338 338)",
    )
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(handler=run)
    calibrate = actions.add_parser(
        "calibrate-confidence",
        help="calibrate a model folder's per-voxel confidence on normal validation phantoms",
    )
    calibrate.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="the model folder to calibrate"
    )
    calibrate.add_argument(
        "--fit", type=int, default=len(DEFAULT_FIT_SEEDS), metavar="N", help="validation phantoms to fit on"
    )
    calibrate.add_argument(
        "--check",
        type=int,
        default=len(DEFAULT_CHECK_SEEDS),
        metavar="N",
        help="other validation phantoms the threshold is chosen on",
    )
    calibrate.add_argument(
        "--components",
        type=int,
        default=DEFAULT_COMPONENTS,
        metavar="K",
        help=f"Gaussian components of the density (default {DEFAULT_COMPONENTS})",
    )
    calibrate.add_argument(
        "--contexts",
        type=parse_contexts,
        default=CONTEXTS,
        metavar="SxRxC,...",
        help="neighbourhoods of the input statistics in 4-voxel blocks, slices x rows x columns, odd "
        f"(default {format_contexts(CONTEXTS)})",
    )
    calibrate.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    calibrate.set_defaults(handler=run_calibrate)


def parse_contexts(text: str) -> tuple[Context, ...]:
    """``"3x3x3,5x9x9"`` -> ((3, 3, 3), (5, 9, 9)); argparse reports the ValueError with the option's name."""
    try:
        contexts = tuple(tuple(int(k) for k in part.split("x")) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"found {text!r}, expected e.g. 3x3x3,5x9x9") from error
    if not contexts or any(len(c) != 3 or min(c) < 1 or any(k % 2 == 0 for k in c) for c in contexts):
        raise argparse.ArgumentTypeError(
            f"found {text!r}, expected odd slices x rows x columns, e.g. 3x3x3,5x9x9"
        )
    return tuple((c[0], c[1], c[2]) for c in contexts)


def format_contexts(contexts: tuple[Context, ...]) -> str:
    return ",".join("x".join(str(k) for k in c) for c in contexts)


class ProgressBar:
    """One line redrawn in place on a terminal; one line per step when stderr is a file (the journal)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._started = time.monotonic()
        self._last = ""

    def __call__(self, step: str, fraction: float) -> None:
        filled = round(BAR_WIDTH * max(0.0, min(1.0, fraction)))
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} {time.monotonic() - self._started:6.1f} s  {step}"
        if self._tty:
            self._stream.write("\r" + line.ljust(len(self._last)))
            if fraction >= 1.0:
                self._stream.write("\n")
        elif step != self._last:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._last = line if self._tty else step


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = load_config(args.config)
        manifest = ModelManifest.load(config.engine.model) if config.engine.model else default_manifest()
    except (ConfigError, ManifestError) as error:
        print(f"sct-agent engine build: {error}", file=sys.stderr)
        return EXIT_CONFIG
    backend = args.backend or config.engine.backend
    cache_dir = config.engine_cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        engine = SctEngine.load(
            manifest,
            backend=backend,
            options=BackendOptions(
                threads=config.engine.threads or None,
                cache_dir=cache_dir,
                progress=ProgressBar(sys.stderr),
                # triton: the server checked, and its engine for this window built and warmed there.
                remote=config.triton.link(),
            ),
            in_plane=(args.in_plane[0], args.in_plane[1]) if args.in_plane else None,
            slab_depth=config.engine.slab_depth or None,
        )
    except (BackendUnavailableError, RemoteInferenceError, ServedModelMismatchError) as error:
        print(f"sct-agent engine build: {error}", file=sys.stderr)
        return 1
    info = engine.info
    engine.close()
    result = {
        "backend": info.backend,
        "precision": info.precision,
        "device": info.device,
        "window": list(info.input_shape),
        "engine": info.details.get("engine", "not cached (this backend compiles at start)"),
        "acceptance": info.details.get("acceptance"),
        "passed_over": info.details.get("passed_over", []),
        "refusals": info.details.get("refusals", []),
        "cache_dir": str(cache_dir),
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"engine: {info.backend} {info.precision} on {info.device}, window {'x'.join(map(str, info.input_shape))}"
    )
    for line in result["passed_over"]:
        print(f"  passed over: {line}")
    for line in result["refusals"]:
        print(f"  refused: {line}")
    acceptance = result["acceptance"]
    if acceptance:
        print(
            f"  acceptance: mean |ΔHU| {acceptance['mean_abs_hu']} (tolerance {acceptance['tolerance_hu']}), "
            f"p99.9 {acceptance['p999_abs_hu']}, max {acceptance['max_abs_hu']} HU vs fp32 eager: "
            f"{'passed' if acceptance['passed'] else 'FAILED'}"
        )
    print(f"  {result['engine']} in {result['seconds']} s; cache {cache_dir}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """``sct-agent engine calibrate-confidence``: fit and threshold, then write into the model folder."""
    if args.fit < 1 or args.check < 1:
        print(
            f"sct-agent engine calibrate-confidence: --fit and --check must be >= 1; found {args.fit}, {args.check}",
            file=sys.stderr,
        )
        return 2
    first = DEFAULT_FIT_SEEDS[0]
    settings = CalibrationSettings(
        fit_seeds=tuple(first + i for i in range(args.fit)),
        check_seeds=tuple(first + args.fit + i for i in range(args.check)),
        components=args.components,
        contexts=args.contexts,
    )
    try:
        manifest = calibrate_model(
            args.model, settings, threads=args.threads, report=lambda line: print(line, file=sys.stderr)
        )
    except (ManifestError, ValueError) as error:
        print(f"sct-agent engine calibrate-confidence: {error}", file=sys.stderr)
        return 1
    spec = manifest.confidence
    assert spec is not None
    print(
        f"{manifest.label}: confidence {spec.method}, threshold {spec.threshold}, regions >= "
        f"{spec.min_region_mm3:g} mm³, operating point {spec.calibration['operating_point']}; "
        f"statistics {spec.statistics_file} sha256 {spec.statistics_sha256}"
    )
    return 0
