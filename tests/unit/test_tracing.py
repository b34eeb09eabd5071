"""Request ids: W3C traceparent parsing, the id on events and log lines while a request's
work runs, and the bounded ring of spans."""

from __future__ import annotations

import io
import json
import logging

import pytest

from kvpool import logs, tracing
from kvpool.errors import BadRequest, ConfigError
from kvpool.kv_events import EventHub, Reason
from kvpool.tiers.base import TierKind

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_traceparent_gives_its_trace_id_and_bad_ones_start_no_trace() -> None:
    assert tracing.from_traceparent(f"00-{TRACE}-00f067aa0ba902b7-01") == TRACE
    assert tracing.from_traceparent(f"00-{'0' * 32}-00f067aa0ba902b7-01") is None  # invalid id
    assert tracing.from_traceparent("garbage") is None
    assert tracing.from_traceparent(None) is None
    assert tracing.traceparent(TRACE).split("-")[1] == TRACE


def test_request_ids_are_checked() -> None:
    assert tracing.checked("req-42") == "req-42"
    for bad in ("", "has space", "x" * 129, 7):
        with pytest.raises(BadRequest, match="not a request id"):
            tracing.checked(bad)


def test_a_call_body_gives_up_its_trace_and_a_malformed_one_is_dropped() -> None:
    body = {"keys": [], "trace": ["req-1", "engine-prefill"]}
    assert tracing.from_wire(body) == ("req-1", "engine-prefill") and "trace" not in body
    assert tracing.from_wire({"trace": "req-1"}) == (None, "")
    assert tracing.from_wire({"trace": ["a b", "x"]}) == (None, "")


def test_events_and_log_lines_name_the_request_whose_work_runs() -> None:
    hub = EventHub()
    with tracing.use("req-7"):
        inside = hub.stored([b"k" * 16], "node0", TierKind.HOST, Reason.PUT)
    outside = hub.removed([b"k" * 16], "node0", TierKind.HOST, Reason.EVICTED)
    assert inside.to_json()["request_id"] == "req-7" and "request_id" not in outside.to_json()

    out = io.StringIO()
    handler = logs.handler("json", out)
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, logging.INFO
    try:
        with tracing.use("req-7"):
            tracing.note("commit from %s", "engine-prefill")
        tracing.note("not logged: no request")
        logging.getLogger("x").warning("plain")
    finally:
        root.removeHandler(handler)
        root.level = level
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["request_id"] == "req-7" and lines[0]["logger"] == "kvpool.requests"
    assert lines[0]["message"] == "commit from engine-prefill"
    assert len(lines) == 2 and "request_id" not in lines[1]


def test_the_span_ring_is_bounded_by_requests_and_spans() -> None:
    ring = tracing.SpanRing("master", requests=2, per_request=3)
    for rid in ("a", "b", "c"):
        for i in range(5):
            ring.add("get", 1.0 + i, 0.001, request_id=rid)
    assert ring.get("a") == [] and len(ring.get("c")) == 3  # the oldest request went first
    ring.add("get", 0.0, 0.0)  # no request: nothing kept
    with tracing.use("c"), pytest.raises(KeyError):
        with ring.timed("reserve"):
            raise KeyError("x")
    assert len(ring.get("c")) == 3  # full: the extra span is not kept
    with pytest.raises(ConfigError, match="yaml"):
        logs.handler("yaml")
