"""Request tracing: a request's id travels with every pool call made for it, so the
master's and daemons' logs, the KV events it caused and ``kvpool trace REQUEST_ID``
can all name it.

The id is the engine's (or router's) request id, or the trace id of a W3C
``traceparent`` header. It lives in a context variable while a request's pool calls run
(``use``); the pool client sends it in each RPC body as ``trace``, and the master and
daemon set it again around the call they serve. Servers keep the spans of recent
requests in a bounded ring (``SpanRing``), and export them through OpenTelemetry only
when its SDK is installed and ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from kvpool.errors import BadRequest

log = logging.getLogger(__name__)
MAX_ID = 128
_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvpool_request", default=None)


def current() -> str | None:
    """The id of the request whose work runs now, if one was given."""
    return _current.get()


@contextlib.contextmanager
def use(request_id: str | None) -> Iterator[None]:
    """Run the enclosed pool calls as ``request_id``'s (None: as nobody's)."""
    token = _current.set(request_id)
    try:
        yield
    finally:
        _current.reset(token)


def checked(raw: Any, where: str = "request_id") -> str:
    """A request id as given: printable, no spaces, at most 128 characters."""
    if not isinstance(raw, str) or not _ID.match(raw):
        raise BadRequest(f"{where} {str(raw)[:40]!r} is not a request id: give 1-{MAX_ID} "
                         "letters, digits or ._:@/+=-")
    return raw


def from_traceparent(header: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (None when absent or malformed: a bad
    header from a client does not fail its request, it just starts no trace)."""
    if not header:
        return None
    m = _TRACEPARENT.match(header.strip().lower())
    if m is None or m.group(1) == "0" * 32:
        return None
    return m.group(1)


def traceparent(request_id: str) -> str:
    """A ``traceparent`` that carries ``request_id`` when it is a 32-hex trace id."""
    trace = request_id if re.fullmatch(r"[0-9a-f]{32}", request_id) else os.urandom(16).hex()
    return f"00-{trace}-{os.urandom(8).hex()}-01"


def from_wire(body: dict[str, Any]) -> tuple[str | None, str]:
    """Take a call's ``trace`` field, ``[request id, caller's name]``, out of its body (a
    malformed one is dropped, not an error: tracing never fails a call)."""
    raw = body.pop("trace", None)
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and isinstance(raw[0], str) \
            and _ID.match(raw[0]):
        return raw[0], str(raw[1])[:MAX_ID]
    return None, ""


# One line per pool call made for a request, on its own logger, so an operator can keep
# or silence them apart from the rest (logging.getLogger("kvpool.requests").setLevel(...)).
requests_log = logging.getLogger("kvpool.requests")


def note(msg: str, *args: Any) -> None:
    """Log a line about the current request's work, only when it has an id."""
    if _current.get() is not None:
        requests_log.info(msg, *args)


# -- spans ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Span:
    """One timed step of a request, as ``kvpool trace`` shows it."""

    request_id: str
    where: str  # the process: "router", "master", a daemon's node id
    name: str  # what ran: "route", "prefill", "reserve", "get", ...
    start: float  # wall clock, seconds
    duration_ms: float
    by: str = ""  # who asked (a pool client's name)
    detail: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SpanRing:
    """The spans of the most recent requests: at most ``requests`` ids (the oldest id goes
    first) and ``per_request`` spans each."""

    def __init__(self, where: str, requests: int = 4096, per_request: int = 256) -> None:
        self.where = where
        self.requests, self.per_request = requests, per_request
        self._spans: OrderedDict[str, list[Span]] = OrderedDict()
        self._export = _otel_exporter(where)

    def add(self, name: str, start: float, duration_s: float, *, request_id: str | None = None,
            by: str = "", detail: str = "", error: str = "") -> None:
        rid = request_id or _current.get()
        if rid is None:
            return
        span = Span(rid, self.where, name, start, round(duration_s * 1e3, 3), by, detail, error)
        spans = self._spans.get(rid)
        if spans is None:
            spans = self._spans[rid] = []
            while len(self._spans) > self.requests:
                self._spans.popitem(last=False)
        if len(spans) < self.per_request:
            spans.append(span)
        if self._export is not None:
            self._export(span)

    def get(self, request_id: str) -> list[Span]:
        return list(self._spans.get(request_id, ()))

    @contextlib.contextmanager
    def timed(self, name: str, *, request_id: str | None = None, by: str = "",
              detail: str = "") -> Iterator[None]:
        start, t0 = time.time(), time.perf_counter()
        error = ""
        try:
            yield
        except BaseException as exc:
            error = getattr(exc, "code", type(exc).__name__)
            raise
        finally:
            self.add(name, start, time.perf_counter() - t0, request_id=request_id, by=by,
                     detail=detail, error=error)


def _otel_exporter(where: str) -> Any:
    """Export spans through OpenTelemetry (OTLP over HTTP) when the endpoint is configured
    and the SDK and exporter are installed; else None. Untested here: not a dependency."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    try:
        from opentelemetry import trace  # type: ignore[import-not-found]
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter)
        from opentelemetry.sdk.resources import Resource  # type: ignore[import-not-found]
        from opentelemetry.sdk.trace import TracerProvider  # type: ignore[import-not-found]
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # type: ignore[import-not-found]
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk and "
                    "opentelemetry-exporter-otlp-proto-http are not installed; spans stay in "
                    "kvpool's own ring (kvpool trace)")
        return None
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # none configured yet
        provider = TracerProvider(resource=Resource.create({"service.name": f"kvpool-{where}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("kvpool")

    def export(span: Span) -> None:
        start = int(span.start * 1e9)
        otel = tracer.start_span(f"{span.where}.{span.name}", start_time=start, attributes={
            "kvpool.request_id": span.request_id, "kvpool.by": span.by,
            "kvpool.detail": span.detail, "kvpool.error": span.error})
        otel.end(end_time=start + int(span.duration_ms * 1e6))

    return export
