"""Worker side: blocks move straight between vLLM's paged KV cache and the pool's arenas.

vLLM's cache is one tensor per layer, so a vLLM block is one segment per layer (or two,
K and V, where a backend keeps them apart). Each tensor is registered with NIXL once;
a block is then handed to the client as ``Segments`` and moves in one transfer whose
descriptor list has a row per segment: no staging copy. Loads run in the background
between steps. Saves overlap the forward pass: a step's new blocks are reserved when
vLLM binds the step's metadata, each layer's share of them is written (and hashed) as
soon as that layer's attention has filled it, and they are committed once the forward is
done, so what is left after the forward is the last layer and the commit. A block that
does not arrive (gone, corrupt, pool down) is reported to vLLM, which recomputes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clients.segments import Segments, segmented_view
from engine.vllm_kv.common import (ConnectorConfig, KVPoolMetadata, KVPoolWorkerMetadata,
                                   LoadSpec, SaveSpec, namespaces)
from engine.vllm_kv.link import POOL_FAILURES, PoolLink
from kvpool.errors import ChecksumMismatch, ConfigError

log = logging.getLogger("vllm.kvpool." + __name__.rsplit(".", 1)[-1])  # under vLLM's handler


@dataclass(slots=True)
class _Load:
    spec: LoadSpec
    future: "concurrent.futures.Future[int]"


@dataclass(slots=True)
class _Pipeline:
    """One request's save in this step: the index of each layer the forward has computed
    (with the CUDA event that marks it written) arrives on ``layers``; the end of the
    forward arrives as ALL_LAYERS."""

    spec: SaveSpec
    layers: "asyncio.Queue[tuple[int, Any]]" = field(default_factory=asyncio.Queue)
    future: "concurrent.futures.Future[int] | None" = None
    forward_done: float | None = None  # perf_counter when vLLM said the forward ended


ALL_LAYERS = -1  # the forward is done: every layer is in the cache
# The longest a save waits for its step's forward to finish: past it the worker is taken
# as gone and the reservation handed back (the master would reclaim it anyway).
_FORWARD_LIMIT_S = 600.0


@dataclass(slots=True)
class _Saves:
    futures: list["concurrent.futures.Future[Any]"] = field(default_factory=list)
    finished: bool = False  # vLLM finished the request: report it once the saves are done


class KVPoolWorker:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig, role: str) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.cfg = cfg
        self.rank = get_tensor_model_parallel_rank()
        self.ns = namespaces(vllm_config, kv_cache_config, cfg)[self.rank]
        self.num_blocks = kv_cache_config.num_blocks
        self.layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
        self.sync_save = role == "kv_producer"  # a handoff: the answer waits for its blocks
        self.link = PoolLink(cfg, f"worker{self.rank}")
        self._views: list[torch.Tensor] = []  # per layer: [segments, blocks, bytes]
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # host: per segment
        #                                              the base address, block stride, length
        self.block_bytes = 0
        self._loads: list[_Load] = []
        self._saves: dict[str, _Saves] = {}
        self._step: list[_Pipeline] = []  # this step's saves, fed layer by layer
        self._layer_of: dict[str, int] = {}  # vLLM layer name -> index in _views
        self._layer_bytes: list[int] = []  # per layer: its share of a block, in bytes
        self._layer_rows: list[int] = [0]  # per layer: its first row in the segment table
        self._load_errors: set[int] = set()
        self._stored: list[Any] = []  # appended on the link's thread
        self._dropped: list[tuple[bytes, str]] = []  # key, tier it was read from
        self._stored_lock = threading.Lock()
        self.stats = {"loaded_blocks": 0, "failed_blocks": 0, "saved_blocks": 0}

    # -- setup ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """View every layer's tensor as [segments, blocks, bytes] and register its memory
        with NIXL once (tensors that share one allocation register it once)."""
        names = [n for n in self.layer_names if n in kv_caches] or list(kv_caches)
        seen: set[int] = set()
        self._layer_of = {name: i for i, name in enumerate(names)}
        for name in names:
            t = kv_caches[name]
            if not t.is_contiguous():
                raise ConfigError(f"KV cache of {name} is not contiguous; kvpool cannot address its blocks")
            dims = [d for d, n in enumerate(t.shape) if n == self.num_blocks]
            if not dims:
                raise ConfigError(f"KV cache of {name} has shape {tuple(t.shape)}, with no "
                                  f"dimension of {self.num_blocks} blocks")
            d = 1 if len(dims) > 1 and dims[:2] == [0, 1] and t.shape[0] == 2 else dims[0]  # (K/V, blocks, ...)
            segs = math.prod(t.shape[:d])
            self._views.append(t.view(torch.uint8).view(segs, self.num_blocks, -1)
                               if t.element_size() == 1 else
                               t.reshape(segs, self.num_blocks, -1).view(torch.uint8))
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                self.link.register(whole)
        self._layer_bytes = [v.shape[0] * v.shape[2] for v in self._views]
        self._layer_rows = [0, *np.cumsum([v.shape[0] for v in self._views]).tolist()]
        self.block_bytes = sum(self._layer_bytes)
        self.link.connect_ahead()
        if all(not v.is_cuda for v in self._views):
            segs = [(v.data_ptr() + s * v.stride(0), v.stride(1), v.shape[2])
                    for v in self._views for s in range(v.shape[0])]
            self._table = tuple(np.array(col, dtype=np.int64) for col in zip(*segs))  # type: ignore[assignment]
        log.info("kvpool connector (worker %d): %d layers, %d blocks of %d bytes (%d segments each), "
                 "namespace %s", self.rank, len(self._views), self.num_blocks, self.block_bytes,
                 sum(v.shape[0] for v in self._views), self.ns)

    def segments(self, block_id: int, lo: int = 0, hi: int | None = None) -> Segments:
        """One vLLM block as the pool stores it: the segments of layers ``lo`` to ``hi``
        (all by default), in layer order. Host caches go as a table of (address, length)
        rows of registered memory: a block is one or two segments per layer and a load
        moves hundreds of blocks, so no Python object per segment."""
        hi = len(self._views) if hi is None else hi
        if self._table is not None:
            a, b = self._layer_rows[lo], self._layer_rows[hi]
            base, stride, length = self._table
            return Segments(np.stack([base[a:b] + block_id * stride[a:b], length[a:b]], axis=1),
                            owner=self._views)
        return Segments([v[s, block_id] for v in self._views[lo:hi] for s in range(v.shape[0])])

    # -- loads ----------------------------------------------------------------------------

    def start_load_kv(self, meta: KVPoolMetadata) -> None:
        for spec in meta.loads:
            if not self.link.available():
                fut: concurrent.futures.Future[int] = concurrent.futures.Future()
                fut.set_result(0)
            else:
                fut = self.link.submit(self._load(spec), self.cfg.load_timeout_s)
            self._loads.append(_Load(spec, fut))

    async def _load(self, spec: LoadSpec) -> int:
        """Read the blocks in place; returns how many leading ones arrived intact."""
        keys = spec.keys[self.rank]
        t0 = time.perf_counter()
        results = await self.link.client.batch_get(keys, [self.segments(b) for b in spec.block_ids])
        seconds = time.perf_counter() - t0
        got = 0
        for res in results:
            if not res.hit:
                if res.error is not None:
                    log.warning("kvpool: block %s unusable, vLLM recomputes from it: %s",
                                res.key.hex(), res.error)
                    if isinstance(res.error, ChecksumMismatch):  # the pool dropped that copy
                        with self._stored_lock:
                            self._dropped.append((res.key, res.tier or "host"))
                break
            got += 1
        if self.cfg.stats_path:
            with open(self.cfg.stats_path, "a") as f:
                f.write(json.dumps({"op": "load", "req": spec.req_id, "blocks": got,
                                    "bytes": got * self.block_bytes, "seconds": seconds}) + "\n")
        self._audit("load", spec.req_id, keys[:got], spec.block_ids[:got])
        return got

    def _audit(self, op: str, req_id: str, keys: list[bytes], block_ids: list[int],
               parts: int = 1) -> None:
        """``parts``: how many writes a saved block went in (one per layer when the
        forward's layers were saved as they were computed)."""
        if not self.cfg.audit_path or not keys:
            return
        with open(self.cfg.audit_path, "a") as f:
            for key, b in zip(keys, block_ids):
                digest = segmented_view(self.segments(b), writable=False).checksum()
                f.write(json.dumps({"op": op, "req": req_id, "rank": self.rank, "key": key.hex(),
                                    "xxh3": f"{digest:016x}", "parts": parts}) + "\n")

    def _finished_loads(self) -> set[str]:
        done: set[str] = set()
        keep: list[_Load] = []
        for load in self._loads:
            if not load.future.done():
                keep.append(load)
                continue
            try:
                got = load.future.result()
                self.link.succeeded()
            except POOL_FAILURES as exc:
                self.link.failed(f"loading {len(load.spec.block_ids)} blocks", exc)
                got = 0
            failed = load.spec.block_ids[got:]
            self._load_errors.update(failed)
            self.stats["loaded_blocks"] += got
            self.stats["failed_blocks"] += len(failed)
            done.add(load.spec.req_id)
        self._loads = keep
        return done

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ----------------------------------------------------------------------------

    def begin_saves(self, meta: KVPoolMetadata) -> None:
        """Before the forward: reserve the blocks this step completes, so each layer can
        be written as soon as it is computed."""
        self._end_step()  # a step whose wait_for_save never came (vLLM skipped it)
        if not meta.saves or not self.link.available():
            return
        for spec in meta.saves:
            pipe = _Pipeline(spec)
            pipe.future = self.link.submit(self._save(pipe), _FORWARD_LIMIT_S)
            self._saves.setdefault(spec.req_id, _Saves()).futures.append(pipe.future)
            self._step.append(pipe)

    def save_kv_layer(self, layer_name: str) -> None:
        """A layer's attention has written its KV for this step: its share of the new
        blocks can go. On CUDA the write waits for an event recorded here, as the kernels
        that fill the cache may still be running."""
        layer = self._layer_of.get(layer_name)
        if layer is not None and self._step:
            self._computed(layer)

    def _computed(self, layer: int) -> None:
        """Layer ``layer`` (ALL_LAYERS: every one) is in the cache: tell this step's saves."""
        done = None
        if self._views[0].is_cuda:
            done = torch.cuda.Event()  # marks every kernel launched so far
            done.record()
        for pipe in self._step:
            self.link.call_soon(pipe.layers.put_nowait, (layer, done))

    def _end_step(self) -> list["concurrent.futures.Future[int]"]:
        if self._step:
            self._computed(ALL_LAYERS)
        futures = []
        now = time.perf_counter()
        for pipe in self._step:
            pipe.forward_done = now
            futures.append(pipe.future)
        self._step = []
        return futures  # type: ignore[return-value]

    def wait_for_save(self, meta: KVPoolMetadata) -> None:
        """The forward is done: the saves write what is left and commit. A producer waits
        for them, so its answer means the decode side can find the blocks."""
        if meta.saves and not self._step and self.link.available():
            self.begin_saves(meta)  # no metadata was bound before the forward
        futures = self._end_step()
        if self.sync_save and futures:
            concurrent.futures.wait(futures, self.cfg.save_timeout_s + 1.0)

    async def _save(self, pipe: _Pipeline) -> int:
        spec = pipe.spec
        keys = spec.keys[self.rank]
        blocks = spec.block_ids
        t0 = time.perf_counter()
        busy = 0.0  # seconds spent reserving, writing and committing, not waiting for layers
        put = None
        try:
            put = await self.link.client.begin_put(
                keys, [self.block_bytes] * len(keys), chained=True, parent=spec.parent[self.rank],
                layout=self.ns.kv_layout, namespace=self.ns)
            busy += time.perf_counter() - t0
            offset, written, parts = 0, 0, 0  # bytes, layers and writes of each block so far
            ready: set[int] = set()  # layers computed (in the order the forward ran them)
            layers = len(self._views)
            while written < layers:
                layer, done = await pipe.layers.get()  # bounded: the whole save is
                ready.update(range(layers) if layer == ALL_LAYERS else (layer,))
                end = written  # a block's payload goes in list order: the next run of layers
                while end < layers and end in ready:
                    end += 1
                if end == written:
                    continue
                if done is not None:  # CUDA: once the kernels that fill them have run
                    await asyncio.get_running_loop().run_in_executor(None, done.synchronize)
                t1 = time.perf_counter()
                if put.new:
                    await put.write([self.segments(b, written, end) for b in blocks], offset)
                    parts += 1
                offset += sum(self._layer_bytes[written:end])
                written = end
                busy += time.perf_counter() - t1
            t1 = time.perf_counter()
            results = await put.commit()
            committed = time.perf_counter()
            busy += committed - t1
        except POOL_FAILURES as exc:
            self.link.failed(f"saving {len(keys)} blocks", exc)
            return 0
        finally:
            if put is not None:
                await put.abort()  # nothing if it was committed
        self.link.succeeded()
        self._audit("save", spec.req_id, keys, blocks, parts)
        if self.cfg.stats_path:
            with open(self.cfg.stats_path, "a") as f:
                f.write(json.dumps({"op": "save", "req": spec.req_id, "blocks": len(keys),
                                    "bytes": len(keys) * self.block_bytes, "seconds": busy,
                                    # how long the save outlived the forward (0: it did not)
                                    "after_forward_s": max(0.0, committed - pipe.forward_done)
                                    if pipe.forward_done is not None else 0.0}) + "\n")
        parents = [spec.parent[self.rank], *keys[:-1]]
        new = [(r.key, parents[i], r.tier or "host") for i, r in enumerate(results) if r.stored]
        with self._stored_lock:
            self._stored.extend(new)
            self.stats["saved_blocks"] += len(new)
        return len(new)

    def handle_preemptions(self, meta: KVPoolMetadata) -> None:
        """A preempted request's blocks are freed at once: its saves must have read them
        before the next forward can overwrite them."""
        futures = [f for rid in meta.preempted if rid in self._saves for f in self._saves[rid].futures]
        if futures:
            concurrent.futures.wait(futures, self.cfg.save_timeout_s + 1.0)

    # -- completions ----------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str], idle: bool = False) -> tuple[set[str], set[str]]:
        if idle and self._loads:
            # Nothing computes this step, and vLLM steps again at once: its busy loop on this
            # thread would hold the GIL the loads need (measured: 4x slower loads). Blocking
            # here a little lets them run; a step with work never waits.
            concurrent.futures.wait([load.future for load in self._loads], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for rid in finished_req_ids:
            if rid in self._saves:
                self._saves[rid].finished = True
        if finished_req_ids and self._loads:
            for load in self._loads:
                if load.spec.req_id in finished_req_ids and not load.future.done():
                    # vLLM keeps the blocks until the load is reported below: the bytes still
                    # landing cannot reach a block another request holds (it is not cancelled:
                    # a cancelled future would read as done before its transfer stopped).
                    log.info("kvpool: request %s finished while its load was in flight; its "
                             "blocks are freed once the load ends", load.spec.req_id)
        sending = {rid for rid, s in self._saves.items()
                   if s.finished and all(f.done() for f in s.futures)}
        for rid in sending:
            del self._saves[rid]
        return sending, self._finished_loads()

    def take_stored(self) -> KVPoolWorkerMetadata | None:
        with self._stored_lock:
            if not self._stored and not self._dropped:
                return None
            meta = KVPoolWorkerMetadata(self._stored, self._dropped)
            self._stored, self._dropped = [], []
        return meta

    def shutdown(self) -> None:
        for load in self._loads:
            concurrent.futures.wait([load.future], 2.0)
        self.link.close()
