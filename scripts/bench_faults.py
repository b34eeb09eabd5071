"""Faults under load: what each one costs the clients of a running cluster, and what it loses.

Starts a cluster of real processes on this machine (a 3-member etcd, two masters, three
daemons with host arenas small enough that demotion runs throughout, SSD tiers, and one
shared object tier in a moto S3 server) and 8 client processes, each in a closed loop of
a put of a new 256 KiB block (two copies, on distinct nodes) and a verified get of one of
its earlier blocks (scripts/loadgen.py). First the load alone (p50/p99/max of put and get;
a retryable refusal is retried and counts as latency), then each fault in turn under the
same load: SIGSTOP and SIGKILL of a client, a daemon, the leader and an etcd member; a
disk that fills (one daemon's SSD on a small tmpfs, needs root); an object store that
stalls (SIGSTOP) and one that errors (killed, then back empty). Per fault: calls, errors
by type, wrong bytes (must be 0), blocks lost that had a surviving copy (must be 0), the
longest call, and the recovery time (from the fault until the last error). Then the
seconds each kind of process takes to exit on SIGTERM. Fails loudly on any untyped error,
wrong byte, lost block, failed check or unclean exit. ``--json PATH``, ``--quick``;
``--faults a,b`` runs only those faults (``none``: the load alone). The leader's
``/metrics`` after the load alone are kept in the run's folder (``metrics-after-load.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402
from loadgen import Workers, check_pool, merge  # noqa: E402
from kvpool.launcher import LocalCluster, free_port, spawn, stop  # noqa: E402

TTL = 3.0  # leader and membership leases
PUT_TIMEOUT_S = 3.0  # reservations of a vanished client are reclaimed after this
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "kvpool-bench-faults"
EXPECTED = {"no_space", "unavailable", "node_gone", "transfer_failed", "not_leader", "not_ready",
            "too_many_pending", "reservation_lost", "lease_expired", "not_found"}  # typed, and fit a fault


class Moto:
    """A moto S3 server of our own, on a fixed port so that it can come back."""

    def __init__(self, root: Path) -> None:
        self.port, self.log = free_port(), root / "moto.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT, env={**os.environ, **AWS})
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"moto did not start; see {self.log}")
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            if sig == signal.SIGTERM:
                os.kill(self.proc.pid, signal.SIGCONT)
            stop(self.proc, sig)
            self.proc = None


class Gate:
    """A TCP proxy in front of the S3 server that can refuse every connection and cut the
    open ones: the store errors, and keeps what it holds."""

    def __init__(self, target_port: int) -> None:
        self.target, self.open = target_port, True
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.open:
                conn.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._live |= {conn, up}
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(1 << 16):
                b.sendall(chunk)
        except OSError:
            pass
        for s in (a, b):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._live -= {a, b}

    def close_gate(self) -> None:
        self.open = False
        with self._lock:
            live = list(self._live)
        for s in live:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def open_gate(self) -> None:
        self.open = True


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root, self.quick = root, quick
        self.only: set[str] | None = None  # the faults to run (None: all)
        self.moto = Moto(root)
        self.gate = Gate(self.moto.port)
        self.tmpfs: Path | None = None
        self.cluster = LocalCluster(
            root, cluster="faults", ttl_s=TTL, etcd_members=3,
            master_env={"KVPOOL_MASTER_PUT_TIMEOUT_S": str(PUT_TIMEOUT_S),
                        "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2"},
            daemon_env={"KVPOOL_DAEMON_HOST_BYTES": "64MiB", "KVPOOL_DAEMON_SSD_BYTES": "2GiB",
                        "KVPOOL_DAEMON_OBJECT_BYTES": "2GiB",
                        "KVPOOL_DAEMON_OBJECT_URL": f"s3://{BUCKET}/blocks",
                        "KVPOOL_DAEMON_S3_ENDPOINT": self.gate.url, **AWS})
        self.workers: Workers | None = None
        self.phases: list[str] = []
        self.faults: list[dict] = []
        self.victims: list[subprocess.Popen] = []

    # -- the pool ------------------------------------------------------------------------

    def start(self) -> None:
        self.moto.start()
        c = self.cluster
        c.start_etcd()
        c.start_master("m0")
        c.start_master("m1")
        c.wait_leader(60)
        if os.geteuid() == 0:  # node2's SSD on a small file system of its own: it can fill
            self.tmpfs = self.root / "node2"
            self.tmpfs.mkdir(parents=True)
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600m", "tmpfs",
                               str(self.tmpfs)], capture_output=True).returncode != 0:
                self.tmpfs = None
        c.start_daemon("node0", {"KVPOOL_DAEMON_SSD_BYTES": "160MiB"})  # it demotes into S3
        for name in ("node1", "node2"):
            c.start_daemon(name)
        c.wait_nodes({"node0", "node1", "node2"}, 60)

    def leader(self) -> str:
        return self.cluster.wait_leader(60).url

    def target(self) -> list[str]:
        return ["--etcd", self.cluster.etcd_endpoint, "--cluster", self.cluster.cluster]

    def close(self) -> None:
        if self.workers is not None:
            self.workers.kill()
        for p in self.victims:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.cluster.stop()
        self.moto.stop()
        if self.tmpfs is not None:
            subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)

    # -- phases --------------------------------------------------------------------------

    def phase(self, name: str, retry_s: float = 0.0) -> None:
        assert self.workers is not None
        self.workers.broadcast(f"phase {name} {retry_s}")
        self.phases.append(name)

    def fault(self, name: str, inject: Callable[[], None], settle_s: float = 2.0) -> None:
        """Run one fault under the load, then read back every block put during it (each
        had two copies; a sample of all the others is read back at the end); the reads
        and the load meanwhile count under a phase of their own, so that they do not blur
        the fault's figures."""
        assert self.workers is not None
        if self.only is not None and name not in self.only:
            return
        print(f"  {time.strftime('%T')} {name} ...", flush=True)
        self.phase(name)
        t0 = time.time()
        inject()
        time.sleep(settle_s)
        self.phase(f"{name}.verify")
        lost, checked, unreadable = 0, 0, {}
        for ph in self.phases[-2:]:
            lo, ch, un = self.workers.verify(ph)
            lost, checked = lost + lo, checked + ch
            for code, n in un.items():
                unreadable[code] = unreadable.get(code, 0) + n
        self.faults.append({"fault": name, "t0": t0, "lost_blocks": lost, "verified": checked,
                            "unreadable": unreadable})

    def pause(self, name: str, seconds: float) -> None:
        proc = self.cluster.procs[name].popen
        proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGCONT)

    # -- the faults ----------------------------------------------------------------------

    def victim(self, seed: int) -> subprocess.Popen:
        p = Workers.spawn(self.target(), seed, replicas=2)
        Workers.ready(p)
        Workers.send(p, f"phase victim {0}")
        Workers.send(p, f"start {time.time()}")
        self.victims.append(p)
        time.sleep(1.5)  # putting
        return p

    def client_kill(self) -> None:
        self.victim(100).send_signal(signal.SIGKILL)
        time.sleep(PUT_TIMEOUT_S + 1.0)  # its reservations are reclaimed

    def client_stop(self) -> None:
        p = self.victim(101)
        p.send_signal(signal.SIGSTOP)
        time.sleep(PUT_TIMEOUT_S + 1.0)
        p.send_signal(signal.SIGCONT)
        time.sleep(1.5)  # it carries on (typed errors only); stopped at the end by SIGTERM

    def daemon_stop(self) -> None:
        self.pause("node1", TTL * 0.6)

    def daemon_kill(self) -> None:
        c = self.cluster
        c.kill("node1", signal.SIGKILL)
        c.wait_nodes({"node0", "node2"}, TTL + 10)
        c.start_daemon("node1")
        c.wait_nodes({"node0", "node1", "node2"}, 60)

    def leader_fault(self, sig: int) -> None:
        c = self.cluster
        old = c.wait_leader(60).name
        proc = c.procs[old].popen
        if sig == signal.SIGKILL:
            c.kill(old, sig)
        else:  # frozen past its lease: a standby leads; thawed, it steps down
            proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + TTL + 20
        while (lead := c.leader()) is None or lead.name == old:
            if time.monotonic() > deadline:
                raise SystemExit("no standby took over from the leader")
            time.sleep(0.05)
        if sig == signal.SIGSTOP:
            proc.send_signal(signal.SIGCONT)
        else:
            c.start_master(old)

    def etcd_kill(self) -> None:
        self.cluster.kill("etcd1", signal.SIGKILL)  # stays dead: two members keep a quorum
        time.sleep(TTL + 1.0)

    def disk_fills(self) -> None:
        """node2's file system fills while the load runs; then space comes back."""
        assert self.tmpfs is not None
        filler = self.tmpfs / "filler"
        free = shutil.disk_usage(self.tmpfs).free
        # to the last pages: the load's blocks compress to almost nothing on the SSD tier
        subprocess.run(["fallocate", "-l", str(free - (64 << 10)), str(filler)], check=True)
        subprocess.run(["fallocate", "-l", str(max(4096, shutil.disk_usage(self.tmpfs).free - 4096)),
                        str(self.tmpfs / "filler2")], capture_output=True)
        try:
            time.sleep(6.0 if self.quick else 12.0)
        finally:
            filler.unlink()
            (self.tmpfs / "filler2").unlink(missing_ok=True)

    def object_stalls(self) -> None:
        """The S3 server freezes (node0 demotes into it all along), then thaws."""
        assert self.moto.proc is not None
        self.moto.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(5.0)
        finally:
            self.moto.proc.send_signal(signal.SIGCONT)

    def object_errors(self) -> None:
        """Every connection to the S3 server is refused or cut, then it serves again."""
        self.gate.close_gate()
        try:
            time.sleep(5.0)
        finally:
            self.gate.open_gate()

    # -- the run -------------------------------------------------------------------------

    def run(self, load_s: float, only: set[str] | None = None) -> dict:
        self.start()
        self.workers = Workers(self.target(), 8, replicas=2)
        self.phase("load", retry_s=30.0)
        self.workers.start()
        print(f"  load alone, {load_s:.0f} s ...", flush=True)
        time.sleep(load_s)
        check_load = check_pool(self.leader())  # under load: exact at any moment
        with urllib.request.urlopen(f"{self.leader()}/metrics", timeout=10) as r:
            (self.root / "metrics-after-load.txt").write_bytes(r.read())
        self.only = only
        self.fault("client-SIGKILL", self.client_kill)
        self.fault("client-SIGSTOP", self.client_stop)
        self.fault("daemon-SIGSTOP", self.daemon_stop)
        self.fault("daemon-SIGKILL", self.daemon_kill)
        self.fault("leader-SIGSTOP", lambda: self.leader_fault(signal.SIGSTOP), settle_s=3.0)
        self.fault("leader-SIGKILL", lambda: self.leader_fault(signal.SIGKILL), settle_s=3.0)
        self.fault("etcd-member-SIGSTOP", lambda: self.pause("etcd2", TTL * 2))
        self.fault("etcd-member-SIGKILL", self.etcd_kill)
        if self.tmpfs is not None:
            self.fault("disk-fills", self.disk_fills, settle_s=3.0)
        self.fault("object-store-errors", self.object_errors, settle_s=3.0)
        self.fault("object-store-stalls", self.object_stalls, settle_s=3.0)
        self.phase("end")
        lost_total, checked_total, unreadable_total = 0, 0, 0
        for ph in self.phases[:-1]:  # a sample of every block put in the run, once more
            lo, ch, un = self.workers.verify(ph, step=8)
            lost_total, checked_total = lost_total + lo, checked_total + ch
            unreadable_total += sum(un.values())
        check_end = check_pool(self.leader())
        results = self.workers.stop()
        self.workers = None
        exits = self.sigterm_exits()
        load = merge(results, "load")
        out = {"load": {"clients": 8, "seconds": load_s, "put_ms": load["put_ms"],
                        "get_ms": load["get_ms"], "errors": load["errors"],
                        "wrong_bytes": load["wrong"], "misses": load["misses"],
                        "missed": load["missed"], "messages": load["messages"],
                        "check_ok": check_load[0] and check_end[0],
                        "check": f"under load: {check_load[1]}; at the end: {check_end[1]}",
                        "untyped": load["untyped"]},
               "faults": [], "sigterm_exit_s": {k: v[0] for k, v in exits.items()},
               "exit_codes": {k: v[1] for k, v in exits.items()},
               "lost_total": lost_total, "verified_total": checked_total,
               "unreadable_total": unreadable_total,
               "disk_fault": "tmpfs" if self.tmpfs is not None else "skipped: needs root to mount a tmpfs"}
        for f in self.faults:
            m = merge(results, f["fault"])
            out["faults"].append({
                "fault": f["fault"], "calls": m["calls"], "errors": m["errors"],
                "wrong_bytes": m["wrong"], "lost_blocks": f["lost_blocks"],
                "unreadable": f["unreadable"],
                "max_stall_s": round(m["longest_s"], 2),
                "recovery_s": round(max(0.0, m["last_error_at"] - f["t0"]) if m["errors"] else 0.0, 2),
                "verified": f["verified"], "untyped": m["untyped"]})
        return out

    def sigterm_exits(self) -> dict[str, tuple[float, int | None]]:
        """Seconds from SIGTERM to exit, and the exit code, of each kind of process."""
        def timed(popen: subprocess.Popen) -> tuple[float, int | None]:
            t = time.monotonic()
            popen.send_signal(signal.SIGTERM)
            try:
                popen.communicate(timeout=30)  # a client writes its figures as it exits
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
                return (30.0, None)
            return (round(time.monotonic() - t, 2), popen.returncode)

        out = {}
        live = [p for p in self.victims if p.poll() is None]
        if live:
            out["client"] = timed(live[0])
        c = self.cluster
        standby = next(p for p in c.masters() if p.name != c.wait_leader(30).name)
        out["master"] = timed(c.procs.pop(standby.name).popen)
        out["daemon"] = timed(c.procs.pop("node0").popen)
        data = self.root / "up"
        up, _ = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(data)],
                      {"KVPOOL_DAEMON_HOST_BYTES": "64MiB", "KVPOOL_DAEMON_SSD_BYTES": "0",
                       "KVPOOL_DAEMON_OBJECT_BYTES": "0"}, self.root / "up.log")
        time.sleep(1.0)  # serving (a SIGTERM within its first moments: see the report)
        out["kvpool up"] = timed(up)
        return out


def table(res: dict) -> None:
    ld = res["load"]
    rows = [["op", "calls", "p50 ms", "p99 ms", "max ms"]]
    for op in ("put", "get"):
        s = ld[f"{op}_ms"]
        rows.append([op, str(s["n"]), f"{s['p50']:.2f}", f"{s['p99']:.2f}", f"{s['max']:.1f}"])
    show(rows)
    print(f"load alone: errors {ld['errors'] or 'none'}; wrong bytes {ld['wrong_bytes']}; "
          f"misses {ld['misses']} {ld['missed'] or ''}; check {ld['check']}")
    for code, text in ld["messages"].items():
        print(f"  first {code}: {text}")
    print()
    rows = [["fault", "calls", "errors", "wrong", "lost", "unreadable", "max stall s", "recovery s"]]
    for f in res["faults"]:
        errs = ",".join(f"{k}:{v}" for k, v in sorted(f["errors"].items())) or "-"
        unread = ",".join(f"{k}:{v}" for k, v in sorted(f["unreadable"].items())) or "-"
        rows.append([f["fault"], str(f["calls"]), errs, str(f["wrong_bytes"]),
                     f"{f['lost_blocks']}/{f['verified']}", unread, f"{f['max_stall_s']:.2f}",
                     f"{f['recovery_s']:.2f}"])
    show(rows)
    print(f"\nevery block put in the run read back at the end: {res['lost_total']} lost of "
          f"{res['verified_total']} ({res['unreadable_total']} held but unreadable then); "
          f"disk fault: {res['disk_fault']}")
    print("SIGTERM to exit: " + ", ".join(
        f"{k} {v:.2f} s (exit {res['exit_codes'][k]})" for k, v in res["sigterm_exit_s"].items()))


def show(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def failures(res: dict) -> list[str]:
    bad = []
    ld = res["load"]
    if ld["errors"] or ld["wrong_bytes"] or not ld["check_ok"] or ld["untyped"] or ld["misses"]:
        bad.append(f"load alone: errors {ld['errors']}, wrong {ld['wrong_bytes']}, misses "
                   f"{ld['misses']}, check {ld['check']}, untyped {ld['untyped'][:3]}")
    for f in res["faults"]:
        unexpected = set(f["errors"]) - EXPECTED
        if f["wrong_bytes"] or f["lost_blocks"] or f["untyped"] or unexpected or not f["calls"]:
            bad.append(f"{f['fault']}: wrong {f['wrong_bytes']}, lost {f['lost_blocks']}, "
                       f"unexpected errors {sorted(unexpected)}, untyped {f['untyped'][:3]}")
    if res["lost_total"]:
        bad.append(f"{res['lost_total']} blocks with a surviving copy lost over the run")
    for k, code in res["exit_codes"].items():
        if code != 0:
            bad.append(f"{k} exited {code} on SIGTERM")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 12 s load alone, shorter faults")
    parser.add_argument("--seconds", type=float, default=30.0, help="the load alone")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--faults", help="only these faults, comma-separated (e.g. "
                        "leader-SIGKILL,disk-fills; 'none': the load alone)")
    args = parser.parse_args()
    only = None if args.faults is None else {f for f in args.faults.split(",") if f and f != "none"}
    info = machine("3 etcd members, 2 masters, 3 daemons (host 64 MiB, SSD 2 GiB, a shared moto "
                   "S3 object tier), 8 client processes, all on this one machine; NIXL UCX "
                   "over loopback")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {info['setup']}",
          flush=True)
    root = Path(tempfile.mkdtemp(prefix="kvpool-bench-faults-"))
    bench = Bench(root, args.quick)
    t = time.monotonic()
    try:
        res = bench.run(12.0 if args.quick else args.seconds, only)
    finally:
        bench.close()
    print(f"\n{time.monotonic() - t:.0f} s in all; logs in {root}\n")
    table(res)
    bad = failures(res)
    if args.json:
        for f in res["faults"]:
            f.pop("untyped")
        Path(args.json).write_text(json.dumps({**res, "quick": args.quick, "machine": info},
                                              indent=2) + "\n")
        print(f"wrote {args.json}")
    if bad:
        raise SystemExit("unexpected results:\n  " + "\n  ".join(bad))


if __name__ == "__main__":
    main()
