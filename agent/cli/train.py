"""``sct-agent train``: train the default sCT model on phantoms generated on the fly.

Resumable: run the same command again after an interruption and it continues from the last checkpoint in the
output folder (a different recipe there is refused), on this device or another (``--device``). When training is
done it writes the weights, then measures validation figures on held-out subjects and writes a manifest beside
them, which makes the folder a model any ``sct-agent`` command can load with ``--model DIR``. ``--ship DIR``
then replaces the model in DIR only if the new one beats it on every headline metric of the same held-out
phantoms (``--force`` overrides, and the manifest records it).

Recipes: ``v2`` (default: 36000 steps, a new subject every 100 steps, 35 % hard cases) and ``v1`` (the first
shipped model's). Options below change single fields of the chosen recipe.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.training.device import TrainingDeviceError, training_device
from engines.training.package import package, ship
from engines.training.recipe import RECIPES, TrainingRecipe
from engines.training.ship_gate import SHIP_EVALUATION_SUBJECTS, ShipRefusedError
from engines.training.trainer import RecipeMismatchError, TrainingDivergedError, train

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "v2"
#: Recipe fields the command line may change: option destination -> recipe field.
RECIPE_OPTIONS = {
    "steps": "steps",
    "seed": "seed",
    "batch_size": "batch_size",
    "pool_size": "pool_size",
    "replace_every": "replace_every",
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/train"), metavar="DIR", help="output folder")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_RECIPE,
        help="named recipe (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, help="recipe seed: batches, augmentation, hard cases")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--pool-size", type=int, help="subjects held in memory")
    parser.add_argument("--replace-every", type=int, help="steps between new subjects")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:INDEX (default: cpu); a run may resume on another"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="generate subjects ahead of need in N worker processes (default 0: when needed, in this process)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--stop-after", type=int, metavar="STEPS", help="checkpoint and stop once this many steps are done"
    )
    parser.add_argument(
        "--no-package", action="store_true", help="stop after training (no validation figures, no manifest)"
    )
    parser.add_argument(
        "--ship",
        type=Path,
        metavar="DIR",
        help="replace the model in DIR (engines/model/default: the embedded default) if the new one is better",
    )
    parser.add_argument(
        "--ship-phantoms",
        type=int,
        default=SHIP_EVALUATION_SUBJECTS,
        metavar="N",
        help="held-out phantoms both models are compared on before shipping (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="ship even if not better on every metric (recorded in the manifest)",
    )
    parser.set_defaults(handler=run)


def recipe_from_args(args: argparse.Namespace) -> TrainingRecipe:
    """The named recipe with the fields the command line gave."""
    changes = {
        field: getattr(args, dest)
        for dest, field in RECIPE_OPTIONS.items()
        if getattr(args, dest) is not None
    }
    return RECIPES[args.recipe].with_changes(**changes) if changes else RECIPES[args.recipe]


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        device = training_device(args.device)
        if args.workers < 0:
            raise ValueError(f"--workers: found {args.workers}, expected >= 0")
        recipe = recipe_from_args(args)
    except (TrainingDeviceError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    try:
        weights = train(
            args.out,
            recipe,
            threads=args.threads,
            stop_after=args.stop_after,
            device=device,
            workers=args.workers,
        )
    except (RecipeMismatchError, TrainingDivergedError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    if weights is None:
        return 0
    logger.info("weights written to %s", weights)
    if args.no_package:
        return 0
    manifest = package(args.out, threads=args.threads)
    logger.info("manifest written: %s, slab %s", manifest.label, manifest.slab)
    if args.ship:
        try:
            shipped = ship(
                args.out, args.ship, force=args.force, subjects=args.ship_phantoms, threads=args.threads
            )
        except ShipRefusedError as exc:
            print(f"train: not shipped: {exc}", file=sys.stderr)
            return 1
        logger.info("shipped %s to %s", shipped.label, args.ship)
    return 0
