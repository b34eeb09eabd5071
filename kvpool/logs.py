"""Log lines for people or for machines: text by default, one JSON object a line with
``--log-format json`` (or ``KVPOOL_LOG_FORMAT=json``); either way a line written while a
request's work runs names its ``request_id`` (kvpool.tracing)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from kvpool import tracing
from kvpool.errors import ConfigError

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request)s"


class _RequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = tracing.current()
        record.request_id = rid
        record.request = f" [request {rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def handler(fmt: str | None = None, stream: Any = None) -> logging.Handler:
    """A handler writing ``fmt`` lines (default: KVPOOL_LOG_FORMAT, else text) that name
    the request whose work runs."""
    fmt = (fmt or os.environ.get("KVPOOL_LOG_FORMAT") or "text").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = logging.StreamHandler(stream)
    out.addFilter(_RequestFilter())
    out.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    return out


def setup(level: int, fmt: str | None = None) -> None:
    """Configure the root logger once per process (the CLI and the engines call it)."""
    logging.basicConfig(level=level, handlers=[handler(fmt)], force=True)
