"""The status page as one part of the agent: the board, the preview renderer and the HTTP server, started and
stopped together, fed with what the agent publishes.

:class:`~agent.service.AgentService` builds one when ``status_page.listen`` is set, starts it after the
publisher (so the page never shows a pipeline that cannot publish) and stops it first. Its :meth:`feed` is
called with every publication on the thread that hands it to the publisher; it only updates the board and
offers finished volumes to the preview thread, and it never raises into that thread.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from agent.ingest.pixel_reader import read_pixels
from agent.ops.config import StatusPageConfig
from agent.ops.metrics import AgentMetrics
from agent.records import Publication, SctVolume
from agent.status_page.board import EngineLine, StatusBoard
from agent.status_page.http_server import StatusPageServer
from agent.status_page.preview import PreviewRenderer
from agent.status_page.routes import page_route
from agent.validation.protocols import SequenceProtocol

logger = logging.getLogger(__name__)


class StatusPage:
    def __init__(
        self,
        config: StatusPageConfig,
        protocols: Iterable[SequenceProtocol],
        model_protocols: Collection[str],
        metrics: AgentMetrics,
    ) -> None:
        self.board = StatusBoard(protocols, model_protocols, history_hours=config.history_hours)
        self.previews = PreviewRenderer(read_pixels, self.board.preview_ready)
        self._server = StatusPageServer(config, page_route(self.board, self.previews), metrics)
        self._failures = 0

    def start(self) -> None:
        self.previews.start()
        self._server.start()

    def stop(self) -> None:
        self.board.close()
        self._server.stop()
        self.previews.stop()

    @property
    def url(self) -> str:
        return self._server.url

    def set_engine(self, engine: EngineLine) -> None:
        self.board.set_engine(engine)

    def set_receive(self, address: str) -> None:
        self.board.set_receive(address)

    def set_subscribers(self, count: int) -> None:
        self.board.set_subscribers(count)

    def feed(self, item: Publication) -> None:
        """What the agent publishes (any stage thread); a fault here costs the page, never the pipeline."""
        try:
            self.board.feed(item)
            if isinstance(item, SctVolume) and not item.republished:
                self.previews.offer(item)
        except Exception:
            self._failures += 1
            if self._failures == 1 or self._failures % 1000 == 0:
                logger.exception("status page: a publication not shown (%d so far)", self._failures)
