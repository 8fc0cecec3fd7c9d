"""How the agent's log lines look: plain text for a terminal, one JSON object per line for log shippers.

No log line carries a patient name, ID or birth date: none of the records passed between stages holds one, and
acquisitions are named by an opaque digest of their UIDs.
"""

from __future__ import annotations

import json
import logging
import sys

from agent.ops.config import AgentConfig


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; the message never holds patient identifiers (none of the
    records passed between stages carries any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(config: AgentConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.logging.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.logging.level)
