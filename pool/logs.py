"""Log records as JSON lines (orjson, for journald) or human-readable text.

Structured fields ride on ``extra=``: worker, controller, key, partition, attempt,
duration_ms. The hot path logs nothing at info level; errors, retries, parking,
acquisitions and connection changes are logged. Keys, errors and names from outside reach
these lines, so control, C1 and bidi characters are written as visible escapes
(``pool.text``): a key can't forge a line, repaint a terminal or reorder what a reader sees.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

from .text import escape, json_safe

FIELDS = ("worker", "controller", "key", "partition", "attempt", "duration_ms", "node")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for f in FIELDS:
            v = record.__dict__.get(f)
            if v is not None:
                out[f] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json_safe(orjson.dumps(out, default=str).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{f}={escape(record.__dict__[f])}" for f in FIELDS if record.__dict__.get(f) is not None)
        line = (f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: "
                f"{escape(record.getMessage())}")
        if extras:
            line += f"  [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(fmt: str = "json", level: str = "info") -> None:
    """Send every ctlpool log line to stdout in ``fmt`` at ``level``; pika's chatter stays at warning."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika logs expected events (a passive declare's 404, a refused connect we retry) as
    # warnings and errors, several lines each; ctlpool logs what matters in one line
    logging.getLogger("pika").setLevel(logging.CRITICAL if level != "debug" else logging.INFO)
    if os.environ.get("CTLPOOL_PIKA_DEBUG"):
        logging.getLogger("pika").setLevel(logging.DEBUG)
