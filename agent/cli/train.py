"""``sct-agent train``: train the default sCT model on phantoms generated on the fly.

Resumable: run the same command again after an interruption and it continues from the last checkpoint in the
output folder (a different recipe there is refused). When training is done it writes the weights; ``--package``
then measures validation figures on held-out subjects and writes a manifest beside the weights, which makes the
folder a model any ``sct-agent`` command can load with ``--model DIR``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engines.training.package import package, ship
from engines.training.recipe import TrainingRecipe
from engines.training.trainer import train

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TrainingRecipe()
    parser.add_argument("--out", type=Path, default=Path("runs/train"), metavar="DIR", help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="recipe seed (batches, augmentation)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="subjects held in memory")
    parser.add_argument(
        "--replace-every", type=int, default=defaults.replace_every, help="steps between new subjects"
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
        help="copy the packaged model into DIR (engines/model/default replaces the embedded default)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = TrainingRecipe(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
        replace_every=args.replace_every,
    )
    weights = train(args.out, recipe, threads=args.threads, stop_after=args.stop_after)
    if weights is None:
        return 0
    logger.info("weights written to %s", weights)
    if args.no_package:
        return 0
    manifest = package(args.out, threads=args.threads)
    logger.info("manifest written: %s, slab %s", manifest.label, manifest.slab)
    if args.ship:
        shipped = ship(args.out, args.ship)
        logger.info("shipped %s to %s", shipped.label, args.ship)
    return 0
