"""Scheduler side: which prefix blocks to load from the pool and which new blocks to save.

Per new request, one batched ``match_prefix`` over the prompt's full blocks, counting
only the blocks beyond vLLM's own prefix-cache hit; the loads are asynchronous (the
request waits in WAITING_FOR_REMOTE_KVS while the worker reads). Every full prompt block
computed in a step is saved after that step's forward; a finished request keeps its
blocks until the worker says its saves have landed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.vllm_kv.common import (ConnectorConfig, KVPoolMetadata, KVPoolWorkerMetadata,
                                   LoadSpec, SaveSpec, namespaces)
from engine.vllm_kv.events import removed_events, stored_events
from engine.vllm_kv.link import POOL_FAILURES, PoolLink
from kvpool.keys import BlockKey, block_keys

log = logging.getLogger("vllm.kvpool." + __name__.rsplit(".", 1)[-1])  # under vLLM's handler


@dataclass(slots=True)
class _Request:
    req_id: str
    prompt_len: int
    keys: list[list[BlockKey]]  # per TP rank: the prompt's full blocks
    tokens: list[int] | None = None  # kept only for events that carry token ids
    block_ids: list[int] = field(default_factory=list)
    local: int = 0  # blocks vLLM had in its own prefix cache when asked
    hit: int | None = None  # blocks the pool holds (asked once per request)
    saved: int = 0  # blocks below this are in the pool or on their way
    saving: bool = False  # some save was scheduled: request_finished must wait for it


class KVPoolScheduler:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig) -> None:
        self.cfg = cfg
        self.ns = namespaces(vllm_config, kv_cache_config, cfg)
        self.block_tokens = self.ns[0].block_tokens
        self.link = PoolLink(cfg, "scheduler")
        self._reqs: dict[str, _Request] = {}
        self._loads: list[LoadSpec] = []
        self._events: list[Any] = []
        self._token_ids: dict[BlockKey, list[int]] = {}  # saved blocks' tokens, until announced
        log.info("kvpool connector (scheduler): namespace %s, load=%s save=%s", self.ns[0],
                 cfg.load, cfg.save)

    def _state(self, request: Any) -> _Request:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            st = _Request(request.request_id, len(tokens),
                          [block_keys(ns, tokens) for ns in self.ns] if tokens else
                          [[] for _ in self.ns], tokens=tokens if self.cfg.event_token_ids else None)
            self._reqs[request.request_id] = st
        return st

    # -- loads ----------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        st = self._state(request)
        if not self.cfg.load:
            return 0, False
        usable = min(len(st.keys[0]), (st.prompt_len - 1) // self.block_tokens)  # one token left to compute
        local = num_computed_tokens // self.block_tokens
        st.local = local
        if usable <= local:
            return 0, False
        if st.hit is None:
            st.hit = self._match(st.keys[0][:usable])
            st.saved = max(st.saved, st.hit)  # those are in the pool already
        hit = min(st.hit, usable)
        if hit <= local:
            return 0, False
        return (hit - local) * self.block_tokens, True

    def _match(self, keys: list[BlockKey]) -> int:
        if not self.link.available():
            return 0
        try:
            n = self.link.run(self.link.client.match_prefix(keys), self.cfg.timeout_s)
        except POOL_FAILURES as exc:
            self.link.failed("a prefix match", exc)
            return 0
        self.link.succeeded()
        return n

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        st.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0:
            return
        first, n = st.local, num_external_tokens // self.block_tokens
        self._loads.append(LoadSpec(st.req_id, [k[first:first + n] for k in st.keys],
                                    st.block_ids[first:first + n]))

    # -- saves ----------------------------------------------------------------------------

    def build_connector_meta(self, so: Any) -> KVPoolMetadata:
        meta = KVPoolMetadata(loads=self._loads, preempted=sorted(so.preempted_req_ids or ()),
                              idle=so.total_num_scheduled_tokens == 0)
        self._loads = []
        save = self.cfg.save and self.link.available()
        for req in so.scheduled_new_reqs:
            st = self._reqs.get(req.req_id)
            if st is None:
                continue
            st.block_ids = list(req.block_ids[0])
            if save:
                self._add_save(meta, st, req.num_computed_tokens + so.num_scheduled_tokens.get(req.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids = list(new[0]) if new else []
            elif new:
                st.block_ids.extend(new[0])
            if save:
                self._add_save(meta, st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(rid, 0))
        return meta

    def _add_save(self, meta: KVPoolMetadata, st: _Request, computed: int) -> None:
        """Save the full prompt blocks that this step completes (generated tokens are
        not saved: decode steps compute them, not a prefill)."""
        full = min(computed // self.block_tokens, len(st.keys[0]), len(st.block_ids))
        if full <= st.saved:
            return
        lo, st.saved, st.saving = st.saved, full, True
        if st.tokens is not None:
            if len(self._token_ids) > 1 << 16:  # blocks that were in the pool already: never announced
                self._token_ids.clear()
            bt = self.block_tokens
            for i in range(lo, full):
                self._token_ids[st.keys[0][i]] = st.tokens[i * bt:(i + 1) * bt]
        meta.saves.append(SaveSpec(st.req_id, [k[lo:full] for k in st.keys], st.block_ids[lo:full],
                                   [k[lo - 1] if lo else None for k in st.keys]))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Hold the blocks while a save reads them; the worker reports when it is done."""
        st = self._reqs.pop(request.request_id, None)
        return (st is not None and st.saving), None

    # -- events ---------------------------------------------------------------------------

    def update_connector_output(self, output: Any) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if not isinstance(meta, KVPoolWorkerMetadata):
            return
        if meta.stored:
            self._events.extend(stored_events(meta.stored, self.block_tokens, self._token_ids))
        if meta.dropped:
            self._events.extend(removed_events(meta.dropped))

    def take_events(self) -> Iterable[Any]:
        events, self._events = self._events, []
        return events

    def shutdown(self) -> None:
        self.link.close()
