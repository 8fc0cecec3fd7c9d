"""Single-threaded numerical libraries in a subject worker process, set before they are first imported.

Imports nothing numerical itself: it runs as the worker's initializer, before the first work item imports numpy
and its BLAS, which read these variables once when they load. Every worker is one thread because the workers
are the parallelism: sixteen workers each starting a BLAS pool of sixteen threads would oversubscribe the CPU.

A worker imports the parent's main *script* before its initializer runs (``python -m`` entry points are not
imported), so a script that starts workers must not import numpy at module level; the worker says so if it did.
"""

from __future__ import annotations

import logging
import os
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded() -> None:
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    if "numpy" in sys.modules:
        logging.getLogger(__name__).warning(
            "subject worker: numpy was imported before the worker started (by the main script), so its BLAS "
            "threads are not limited to one; start workers from a module run with python -m or import numpy "
            "inside main()"
        )
