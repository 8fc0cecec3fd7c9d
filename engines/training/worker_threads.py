"""Single-threaded numerical libraries in a subject worker process, set before they are first imported.

Imports nothing numerical itself: it runs as the worker's initializer, before the first work item imports numpy
and its BLAS, which read these variables once when they load. Every worker is one thread because the workers
are the parallelism: sixteen workers each starting a BLAS pool of sixteen threads would oversubscribe the CPU.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded() -> None:
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
