"""NIXL transfers: one agent per process, registered regions, one-sided READ/WRITE.

The daemon registers its arenas once; a client registers its buffers once (the region
cache keeps a reference to the owning array so its memory cannot be freed and reused
while NIXL still knows it). Every wait on a transfer has a deadline. NIXL's progress
thread stays on, so peers' one-sided operations complete while this process is idle.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np

from kvpool.auth import is_loopback
from kvpool.errors import BadRequest, ConfigError, NodeGone, TransferFailed

log = logging.getLogger(__name__)
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
# The UCX bundled with the nixl wheel carries its own libibverbs and libnl, but its EFA
# module links the system's libefa, which pulls in the system's libibverbs and a second
# libnl: on any host with Debian's libibverbs1 (and ibverbs-providers) installed, that
# module loads and the process segfaults at exit inside libnl-route-3 (exit code 139).
# Skip that one module (InfiniBand and mlx5 stay); on an AWS EFA host, set UCX_MODULES
# yourself to use it.
os.environ.setdefault("UCX_MODULES", "^*efa*")

Row = tuple[int, int, int]  # address, length, device id
INLINE_BYTES = 2 << 20  # transfers up to this size post on the caller's thread


@dataclass(slots=True)
class Region:
    address: int
    size: int
    mem_type: str  # "DRAM" or "VRAM"
    device: int
    owner: Any  # keeps the memory alive while registered
    descs: Any = None


_BUILD_LOCK = threading.Lock()
_ANY = ("", "0.0.0.0", "::")


def _interface_of(host: str) -> str:
    """The network interface that holds address ``host`` (``lo`` for loopback)."""
    import fcntl
    import ipaddress
    import struct

    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            addr = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            raise ConfigError(f"host {host!r} does not resolve to an address of this machine") from None
    if addr.is_loopback:
        return "lo"
    if addr.version == 6:
        raise ConfigError(f"host {host}: NIXL's listener can be bound to an IPv4 address, "
                          "loopback, or every interface (0.0.0.0); give one of those")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == str(addr):
                return name
    raise ConfigError(f"no network interface of this machine has the address {host}; set host "
                      "to one of its addresses (or 0.0.0.0 for all)")


def _net_devices(host: str) -> str | None:
    """UCX_NET_DEVICES for an agent that must listen on ``host`` only. UCX otherwise opens
    its TCP listener on every interface (the external one too, with host = 127.0.0.1);
    shared-memory transports are not network devices and stay available."""
    if host in _ANY or "UCX_NET_DEVICES" in os.environ:  # the operator's own choice wins
        return None
    return _interface_of(host)


def _nixl_agent(name: str, progress_thread: bool, progress_delay_us: int, host: str = "") -> Any:
    """A NIXL agent whose progress thread sleeps between polls. The Python API pins the
    delay at 0, which makes the thread spin a whole core even while idle; 100 us costs
    no bandwidth and next to no latency here (measured: 1 MiB READ p50 0.135 ms either
    way, idle CPU 100% -> 2%)."""
    import nixl._api as api  # heavy import, only when used

    logging.getLogger("NIXL").setLevel(logging.WARNING)
    build = api.nixlBind.nixlAgent

    def with_delay(agent_name: str, cfg: Any) -> Any:
        cfg.pthrDelay = progress_delay_us
        return build(agent_name, cfg)

    devices = _net_devices(host)
    with _BUILD_LOCK:
        api.nixlBind.nixlAgent = with_delay
        if devices is not None:  # UCX reads it when the agent's backend starts, only then
            os.environ["UCX_NET_DEVICES"] = devices
        try:
            return api.nixl_agent(name, api.nixl_agent_config(
                enable_prog_thread=progress_thread, backends=["UCX"],
                sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        finally:
            api.nixlBind.nixlAgent = build
            if devices is not None:
                del os.environ["UCX_NET_DEVICES"]


def client_host(configured: str, endpoints: str) -> str:
    """Where a client's agent listens: ``configured``, else loopback when every endpoint it
    talks to (master URLs or etcd host:port, comma-separated) is on loopback, else all."""
    if configured:
        return configured
    hosts = []
    for ep in (e.strip() for e in endpoints.split(",") if e.strip()):
        hosts.append(urlsplit(ep if "//" in ep else f"//{ep}").hostname or "")
    local = bool(hosts) and all(is_loopback(h) for h in hosts)
    return "127.0.0.1" if local else ""


class TransferAgent:
    """A NIXL agent with its registered regions and the peers it has met.

    A daemon keeps the progress thread on, so peers' one-sided READs and WRITEs complete
    while it is idle; a client only initiates transfers and drives them itself by polling.
    Over shared memory NIXL copies inside the post call, which releases the GIL: large
    transfers therefore post on a thread of their own, so the caller can verify one chunk
    while the next one copies. The agent runs in NIXL's strict sync mode so both threads
    may use it.
    """

    def __init__(self, name: str, progress_thread: bool = True, progress_delay_us: int = 100,
                 host: str = "") -> None:
        """``host``: the address whose interface UCX may listen on ("" or 0.0.0.0: all)."""
        self.name = name
        self._agent = _nixl_agent(name, progress_thread, progress_delay_us, host)
        self._poster = ThreadPoolExecutor(1, thread_name_prefix=f"nixl-{name}")
        self._starts: list[int] = []
        self._regions: dict[int, Region] = {}
        self._peers: set[str] = set()

    def metadata(self) -> bytes:
        """What a peer needs to reach this agent's registered memory."""
        return self._agent.get_agent_metadata()

    def partial_metadata(self, region: "Region") -> bytes:
        """What a peer needs to reach ``region`` and no other registered memory (with this
        agent's connection info): NIXL refuses a transfer outside what a peer loaded."""
        return self._agent.get_partial_agent_metadata(region.descs, inc_conn_info=True,
                                                      backends=["UCX"])

    # -- registration ---------------------------------------------------------------------

    def register(self, address: int, size: int, mem_type: str = "DRAM", device: int = 0,
                 owner: Any = None) -> Region:
        if size <= 0:
            raise BadRequest("cannot register an empty region")
        if self.find(address, size) is not None:
            return self.find(address, size)  # type: ignore[return-value]
        descs = self._agent.register_memory([(address, size, device, "")], mem_type)
        region = Region(address, size, mem_type, device, owner, descs)
        bisect.insort(self._starts, address)
        self._regions[address] = region
        return region

    def deregister(self, region: Region) -> None:
        if self._regions.pop(region.address, None) is None:
            return
        self._starts.remove(region.address)
        self._agent.deregister_memory(region.descs)

    def find(self, address: int, size: int) -> Region | None:
        """The registered region that holds ``[address, address + size)``, if any."""
        i = bisect.bisect_right(self._starts, address) - 1
        while i >= 0:
            region = self._regions[self._starts[i]]
            if address + size <= region.address + region.size:
                return region
            if region.address + region.size <= address:
                return None
            i -= 1
        return None

    @property
    def regions(self) -> list[Region]:
        return [self._regions[a] for a in self._starts]

    # -- peers ----------------------------------------------------------------------------

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's agent metadata; a peer NIXL cannot reach (its process died after it
        published the metadata) is NodeGone, which callers retry elsewhere."""
        try:
            name = self._agent.add_remote_agent(metadata)
        except Exception as exc:  # NIXL raises its own exception types
            raise NodeGone(f"NIXL could not load a peer's agent metadata ({exc}); the node "
                           "is probably gone: retry, the master drops it within its TTL") from None
        name = name.decode() if isinstance(name, bytes) else name
        self._peers.add(name)
        return name

    def knows(self, peer: str) -> bool:
        return peer in self._peers

    def connect(self, peer: str) -> None:
        """Open the connection to a known peer now rather than at the first transfer (its
        wire-up then costs the first put or get tens of milliseconds, far more on a busy
        host); a peer that cannot be reached is NodeGone."""
        try:
            self._agent.make_connection(peer)
        except Exception as exc:  # NIXL raises its own exception types
            raise NodeGone(f"NIXL could not connect to peer {peer} ({exc}); the node is "
                           "probably gone: the master drops it within its TTL") from None

    # -- transfers ------------------------------------------------------------------------

    def start(self, op: str, peer: str, local: list[Row] | np.ndarray, local_mem: str,
              remote: list[Row] | np.ndarray, remote_mem: str) -> "Transfer":
        """Post a READ (remote -> local) or WRITE (local -> remote) of matching rows."""
        if len(local) <= 32:  # tuples beat numpy for the short lists of latency-bound calls
            la, ra = [tuple(map(int, r)) for r in local], [tuple(map(int, r)) for r in remote]
            lengths = [r[1] for r in la]
            ok = len(la) == len(ra) and lengths == [r[1] for r in ra]
        else:
            la = np.asarray(local, dtype=np.uint64).reshape(-1, 3)
            ra = np.asarray(remote, dtype=np.uint64).reshape(-1, 3)
            lengths = la[:, 1]
            ok = la.shape == ra.shape and np.array_equal(la[:, 1], ra[:, 1])
        if not ok or not len(la):
            raise BadRequest("local and remote descriptors must pair up with equal lengths")
        try:
            handle = self._agent.initialize_xfer(
                op, self._agent.get_xfer_descs(la, local_mem),
                self._agent.get_xfer_descs(ra, remote_mem), peer)
            state = self._agent.transfer(handle)
        except Exception as exc:
            raise TransferFailed(f"NIXL {op} to {peer} could not start: {exc}") from None
        return Transfer(self._agent, handle, state, op, peer, int(sum(lengths)))

    async def run(self, op: str, peer: str, local: list[Row] | np.ndarray, local_mem: str,
                  remote: list[Row] | np.ndarray, remote_mem: str, deadline_s: float) -> None:
        """One transfer to completion: inline when small (no thread hop), else on the poster."""
        if sum(int(row[1]) for row in local) <= INLINE_BYTES:
            await self.start(op, peer, local, local_mem, remote, remote_mem).wait(deadline_s)
        else:
            await self.submit(op, peer, local, local_mem, remote, remote_mem, deadline_s)

    def submit(self, op: str, peer: str, local: list[Row] | np.ndarray, local_mem: str,
               remote: list[Row] | np.ndarray, remote_mem: str, deadline_s: float
               ) -> "asyncio.Future[None]":
        """Queue a transfer on the poster thread; transfers run in submission order."""
        return asyncio.get_running_loop().run_in_executor(
            self._poster, self.run_blocking, op, peer, local, local_mem, remote, remote_mem,
            deadline_s)

    def run_blocking(self, op: str, peer: str, local: list[Row] | np.ndarray, local_mem: str,
                      remote: list[Row] | np.ndarray, remote_mem: str, deadline_s: float) -> None:
        transfer = self.start(op, peer, local, local_mem, remote, remote_mem)
        spins = 0
        while not transfer.poll():
            transfer.check_deadline(deadline_s)
            spins += 1
            time.sleep(0 if spins < 1000 else 0.0002)

    def close(self) -> None:
        self._poster.shutdown(wait=True)


class Transfer:
    """One posted NIXL request; ``wait`` polls it to completion or its deadline."""

    __slots__ = ("_agent", "_handle", "_state", "op", "peer", "nbytes", "_t0")

    def __init__(self, agent: Any, handle: Any, state: str, op: str, peer: str, nbytes: int):
        self._agent, self._handle, self._state = agent, handle, state
        self.op, self.peer, self.nbytes = op, peer, nbytes
        self._t0 = time.monotonic()

    def poll(self) -> bool:
        """True once done; raises TransferFailed on error."""
        if self._state == "PROC":
            self._state = self._agent.check_xfer_state(self._handle)
        if self._state == "ERR":
            self._release()
            raise TransferFailed(f"NIXL {self.op} with {self.peer} failed "
                                 "(peer gone or memory not registered)")
        if self._state == "DONE":
            self._release()
            return True
        return False

    def check_deadline(self, deadline_s: float) -> None:
        if time.monotonic() - self._t0 > deadline_s:
            self._release()
            raise TransferFailed(f"NIXL {self.op} of {self.nbytes} bytes with {self.peer} "
                                 f"passed its {deadline_s:.1f}s deadline")

    async def wait(self, deadline_s: float) -> None:
        """Spin briefly (a 1 MiB read takes ~0.1 ms), then back off; never past the deadline."""
        spins = 0
        while not self.poll():
            self.check_deadline(deadline_s)
            spins += 1
            await asyncio.sleep(0 if spins < 200 else 0.0005)

    def _release(self) -> None:
        if self._handle is not None:
            try:
                self._agent.release_xfer_handle(self._handle)
            except Exception as exc:  # an in-flight handle may refuse; it is leaked, not reused
                log.debug("release_xfer_handle: %s", exc)
            self._handle = None
