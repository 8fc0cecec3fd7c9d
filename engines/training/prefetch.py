"""Training subjects generated in worker processes ahead of need, so the optimiser (a GPU above all) is fed.

A phantom subject takes 10-15 s to generate on two cores; one optimiser step takes 7 ms on an H200. The trainer's
:class:`~engines.training.cases.CasePool` therefore asks a :class:`SubjectPrefetcher` for the subjects it will
need next while it trains on the current ones. Each subject is the same pure function of (recipe, seed) wherever
it is computed, so the pool at any step, resumption and the fp32 bit-identity of a resumed run do not depend on
the number of workers.

Workers are started with ``forkserver``: forking the training process itself after torch has started its
threads is unsafe. Each worker is single-threaded (:mod:`engines.training.worker_threads`).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType

from engines.model.normalisation import Normalisation
from engines.training.cases import PreparedCase, prepare_case
from engines.training.recipe import TrainingRecipe
from engines.training.worker_threads import single_threaded
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

START_METHOD = "forkserver"
#: Subjects kept in preparation beyond the current pool, per worker: one being generated, one ready.
LOOKAHEAD_PER_WORKER = 2


class SubjectGenerationError(SctError, RuntimeError):
    """A worker process died while generating a training subject (the OOM killer, a crash)."""


class SubjectPrefetcher:
    """A pool of worker processes preparing training subjects by seed; a context manager that stops them."""

    def __init__(self, recipe: TrainingRecipe, normalisation: Normalisation, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"subject workers: found {workers}, expected >= 1")
        self._recipe = recipe
        self._normalisation = normalisation
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(START_METHOD),
            initializer=single_threaded,
        )
        self._futures: dict[int, Future[PreparedCase]] = {}

    @property
    def lookahead(self) -> int:
        return LOOKAHEAD_PER_WORKER * self.workers

    def request(self, seeds: list[int]) -> None:
        for seed in seeds:
            if seed not in self._futures:
                self._futures[seed] = self._executor.submit(
                    prepare_case, self._recipe, seed, self._normalisation, render_threads=1
                )

    def take(self, seed: int) -> PreparedCase:
        self.request([seed])
        future = self._futures.pop(seed)
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise SubjectGenerationError(
                f"a subject worker process died while generating training subject {seed} ({exc})",
                attribute="subject worker",
                found="process ended",
                expected="a prepared subject",
            ) from exc

    def close(self) -> None:
        """Stop the workers; subjects still queued are dropped (a resumed run prepares them again)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SubjectPrefetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
