"""A request traced end to end through the reference engines: the id of its W3C
``traceparent`` travels router -> prefill -> pool puts -> decode gets; the master's and
the daemon's JSON log lines name it, so do the KV events its puts caused, and
`kvpool trace ID --router URL` shows each step with its time."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import urllib.request

import pytest

from tests.e2e.conftest import ROOT, Stack, spawn
from tests.integration.conftest import admin


@pytest.fixture(scope="module")
def traced(stack: Stack) -> Stack:
    proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(stack.tmp / "pool")],
                       stack.tmp / "pool.log", {"KVPOOL_LOG_FORMAT": "json"})
    stack.procs["pool"], stack.master = proc, info["master"]
    prefill, decode = stack.engine("prefill", "prefill"), stack.engine("decode", "decode")
    stack.engine("router", "router", "--prefill", prefill, "--decode", decode)
    return stack


def test_a_traceparent_follows_the_request_through_the_pool(traced: Stack) -> None:
    trace_id = os.urandom(16).hex()
    rng = random.Random(3)
    prompt = [rng.randrange(256) for _ in range(3 * 16 + 5)]
    req = urllib.request.Request(traced.urls["router"] + "/v1/generate", method="POST",
                                 data=json.dumps({"token_ids": prompt, "max_tokens": 4}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["X-Request-Id"] == trace_id
        done = [json.loads(raw) for raw in resp][-1]
    assert done.get("done") and done["request_id"] == trace_id, done

    out = subprocess.run([sys.executable, "-m", "kvpool", "trace", trace_id, "--master",
                          traced.master, "--router", traced.urls["router"], "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    spans = json.loads(out.stdout)
    steps = [(s["where"], s["name"], s["by"]) for s in spans]
    assert ("router", "route", "") in steps and ("router", "prefill", "") in steps
    assert ("router", "decode", "") in steps
    puts = [s for s in spans if s["where"] == "master" and s["name"] in ("reserve", "commit")]
    gets = [s for s in spans if s["where"] == "master" and s["name"] == "get"]
    assert puts and all(s["by"] == "engine-prefill" for s in puts), steps
    assert gets and all(s["by"] == "engine-decode" for s in gets), steps
    # in order: routed, then the prefill's puts, then the decode's gets, inside the route
    route = next(s for s in spans if s["name"] == "route")
    assert route["start"] <= min(s["start"] for s in puts) <= max(s["start"] for s in puts) \
        <= min(s["start"] for s in gets)
    assert max(s["start"] for s in gets) <= route["start"] + route["duration_ms"] / 1e3

    table = subprocess.run([sys.executable, "-m", "kvpool", "trace", trace_id, "--master",
                            traced.master, "--router", traced.urls["router"]],
                           cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "engine-prefill" in table and "commit" in table and "decode" in table, table

    # the events its puts caused name it
    stats = admin(traced.master, "/v1/stats?recent=100")[1]
    stored = [e for e in stats["events"]["recent"] if e["type"] == "BlockStored"
              and e.get("request_id") == trace_id]
    assert len({k for e in stored for k in e["block_hashes"]}) >= 3, stats["events"]["recent"][-5:]

    # the master's and the daemon's log lines (one JSON object a line) name it
    lines = [json.loads(raw) for raw in (traced.tmp / "pool.log").read_text().splitlines()
             if raw.startswith("{")]
    mine = [r for r in lines if r.get("request_id") == trace_id]
    loggers = {r["logger"] for r in mine}
    assert "kvpool.requests" in loggers, sorted({r["logger"] for r in lines})
    assert any(r["message"].startswith("daemon adopt") for r in mine), [r["message"] for r in mine]
    assert any(r["message"].startswith("commit from engine-prefill") for r in mine)


def test_a_bad_request_id_is_refused_with_a_clear_error(traced: Stack) -> None:
    status, body = admin(traced.master, "/v1/traces/has%20space")
    assert status == 400 and "request id" in body["message"], body

