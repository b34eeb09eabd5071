"""The engine loop: one compute thread running the model, an asyncio loop moving blocks.

One class serves the three roles, because they are the same steps in different places:
- prefill: look up the longest cached prefix (engine pages first, then the pool), fetch
  it, compute the rest, sample the first token, write every new full block to the pool
  and hand the request off. The blocks of one request are in flight while the next one
  computes (torch releases the GIL; the pool client lives on the event loop).
- decode: take handoffs, fetch their blocks (recomputing whatever cannot be fetched, the
  trailing partial block always), then step every running sequence together.
- mono: both in one process, as a colocated engine does; a prefill stalls every decode
  step behind it, which is the interference disaggregation removes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import torch

from clients.client import AsyncPoolClient
from engine.adapter import KVAdapter, namespace
from engine.cache import PagedKVCache
from engine.config import EngineConfig
from engine.model import DecodeRow, Transformer
from engine.sampling import Sampling, sample
from kvpool.errors import BadRequest, CacheFull, KVPoolError
from kvpool.keys import BlockKey, block_keys, chain
from kvpool import tracing
from kvpool.kv_events import Reason
from kvpool.tasks import TaskOwner

log = logging.getLogger(__name__)


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MONO = "mono"


@dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    max_tokens: int = 16
    sampling: Sampling = Sampling()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if not self.prompt:
            raise BadRequest("the prompt is empty; send at least one token")
        if self.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {self.max_tokens}")

    @classmethod
    def from_json(cls, body: dict[str, Any], vocab: int) -> "Request":
        try:
            prompt = [int(t) for t in body["token_ids"]]
            req = cls(prompt, int(body.get("max_tokens", 16)),
                      Sampling(float(body.get("temperature", 0.0)), int(body.get("seed", 0))),
                      str(body.get("request_id") or uuid.uuid4().hex[:12]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"a request needs token_ids (a list of ints) and may set "
                             f"max_tokens, temperature, seed, request_id: {exc}") from None
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids must lie in [0, {vocab}); got {bad[:5]}")
        return req


@dataclass(frozen=True, slots=True)
class Handoff:
    """What a prefill engine passes to a decode engine (through the router)."""

    request_id: str
    prompt: list[int]
    first_token: int
    keys: list[str]  # hex keys of the prompt's full blocks
    max_tokens: int
    temperature: float
    seed: int
    reused_tokens: int  # prompt tokens the prefill engine did not compute
    pool_tokens: int  # of those, the ones it fetched from the pool (the rest were in its pages)
    prefill_ms: float
    partial_key: str | None = None  # hex key of the trailing partial block, when it was written

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Handoff":
        try:
            return cls(**{k: body[k] for k in cls.__dataclass_fields__ if k != "partial_key"},
                       partial_key=body.get("partial_key"))
        except (KeyError, TypeError) as exc:
            raise BadRequest(f"malformed handoff, missing {exc}; send what /v1/prefill returned") from None

    @property
    def request(self) -> Request:
        return Request(self.prompt, self.max_tokens, Sampling(self.temperature, self.seed),
                       self.request_id)


@dataclass(eq=False)
class Sequence:
    """A request inside one engine."""

    req: Request
    tokens: list[int]
    out: "asyncio.Queue[int | None | BaseException]" = field(default_factory=asyncio.Queue)
    first: "asyncio.Future[int] | None" = None  # prefill: the first token, as soon as known
    handoff: "asyncio.Future[Handoff] | None" = None  # prefill: once its blocks are committed
    first_token: int | None = None
    keys: list[BlockKey] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    cached: int = 0  # leading full blocks not computed here
    fetched: int = 0  # of those, how many came from the pool
    partial_fetched: bool = False  # the trailing partial block came from the pool
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.req.prompt)

    @property
    def parent(self) -> BlockKey | None:
        """The block the first computed one chains from: the last block not computed here."""
        return self.keys[self.cached - 1] if self.cached else None

    async def stream(self) -> AsyncIterator[int]:
        """The tokens as they come; raises the error that ended the request, if any."""
        while True:
            item = await self.out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    def __init__(self, role: Role, model: Transformer, cfg: EngineConfig,
                 pool: AsyncPoolClient | None = None) -> None:
        torch.set_num_threads(cfg.torch_threads)
        self.role, self.model, self.cfg = role, model, cfg
        self.cache = PagedKVCache(model.cfg, cfg.num_pages, cfg.block_tokens,
                                  node=f"engine-{role.value}-{os.getpid()}")
        self.ns = namespace(model.model_id, model.cfg.dtype, self.cache, cfg.salt,
                            pool.key_secret if pool is not None else "")
        self.adapter = KVAdapter(pool, self.cache, self.ns) if pool is not None else None
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="engine-compute")
        self._prefills: deque[Sequence] = deque()
        self._admits: deque[tuple[Sequence, Handoff]] = deque()
        self._active: list[Sequence] = []
        self._stepping: list[Sequence] = []  # taken from a queue, not yet running
        self._scheduler = TaskOwner(f"engine-{role.value}")  # the step loop: cancelled on stop
        self._stores = TaskOwner(f"engine-{role.value} stores")  # writes to the pool: awaited on stop
        self._wake = asyncio.Event()
        self.totals = {"requests": 0, "prompt_tokens": 0, "reused_tokens": 0,
                       "blocks_fetched": 0, "blocks_stored": 0}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "Worker":
        self._scheduler.spawn(self._run(), name=f"engine-{self.role.value}")
        return self

    async def stop(self) -> None:
        """Stop scheduling; the computation in flight ends and hands its blocks on, and every
        write to the pool lands before this returns."""
        await self._scheduler.cancel()
        await asyncio.to_thread(self._compute.shutdown, wait=True)
        await asyncio.sleep(0)  # what the compute thread handed to the loop runs first
        await self._stores.drain()

    # -- entry points ---------------------------------------------------------------------

    def _need_role(self, *roles: Role) -> None:
        if self.role not in roles:
            raise BadRequest(f"this is a {self.role.value} engine; send this call to a "
                             f"{' or '.join(r.value for r in roles)} engine")

    def _check_fits(self, req: Request) -> None:
        limit = self.model.cfg.max_positions
        if len(req.prompt) + req.max_tokens > limit:
            raise BadRequest(f"{len(req.prompt)} prompt tokens + {req.max_tokens} max_tokens exceed "
                             f"the model's {limit} positions; shorten the prompt or max_tokens")

    def prefill(self, req: Request) -> Sequence:
        """Queue a prompt; its ``first`` future resolves with the first token, then its
        ``handoff`` future once the new blocks are in the pool."""
        self._need_role(Role.PREFILL)
        self._check_fits(req)
        loop = asyncio.get_running_loop()
        seq = Sequence(req, list(req.prompt), first=loop.create_future(), handoff=loop.create_future())
        self._prefills.append(seq)
        self._wake.set()
        return seq

    def decode(self, handoff: Handoff) -> Sequence:
        """Admit a handoff; its stream yields the tokens after the first."""
        self._need_role(Role.DECODE)
        self._check_fits(handoff.request)
        seq = Sequence(handoff.request, list(handoff.prompt), first_token=handoff.first_token)
        self._admits.append((seq, handoff))
        self._wake.set()
        return seq

    def generate(self, req: Request) -> Sequence:
        """Prefill and decode here (mono); its stream yields every token."""
        self._need_role(Role.MONO)
        self._check_fits(req)
        seq = Sequence(req, list(req.prompt))
        self._prefills.append(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._wake.set()

    def load(self) -> dict[str, int]:
        waiting = [s.req for s in self._prefills] + [s.req for s, _ in self._admits]
        return {"waiting": len(waiting), "running": len(self._active),
                "waiting_tokens": sum(len(r.prompt) for r in waiting),
                "free_pages": self.cache.available, "cached_blocks": self.cache.cached_blocks}

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not (self._prefills or self._admits or self._active):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._prefills:
                    await self._prefill_step()
                if self._admits:
                    await self._admit_step()
                if self._active:
                    await self._decode_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the engine: fail what was in the step
                log.exception("engine step failed")
                for seq in self._active + self._stepping:
                    self._fail(seq, KVPoolError("the engine step failed; see the engine log"))
            self._stepping = []

    def _pages_needed(self, seq: Sequence) -> int:
        bt = self.cfg.block_tokens
        total = len(seq.req.prompt) + (0 if self.role is Role.PREFILL else seq.req.max_tokens)
        return (total + bt - 1) // bt

    def _reserve(self, seq: Sequence, reusable: list[BlockKey], busy: bool) -> bool:
        """Pages for ``seq``: cached ones for its leading blocks, fresh ones for the rest.
        False when they must wait for running requests; a request that can never fit fails."""
        local = self.cache.lookup(reusable)
        try:
            fresh = self.cache.allocate(self._pages_needed(seq) - len(local))
        except CacheFull as exc:
            self.cache.release(local)
            if busy:
                return False
            self._fail(seq, exc)
            return True
        seq.pages, seq.cached = local + fresh, len(local)
        return True

    async def _fetch(self, seq: Sequence, reusable: list[BlockKey]) -> None:
        """Extend the cached prefix from the pool; stop at the first block that fails."""
        n = seq.cached
        if self.adapter is None or n >= len(reusable):
            return
        with tracing.use(seq.req.request_id):  # the pool calls carry the request's id
            hit = min(await self.adapter.match(reusable), len(reusable))
            if hit > n:
                seq.fetched = await self.adapter.fetch(reusable[n:hit], seq.pages[n:hit])
        if hit > n:
            self._publish(reusable, seq.pages, n, n + seq.fetched, Reason.LOADED)
            seq.cached = n + seq.fetched

    def _publish(self, keys: list[BlockKey], pages: list[int], start: int, end: int,
                 reason: Reason) -> None:
        """Pages ``start:end`` of a request hold its blocks: reusable, and told as events."""
        for i in range(start, end):
            self.cache.publish(pages[i], keys[i], keys[i - 1] if i else None, reason)

    async def _prefill_step(self) -> None:
        bt = self.cfg.block_tokens
        batch: list[Sequence] = []
        while self._prefills and len(batch) < self.cfg.max_batch:
            seq = self._prefills[0]
            if seq.cancelled:
                self._prefills.popleft()
                continue
            seq.keys = block_keys(self.ns, seq.req.prompt)
            reusable = seq.keys[:(len(seq.req.prompt) - 1) // bt]  # the last token is always computed
            if not self._reserve(seq, reusable, busy=bool(batch or self._active or self._stores)):
                break
            self._prefills.popleft()
            if seq.pages:
                batch.append(seq)
        self._stepping = batch
        if not batch:
            if self._prefills and self._stores and not self._active:  # pages held by writes
                await self._stores.any_done()
            return
        await asyncio.gather(*(self._fetch(s, s.keys[:(len(s.req.prompt) - 1) // bt]) for s in batch))
        loop = asyncio.get_running_loop()

        def compute() -> None:
            for seq in batch:
                try:
                    logits = self.model.prefill(self.cache, seq.pages, seq.req.prompt, seq.cached * bt)
                    assert logits is not None
                    token = sample(logits, seq.req.sampling, 0)
                except Exception as exc:  # noqa: BLE001 - reported to the request
                    loop.call_soon_threadsafe(self._prefill_failed, seq, exc)
                else:
                    loop.call_soon_threadsafe(self._prefilled, seq, token)

        await loop.run_in_executor(self._compute, compute)

    def _prefill_failed(self, seq: Sequence, exc: BaseException) -> None:
        self.cache.release(seq.pages)
        seq.pages = []
        self._fail(seq, exc if isinstance(exc, KVPoolError) else KVPoolError(f"prefill failed: {exc}"))

    def _prefilled(self, seq: Sequence, token: int) -> None:
        """The first token is known; the new full blocks (and, for a decode engine to fetch,
        the trailing partial one) start on their way to the pool."""
        bt = self.cfg.block_tokens
        full = len(seq.req.prompt) // bt
        new_keys, new_pages = seq.keys[seq.cached:full], seq.pages[seq.cached:full]
        self._publish(seq.keys, seq.pages, seq.cached, full, Reason.COMPUTED)
        seq.tokens.append(token)
        seq.first_token = token
        self._count(seq)
        prefill_ms = (time.perf_counter() - seq.started) * 1e3
        if self.role is Role.MONO:
            self._store(new_keys, new_pages, seq.parent, seq.req.request_id)
            seq.out.put_nowait(token)
            self._active.append(seq)
            self._finish_if_done(seq)
            return
        partial = len(seq.req.prompt) % bt
        partial_key = None
        if partial and self.cfg.partial_block == "fetch":  # mono decodes into this page: never stored
            # a leaf under the last full block, named by its tokens like any block
            partial_key = chain(seq.keys[full - 1] if full else self.ns.root(), seq.req.prompt[full * bt:])
            new_keys, new_pages = new_keys + [partial_key], new_pages + [seq.pages[full]]
        handoff = Handoff(seq.req.request_id, seq.req.prompt, token, [k.hex() for k in seq.keys],
                          seq.req.max_tokens, seq.req.sampling.temperature, seq.req.sampling.seed,
                          seq.cached * bt, seq.fetched * bt, prefill_ms,
                          partial_key.hex() if partial_key else None)
        task = self._store(new_keys, new_pages, seq.parent, seq.req.request_id)
        pages, seq.pages = seq.pages, []
        assert seq.first is not None
        seq.first.set_result(token)

        def hand_off(_: object) -> None:
            self.cache.release(pages)
            assert seq.handoff is not None
            if not seq.handoff.done():
                seq.handoff.set_result(handoff)
            self._wake.set()

        task.add_done_callback(hand_off)

    def _store(self, keys: list[BlockKey], pages: list[int],
               parent: BlockKey | None, request_id: str | None = None) -> asyncio.Task[None]:
        """Write pages as a chain of blocks under ``parent`` (the last reused block)."""
        self.cache.retain(pages)

        async def write() -> None:
            try:
                if self.adapter is not None and keys:
                    with tracing.use(request_id):
                        stored = await self.adapter.store(keys, pages, parent)
                    self.totals["blocks_stored"] += stored
            finally:
                self.cache.release(pages)

        return self._stores.spawn(write(), name="engine-store")

    def _count(self, seq: Sequence) -> None:
        self.totals["requests"] += 1
        self.totals["prompt_tokens"] += len(seq.req.prompt)
        self.totals["reused_tokens"] += seq.cached * self.cfg.block_tokens
        self.totals["blocks_fetched"] += seq.fetched

    async def _admit_step(self) -> None:
        bt = self.cfg.block_tokens
        batch: list[Sequence] = []
        handoffs: list[tuple[Sequence, Handoff]] = []
        while self._admits:
            seq, handoff = self._admits[0]
            if seq.cancelled:
                self._admits.popleft()
                continue
            seq.keys = block_keys(self.ns, seq.req.prompt)
            if [k.hex() for k in seq.keys] != list(handoff.keys):
                self._admits.popleft()
                self._fail(seq, BadRequest(
                    "the handoff's block keys differ from this engine's: the prefill engine runs "
                    "another model, dtype, layout or salt; pair engines that serve the same model"))
                continue
            full = seq.keys[:len(seq.req.prompt) // bt]
            if not self._reserve(seq, full, busy=bool(batch or self._active or self._stores)):
                break
            self._admits.popleft()
            if seq.pages:
                batch.append(seq)
                handoffs.append((seq, handoff))
        self._stepping = batch
        if not batch:
            if self._admits and self._stores and not self._active:  # pages held by writes
                await self._stores.any_done()
            return
        await asyncio.gather(*(self._fetch(s, s.keys[:len(s.req.prompt) // bt]) for s in batch))
        await asyncio.gather(*(self._fetch_partial(s, h) for s, h in handoffs))

        def compute() -> None:  # whatever could not be fetched, the partial block included
            for seq in batch:
                if not seq.partial_fetched:
                    self.model.prefill(self.cache, seq.pages, seq.req.prompt, seq.cached * bt)

        await asyncio.get_running_loop().run_in_executor(self._compute, compute)
        for seq in batch:
            full = len(seq.req.prompt) // bt
            keys, pages = seq.keys[seq.cached:full], seq.pages[seq.cached:full]
            self._publish(seq.keys, seq.pages, seq.cached, full, Reason.COMPUTED)
            # blocks recomputed here go back to the pool
            self._store(keys, pages, seq.parent, seq.req.request_id)
            self._count(seq)
            assert seq.first_token is not None
            seq.tokens.append(seq.first_token)
            self._active.append(seq)
            self._finish_if_done(seq)

    async def _fetch_partial(self, seq: Sequence, handoff: Handoff) -> None:
        """Fetch the trailing partial block when every full block is here; otherwise (or on a
        miss) it is recomputed with the rest. Its bytes equal a recomputation's either way."""
        full = len(seq.req.prompt) // self.cfg.block_tokens
        if (self.adapter is None or not handoff.partial_key or seq.cached < full
                or self.cfg.partial_block != "fetch"):
            return
        with tracing.use(seq.req.request_id):
            got = await self.adapter.fetch([bytes.fromhex(handoff.partial_key)], [seq.pages[full]])
        seq.partial_fetched = got == 1

    async def _decode_step(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._retire(seq)
        live = list(self._active)
        if not live:
            return
        rows = [DecodeRow(s.pages, s.tokens[-1], len(s.tokens) - 1) for s in live]

        def compute() -> list[int]:
            logits = self.model.decode(self.cache, rows)
            return [sample(logits[j], s.req.sampling, s.generated) for j, s in enumerate(live)]

        tokens = await asyncio.get_running_loop().run_in_executor(self._compute, compute)
        for seq, token in zip(live, tokens):
            if seq.cancelled:
                continue
            seq.tokens.append(token)
            seq.out.put_nowait(token)
            self._finish_if_done(seq)

    def _finish_if_done(self, seq: Sequence) -> None:
        if seq.generated >= seq.req.max_tokens:
            seq.out.put_nowait(None)
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
        if seq.pages:
            self.cache.release(seq.pages)
            seq.pages = []

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._retire(seq)
        for fut in (seq.first, seq.handoff):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # whoever waits sees it; nobody waiting is not an error
        seq.out.put_nowait(exc)
