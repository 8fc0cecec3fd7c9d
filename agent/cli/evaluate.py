"""``sct-agent evaluate``: how close the model's sCT is to CT, in the metrics the sCT literature reports.

``--phantom N`` generates N held-out phantoms (subjects never used in training or validation) at the seed
protocol, runs the model and a non-learned baseline, and prints MAE/ME over the body and per tissue, bone Dice at
150/200/250 HU, Bambach's bone precision/recall/Dice and PSNR. ``--sct DIR --ct DIR`` compares two DICOM CT
series on the same grid instead. ``--json`` prints the full report as JSON.

For a model with a confidence, each phantom also reports its flagged regions: the flagged volume as a share of the
bone volume and whether any region was flagged. ``--pathology NAME`` (repeatable) runs the N held-out phantoms with
that pathology instead (the same seeds, so each has its normal twin) and reports region-level sensitivity, region
AUROC against the twin and the flagged volume outside the objects, beside the usual HU metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engines.backends.base import BackendOptions
from engines.backends.registry import AUTO, BACKENDS
from engines.evaluation.evaluate import evaluate_dicom, evaluate_phantoms, evaluation_seeds, format_table
from engines.inference.engine import SctEngine
from engines.model.manifest import ManifestError, ModelManifest, default_manifest
from engines.phantom.pathology import PATHOLOGIES

EXIT_BAD_ARGUMENTS = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--phantom", type=int, metavar="N", help="number of held-out phantoms")
    parser.add_argument("--sct", type=Path, metavar="DIR", help="DICOM sCT series folder (with --ct)")
    parser.add_argument("--ct", type=Path, metavar="DIR", help="DICOM CT series folder (with --sct)")
    parser.add_argument("--model", type=Path, metavar="DIR", help="model folder (default: the shipped model)")
    parser.add_argument("--backend", default=AUTO, choices=[AUTO, *BACKENDS], help="inference backend")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument(
        "--pathology",
        action="append",
        default=[],
        choices=[p.value for p in PATHOLOGIES],
        metavar="NAME",
        help=f"with --phantom: pathological phantoms ({', '.join(p.value for p in PATHOLOGIES)}); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (args.phantom is None) == (args.sct is None and args.ct is None) or (
        args.pathology and args.phantom is None
    ):
        print("evaluate: give either --phantom N [--pathology NAME] or --sct DIR --ct DIR", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    if args.phantom is not None:
        if args.phantom < 1:
            print(f"evaluate: --phantom must be >= 1; found {args.phantom}", file=sys.stderr)
            return EXIT_BAD_ARGUMENTS
        try:
            manifest = ModelManifest.load(args.model) if args.model else default_manifest()
        except ManifestError as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            return 1
        engine = SctEngine.load(manifest, backend=args.backend, options=BackendOptions(threads=args.threads))
        progress = None if args.json else (lambda line: print(line, file=sys.stderr))
        report = evaluate_phantoms(
            engine, evaluation_seeds(args.phantom), progress=progress, pathologies=args.pathology
        )
        engine.close()
    else:
        if args.sct is None or args.ct is None:
            print("evaluate: --sct and --ct go together", file=sys.stderr)
            return EXIT_BAD_ARGUMENTS
        try:
            report = evaluate_dicom(args.sct, args.ct)
        except (OSError, ValueError) as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0
