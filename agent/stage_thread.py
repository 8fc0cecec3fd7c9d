"""One pipeline stage: a thread that takes items from its own bounded inbox and hands them to a handler.

Bounded inboxes are the pipeline's back-pressure (docs/architecture.md): a slow engine fills the streamer's
outbox, the streamer then blocks, and so on up to the watcher, instead of memory growing with the backlog.
Items already waiting in an inbox are handled in one batch, so a burst (the start-up scan of a full folder)
costs one update per acquisition rather than one per file. A handler's exception is logged and counted; it
never ends the stage, because one bad series must not stop the agent for the next patient. The error hook is
told which acquisition the item in hand belonged to (its ``acquisition_id``), when the stage knows: the item
of a one-item batch, or the item :func:`each` was handing on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.vocabulary import LogEvent

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The item a stage thread is handling, for the error hook (each stage thread sets its own).
_in_hand = threading.local()

#: Most items handled in one batch: bounds the latency a burst adds to the first item of the next burst.
MAX_BATCH = 256
#: How often a blocked ``put`` and an idle stage look at the stop flag (s).
POLL_S = 0.05


def each(handle_one: Callable[[T], None]) -> Callable[[list[T]], None]:
    """A batch handler that hands the items on one at a time, in order."""

    def handle(items: list[T]) -> None:
        for item in items:
            _in_hand.item = item
            handle_one(item)

    return handle


class Stage(Generic[T]):
    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        *,
        depth: int,
        idle: Callable[[], None] | None = None,
        on_error: Callable[[str, BaseException, str | None], None] | None = None,
        batch: bool = True,
    ) -> None:
        self.name = name
        self.inbox: queue.Queue[T] = queue.Queue(maxsize=depth)
        self._handle = handle
        self._idle = idle
        self._on_error = on_error
        self._batch = batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sct-{name}", daemon=True)
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def put(self, item: T) -> bool:
        """Queue an item, waiting while the inbox is full; False if the stage stopped meanwhile."""
        while not self._stop.is_set():
            try:
                self.inbox.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def offer(self, item: T) -> bool:
        """Queue an item only if the inbox has room now; False if it is full or the stage stopped. For a
        producer that must not be held back by this stage (the C-STORE stage behind the engine)."""
        if self._stop.is_set():
            return False
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            return False
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Finish the item in hand, leave the rest, and join (callers stop stages upstream first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.inbox.get(timeout=POLL_S)
            except queue.Empty:
                self._call_idle()
                continue
            items = [first]
            while self._batch and len(items) < MAX_BATCH:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            self.busy = True
            _in_hand.item = first if len(items) == 1 else None
            try:
                self._handle(items)
            except Exception as error:
                self._report(error, getattr(_in_hand, "item", None))
            finally:
                self.busy = False
                _in_hand.item = None
            self._call_idle()

    def _call_idle(self) -> None:
        if self._idle is None:
            return
        try:
            self._idle()
        except Exception as error:
            self._report(error, None)

    def _report(self, error: BaseException, item: object) -> None:
        acquisition_id = getattr(item, "acquisition_id", None)
        acquisition_id = acquisition_id if isinstance(acquisition_id, str) else None
        logger.exception(
            "stage %s: %s",
            self.name,
            error,
            extra={"event": LogEvent.STAGE_ERROR, "stage": self.name, "acquisition_id": acquisition_id},
        )
        if self._on_error is not None:
            self._on_error(self.name, error, acquisition_id)
