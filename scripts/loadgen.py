"""A closed-loop load for the benchmarks and the fault tests: one client putting new blocks
and reading back earlier ones, verified byte for byte, with its figures kept per phase.

Used in-process (``Load``, by tests/integration/test_faults.py) and as a client process
(``python scripts/loadgen.py worker ...``, by scripts/bench_load.py and
scripts/bench_faults.py), which takes its commands on stdin, one a line:
``start EPOCH`` (run from that wall-clock time), ``phase NAME RETRY_S`` (later calls count
under NAME; a retryable refusal is retried RETRY_S seconds and then counts as latency),
``verify NAME [STEP]`` (read back every block put in that phase, or every STEP-th;
prints the lost count) and
``stop`` (prints every phase's figures as one JSON line and exits).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients.client import AsyncPoolClient  # noqa: E402
from kvpool.config import ClientConfig  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from kvpool.errors import KVPoolError  # noqa: E402
from kvpool.wire import RpcClient  # noqa: E402

KiB = 1 << 10
BLOCK = 256 * KiB
RING = 64  # registered value buffers, re-stamped per put


def block_of(seed: int, i: int, size: int, noise: bool = False) -> np.ndarray:
    """Block ``i`` of load ``seed``: unique leading bytes over a cheap pattern (which the
    cold tiers compress to almost nothing) or, with ``noise``, over random bytes (which
    they cannot compress, as with real KV data)."""
    if noise:
        data = np.random.default_rng([seed, i]).integers(0, 256, size, np.uint8)
    else:
        data = np.full(size, (seed * 31 + i) % 251, np.uint8)
    data[:16] = np.frombuffer(np.array([seed, i], np.uint64).tobytes(), np.uint8)
    return data


@dataclass(slots=True)
class Phase:
    """What one load saw during one phase (the load alone, or one fault)."""

    calls: int = 0
    put_ms: list[float] = field(default_factory=list)
    get_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # by error code
    messages: dict[str, str] = field(default_factory=dict)  # the first message of each code
    untyped: list[str] = field(default_factory=list)  # any exception not a KVPoolError
    wrong: int = 0  # gets whose bytes differ from what was put
    misses: int = 0
    missed: dict[str, int] = field(default_factory=dict)  # why, by error code ("miss": none)
    longest_s: float = 0.0  # the longest call, retries and failures included
    last_error_at: float = 0.0  # wall clock
    stored: list[int] = field(default_factory=list)  # block numbers committed in the phase


@dataclass
class Load:
    """One client's closed loop: put ``batch`` new blocks (``replicas`` copies each), then
    read ``batch`` of its earlier blocks; ``pause_s`` between rounds."""

    client: AsyncPoolClient
    seed: int = 0
    block: int = BLOCK
    batch: int = 1
    replicas: int = 1
    pause_s: float = 0.0
    retry_s: float = 0.0
    noise: bool = False  # incompressible blocks
    phase: str = "load"
    phases: dict[str, Phase] = field(default_factory=dict)
    salt: bytes = field(default_factory=lambda: os.urandom(8))
    unreadable: dict[str, int] = field(default_factory=dict)  # the last verify's, by error code
    why: dict[int, str] = field(default_factory=dict)  # the last verify's lost blocks: why
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _count: int = 0

    def __post_init__(self) -> None:
        self._values = [np.empty(self.block, np.uint8) for _ in range(max(RING, self.batch))]
        self._outs = [np.empty(self.block, np.uint8) for _ in range(self.batch)]
        for buf in self._values + self._outs:
            self.client.register(buf)
        self._rng = np.random.default_rng(self.seed)

    def key(self, i: int) -> bytes:
        return hashlib.blake2b(self.salt + i.to_bytes(8, "little"), digest_size=16).digest()

    @property
    def now(self) -> Phase:
        return self.phases.setdefault(self.phase, Phase())

    def stored(self) -> list[int]:
        return [i for p in self.phases.values() for i in p.stored]

    def stop(self) -> None:
        self._stop.set()

    async def _call(self, op, latencies: list[float]):  # type: ignore[no-untyped-def]
        phase, start = self.now, time.perf_counter()
        phase.calls += 1
        try:
            while True:
                try:
                    res = await op()
                    latencies.append((time.perf_counter() - start) * 1000)
                    return res
                except KVPoolError as exc:
                    if not exc.retryable or time.perf_counter() - start > self.retry_s:
                        raise
                    await asyncio.sleep(0.005)
        except KVPoolError as exc:
            phase.errors[exc.code] = phase.errors.get(exc.code, 0) + 1
            phase.messages.setdefault(exc.code, str(exc)[:300])
            phase.last_error_at = time.time()
        except Exception as exc:  # noqa: BLE001 - anything untyped is reported as such
            phase.untyped.append(repr(exc))
            phase.last_error_at = time.time()
        finally:
            phase.longest_s = max(phase.longest_s, time.perf_counter() - start)
        return None

    async def run(self, until: float = float("inf")) -> None:
        """The loop, until ``stop`` or the wall-clock time ``until``."""
        while not self._stop.is_set() and time.time() < until:
            first = self._count
            ids = list(range(first, first + self.batch))
            values = [self._values[i % len(self._values)] for i in ids]
            for i, v in zip(ids, values):
                v[:] = block_of(self.seed, i, self.block, self.noise)
            phase = self.now
            put = await self._call(lambda: self.client.batch_put(
                [self.key(i) for i in ids], values, replicas=self.replicas), phase.put_ms)
            self._count += self.batch
            if put is not None:
                phase.stored.extend(ids)
            done = self.stored()
            if done:
                pick = [done[int(j)] for j in self._rng.integers(0, len(done), self.batch)]
                got = await self._call(lambda: self.client.batch_get(
                    [self.key(i) for i in pick], self._outs), phase.get_ms)
                for i, out, r in zip(pick, self._outs, got or []):
                    if not r.hit:
                        phase.misses += 1
                        why = r.error.code if r.error is not None else "miss"
                        phase.missed[why] = phase.missed.get(why, 0) + 1
                    elif not np.array_equal(out, block_of(self.seed, i, self.block, self.noise)):
                        phase.wrong += 1
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    async def verify(self, ids: list[int] | None = None, rechecks: int = 3) -> tuple[list[int], int]:
        """Read back blocks (every one stored, by default), a few at a time: the ones
        still missing after ``rechecks`` more tries a second apart, and how many came back
        with wrong bytes. A block the pool still holds but cannot serve now (a typed,
        retryable error in its result: no room to promote it, its node gone mid-read) is
        not lost: it is counted in ``unreadable`` (the last try's, by error code) and left
        out of the lost ones. What was lost, and why, goes to ``why``."""
        missing, wrong = self.stored() if ids is None else ids, 0
        self.unreadable, self.why = {}, {}
        for attempt in range(rechecks + 1):
            if attempt:
                await asyncio.sleep(1.0)
            lost, unreadable, why = [], {}, {}
            for start in range(0, len(missing), 8):
                chunk = missing[start:start + 8]
                outs = [np.empty(self.block, np.uint8) for _ in chunk]
                got = await self.client.batch_get([self.key(i) for i in chunk], outs)
                for i, out, r in zip(chunk, outs, got):
                    if r.hit and np.array_equal(out, block_of(self.seed, i, self.block, self.noise)):
                        continue
                    if r.hit:
                        wrong += 1
                    elif r.error is not None and r.error.retryable:
                        unreadable[r.error.code] = unreadable.get(r.error.code, 0) + 1
                        lost.append(i)
                    else:
                        why[i] = r.error.code if r.error is not None else "miss"
                        lost.append(i)
            missing = lost
            self.unreadable, self.why = unreadable, why
            if not missing:
                break
        return [i for i in missing if i in self.why], wrong

def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2),
            "max": round(float(arr.max()), 2), "n": len(values)}


class Workers:
    """Client processes running ``worker``, driven from the benchmark's side."""

    def __init__(self, target: list[str], n: int, batch: int = 1, replicas: int = 1,
                 first_seed: int = 0) -> None:
        self.procs = [self.spawn(target, first_seed + i, batch, replicas) for i in range(n)]
        for p in self.procs:
            self.ready(p)

    @staticmethod
    def spawn(target: list[str], seed: int, batch: int = 1, replicas: int = 1) -> subprocess.Popen:
        """``target``: ["--master", URL] or ["--etcd", ENDPOINTS, "--cluster", NAME]."""
        return subprocess.Popen([sys.executable, __file__, "worker", *target, "--seed", str(seed),
                                 "--batch", str(batch), "--replicas", str(replicas)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)

    @staticmethod
    def ready(p: subprocess.Popen) -> None:
        if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise SystemExit(f"a client process failed to start (exit code {p.wait()})")

    @staticmethod
    def send(p: subprocess.Popen, line: str) -> None:
        p.stdin.write(line + "\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]

    def broadcast(self, line: str) -> None:
        for p in self.procs:
            self.send(p, line)

    def start(self, delay_s: float = 0.2) -> float:
        at = time.time() + delay_s
        self.broadcast(f"start {at}")
        return at

    def verify(self, phase: str, step: int = 1) -> tuple[int, int, dict[str, int]]:
        """Every client reads back the blocks it put in ``phase`` (every ``step``-th):
        (lost, checked, the ones held but unreadable now by error code)."""
        self.broadcast(f"verify {phase} {step}")
        lost = checked = 0
        unreadable: dict[str, int] = {}
        for p in self.procs:
            res = json.loads(p.stdout.readline())  # type: ignore[union-attr]
            lost, checked = lost + res["lost"], checked + res["checked"]
            for code, n in res["unreadable"].items():
                unreadable[code] = unreadable.get(code, 0) + n
        return lost, checked, unreadable

    def stop(self, timeout_s: float = 120.0) -> list[dict]:
        """Each client's figures, per phase."""
        self.broadcast("stop")
        results = []
        for p in self.procs:
            stdout, _ = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise SystemExit(f"a client process failed with exit code {p.returncode}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        return results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def merge(results: list[dict], phase: str) -> dict:
    """Every client's figures of one phase, together."""
    parts = [r[phase] for r in results if phase in r]
    errors: dict[str, int] = {}
    missed: dict[str, int] = {}
    messages: dict[str, str] = {}
    for part in parts:
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
        for code, n in part["missed"].items():
            missed[code] = missed.get(code, 0) + n
        for code, text in part["messages"].items():
            messages.setdefault(code, text)
    return {"calls": sum(p["calls"] for p in parts),
            "put_ms": pct([x for p in parts for x in p["put_ms"]]),
            "get_ms": pct([x for p in parts for x in p["get_ms"]]),
            "errors": errors, "messages": messages, "missed": missed,
            "untyped": [u for p in parts for u in p["untyped"]],
            "wrong": sum(p["wrong"] for p in parts), "misses": sum(p["misses"] for p in parts),
            "stored": sum(len(p["stored"]) for p in parts),
            "longest_s": max((p["longest_s"] for p in parts), default=0.0),
            "last_error_at": max((p["last_error_at"] for p in parts), default=0.0)}


async def worker(cfg: ClientConfig, seed: int, batch: int, replicas: int) -> dict:
    """A client process driven by commands on stdin (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[list[str]] = asyncio.Queue()

    def read() -> None:  # a daemon thread: a blocked read never holds up the exit
        with suppress(RuntimeError):  # the loop closed: the worker is done
            for text in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, text.split())
            loop.call_soon_threadsafe(lines.put_nowait, [])

    threading.Thread(target=read, daemon=True).start()
    loop.add_signal_handler(signal.SIGTERM, lambda: lines.put_nowait(["stop"]))
    async with AsyncPoolClient(cfg) as client:
        load = Load(client, seed=seed, batch=batch, replicas=replicas)
        for _ in range(60):  # as an engine does when it starts: not a call of the load
            try:
                await client.connect()
                break
            except KVPoolError as exc:
                if not exc.retryable:
                    raise
                await asyncio.sleep(1.0)
        print("ready", flush=True)
        task: asyncio.Task | None = None
        while True:
            line = await lines.get()
            if not line or line[0] == "stop":
                break
            if line[0] == "start":
                start = float(line[1])
                await asyncio.sleep(max(0.0, start - time.time()))
                task = asyncio.create_task(load.run())
            elif line[0] == "phase":
                load.phase, load.retry_s = line[1], float(line[2])
            elif line[0] == "verify":
                phase = load.phases.get(line[1], Phase())
                ids = phase.stored[::int(line[2]) if len(line) > 2 else 1]
                lost, wrong = await load.verify(ids)
                phase.wrong += wrong
                for i in lost:  # for tracing them through the master's and daemons' logs
                    print(f"loadgen seed {seed}: block {i} ({load.key(i).hex()}) of phase "
                          f"{line[1]} lost: {load.why[i]}", file=sys.stderr, flush=True)
                print(json.dumps({"lost": len(lost), "checked": len(ids),
                                  "unreadable": load.unreadable}), flush=True)
        load.stop()
        if task is not None:
            await task
    return {name: asdict(p) for name, p in load.phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("--master", default="")
    parser.add_argument("--etcd", default="")
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=20.0)
    args = parser.parse_args()
    cfg = (ClientConfig(master_url=args.master, timeout_s=args.timeout_s) if args.master else
           ClientConfig(etcd=args.etcd, cluster=args.cluster, timeout_s=args.timeout_s))
    print(json.dumps(run_loop(worker(cfg, args.seed, args.batch, args.replicas))), flush=True)


def check_pool(master: str) -> tuple[bool, str]:
    """The master's ``check`` (index against every daemon's inventory): passed, and why not."""
    async def call() -> tuple[bool, str]:
        rpc = RpcClient(master, timeout_s=60)
        try:
            await rpc.call("check")
            return True, "ok"
        except KVPoolError as exc:
            return False, str(exc)
        finally:
            await rpc.close()
    return run_loop(call())


if __name__ == "__main__":
    main()
