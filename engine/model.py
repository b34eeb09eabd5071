"""A small decoder-only transformer (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU) whose arithmetic does not depend on how the work is split.

That is what makes a block fetched from the pool as good as one computed here:
- a prompt is computed in chunks aligned to pages; chunk i attends to the cache of
  chunks < i plus itself, so a page's bytes depend only on the tokens up to its end;
- torch's CPU matmuls round differently for different row counts (a one-row product even
  takes another kernel), so every linear runs on tiles of a fixed row count: a whole page
  for prompt chunks, ``DECODE_TILE`` rows for decode steps. A row's result does not depend
  on the other rows of its tile, nor on its place in it (tests/e2e/test_model.py checks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import xxhash

from engine.cache import PagedKVCache
from engine.config import ModelConfig
from engine.sampling import Sampling, sample
from kvpool.errors import BadRequest, ConfigError

DECODE_TILE = 8


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, tile: int) -> torch.Tensor:
    """``x @ weight.T`` computed ``tile`` rows at a time, the last tile zero-padded."""
    rows = x.shape[0]
    pad = (-rows) % tile
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    if x.shape[0] == tile:
        return F.linear(x, weight)[:rows]
    return torch.cat([F.linear(t, weight) for t in x.split(tile)])[:rows]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@dataclass
class Layer:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [2 ffn, hidden]
    w_down: torch.Tensor


@dataclass(frozen=True, slots=True)
class DecodeRow:
    """One sequence's step: its pages, the token it feeds, that token's position."""

    pages: Sequence[int]
    token: int
    position: int


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], model_id: str) -> None:
        self.cfg = cfg
        self.model_id = model_id  # names the weights: config fingerprint or checkpoint hash
        dt = getattr(torch, cfg.dtype)
        w = {k: v.to(dt).contiguous() for k, v in weights.items()}
        self.embed, self.final_norm, self.lm_head = w["embed"], w["final_norm"], w["lm_head"]
        self.layers = [Layer(*(w[f"layers.{i}.{n}"] for n in Layer.__dataclass_fields__))
                       for i in range(cfg.layers)]
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.max_positions, dtype=torch.float64), inv)
        self.cos, self.sin = angles.cos().to(dt), angles.sin().to(dt)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def random(cls, cfg: ModelConfig) -> "Transformer":
        """Deterministic random weights from ``cfg.seed``."""
        gen = torch.Generator().manual_seed(cfg.seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

        q_out = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        w: dict[str, torch.Tensor] = {"embed": torch.randn(cfg.vocab, cfg.hidden, generator=gen)}
        for i in range(cfg.layers):
            w[f"layers.{i}.attn_norm"] = 1 + 0.1 * torch.randn(cfg.hidden, generator=gen)
            w[f"layers.{i}.wqkv"] = rand(q_out, cfg.hidden)
            w[f"layers.{i}.wo"] = rand(cfg.hidden, cfg.heads * cfg.head_dim)
            w[f"layers.{i}.mlp_norm"] = 1 + 0.1 * torch.randn(cfg.hidden, generator=gen)
            w[f"layers.{i}.w_gate_up"] = rand(2 * cfg.ffn, cfg.hidden)
            w[f"layers.{i}.w_down"] = rand(cfg.hidden, cfg.ffn)
        w["final_norm"] = torch.ones(cfg.hidden)
        w["lm_head"] = rand(cfg.vocab, cfg.hidden)
        return cls(cfg, w, f"{cfg.name}-{cfg.fingerprint()}")

    def save(self, path: str | Path) -> None:
        weights = {"embed": self.embed, "final_norm": self.final_norm, "lm_head": self.lm_head}
        for i, layer in enumerate(self.layers):
            for name in Layer.__dataclass_fields__:
                weights[f"layers.{i}.{name}"] = getattr(layer, name)
        torch.save({"config": dataclasses.asdict(self.cfg), "weights": weights}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Transformer":
        """A checkpoint written by ``save``; its model id hashes the file's bytes."""
        raw = Path(path).read_bytes()
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            cfg = ModelConfig.from_dict(blob["config"])
            return cls(cfg, blob["weights"], f"{cfg.name}-ckpt-{xxhash.xxh3_64_hexdigest(raw)}")
        except (KeyError, RuntimeError, TypeError) as exc:
            raise ConfigError(f"{path} is not a kvpool engine checkpoint "
                              f"(expected {{'config', 'weights'}}): {exc}") from None

    # -- forward --------------------------------------------------------------------------

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [rows, heads, head_dim] at ``positions`` [rows]."""
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def _attend(self, cache: PagedKVCache, layer: int, pages: Sequence[int], start: int,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Write the K, V of positions ``start ..`` into the pages, then attend causally over
        everything up to them. q [n, heads, dim], k/v [n, kv_heads, dim] -> [n, heads*dim].
        ``context`` [2, kv_heads, max_positions, dim], when given, already holds this layer's
        K and V before ``start`` (a prefill keeps it across chunks instead of gathering the
        pages for every chunk) and receives the new rows too."""
        cfg, bt = self.cfg, cache.block_tokens
        n = q.shape[0]
        pos = start
        while pos < start + n:  # the rows may straddle a page boundary (decode never does)
            page, off = pages[pos // bt], pos % bt
            m = min(bt - off, start + n - pos)
            rows = slice(pos - start, pos - start + m)
            cache.kv[page, layer, 0, :, off:off + m] = k[rows].transpose(0, 1)
            cache.kv[page, layer, 1, :, off:off + m] = v[rows].transpose(0, 1)
            pos += m
        length = start + n
        if context is not None:
            context[0, :, start:length] = k.transpose(0, 1)
            context[1, :, start:length] = v.transpose(0, 1)
            keys, vals = context[0, :, :length], context[1, :, :length]
        else:
            keys, vals = self._gather(cache, layer, pages, length)
        group = cfg.heads // cfg.kv_heads
        qg = q.view(n, cfg.kv_heads, group, cfg.head_dim).permute(1, 2, 0, 3)
        qg = qg.reshape(cfg.kv_heads, group * n, cfg.head_dim)
        scores = torch.bmm(qg, keys.transpose(1, 2)) * self.scale  # [kv_heads, group*n, length]
        if n > 1:  # causal within the chunk; every earlier position is visible to all rows
            future = torch.ones(n, n, dtype=torch.bool).triu(1).repeat(group, 1)
            scores[:, :, start:].masked_fill_(future, float("-inf"))
        out = torch.bmm(torch.softmax(scores, dim=-1), vals)  # [kv_heads, group*n, dim]
        out = out.view(cfg.kv_heads, group, n, cfg.head_dim).permute(2, 0, 1, 3)
        return out.reshape(n, cfg.heads * cfg.head_dim)

    def _gather(self, cache: PagedKVCache, layer: int, pages: Sequence[int], length: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [kv_heads, length, dim] of one layer from the pages. Whole pages are
        gathered (contiguous runs), then the heads put first: index_select on the strided
        per-layer view measured 50x slower."""
        cfg = self.cfg
        used = torch.as_tensor(list(pages[:(length + cache.block_tokens - 1) // cache.block_tokens]))
        kv = cache.kv[used, layer].permute(1, 2, 0, 3, 4).reshape(2, cfg.kv_heads, -1, cfg.head_dim)
        return kv[0, :, :length], kv[1, :, :length]

    def _block(self, layer: Layer, x: torch.Tensor, tile: int, positions: torch.Tensor,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
        qkv = tiled_linear(h, layer.wqkv, tile)
        nq, nk = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        q = self._rotate(qkv[:, :nq].view(-1, cfg.heads, cfg.head_dim), positions)
        k = self._rotate(qkv[:, nq:nq + nk].view(-1, cfg.kv_heads, cfg.head_dim), positions)
        v = qkv[:, nq + nk:].view(-1, cfg.kv_heads, cfg.head_dim)
        x = x + tiled_linear(attend(q, k, v), layer.wo, tile)
        h = rms_norm(x, layer.mlp_norm, cfg.norm_eps)
        gate, up = tiled_linear(h, layer.w_gate_up, tile).chunk(2, dim=-1)
        return x + tiled_linear(F.silu(gate) * up, layer.w_down, tile)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(rms_norm(x, self.final_norm, self.cfg.norm_eps), self.lm_head, DECODE_TILE)

    @torch.inference_mode()
    def prefill(self, cache: PagedKVCache, pages: Sequence[int], tokens: Sequence[int],
                start: int) -> torch.Tensor | None:
        """Compute the cache of ``tokens[start:]`` (``start`` on a page boundary; earlier
        positions already cached) page by page; the logits of the last token, or None when
        there was nothing to compute."""
        bt = cache.block_tokens
        if start % bt:
            raise BadRequest(f"prefill must start on a page boundary, got {start}")
        if len(tokens) > self.cfg.max_positions:
            raise BadRequest(f"{len(tokens)} tokens exceed max_positions {self.cfg.max_positions}")
        ids = torch.as_tensor(list(tokens), dtype=torch.long)
        if start >= len(tokens):
            return None
        cfg = self.cfg
        # one fixed shape, so every prefill's attention sees the same strides
        context = torch.empty(cfg.layers, 2, cfg.kv_heads, cfg.max_positions, cfg.head_dim,
                              dtype=cache.kv.dtype)
        for i in range(cfg.layers if start else 0):
            keys, vals = self._gather(cache, i, pages, start)
            context[i, 0, :, :start], context[i, 1, :, :start] = keys, vals
        x = None
        for s in range(start, len(tokens), bt):
            chunk = ids[s:s + bt]
            positions = torch.arange(s, s + len(chunk))
            x = self.embed[chunk]
            for i, layer in enumerate(self.layers):
                x = self._block(layer, x, bt, positions, lambda q, k, v, i=i, s=s: self._attend(
                    cache, i, pages, s, q, k, v, context[i]))
        return None if x is None else self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, cache: PagedKVCache, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """One step for several sequences: logits [len(rows), vocab]."""
        ids = torch.as_tensor([r.token for r in rows], dtype=torch.long)
        positions = torch.as_tensor([r.position for r in rows], dtype=torch.long)
        x = self.embed[ids]
        for i, layer in enumerate(self.layers):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                return torch.cat([self._attend(cache, i, r.pages, r.position, q[j:j + 1],
                                               k[j:j + 1], v[j:j + 1]) for j, r in enumerate(rows)])
            x = self._block(layer, x, DECODE_TILE, positions, attend)
        return self._logits(x)


def generate(model: Transformer, prompt: Sequence[int], max_tokens: int, block_tokens: int,
             sampling: Sampling | None = None) -> list[int]:
    """Monolithic generation of one request with a private cache: the reference that every
    split of the work (prefix reuse, prefill on one process and decode on another) matches."""
    sampling = sampling or Sampling()
    total = len(prompt) + max_tokens
    cache = PagedKVCache(model.cfg, (total + block_tokens - 1) // block_tokens, block_tokens)
    pages = cache.allocate(cache.num_pages)
    logits = model.prefill(cache, pages, prompt, 0)
    assert logits is not None, "an empty prompt has nothing to continue"
    out = [sample(logits, sampling, 0)]
    while len(out) < max_tokens:
        pos = len(prompt) + len(out) - 1
        logits = model.decode(cache, [DecodeRow(pages, out[-1], pos)])[0]
        out.append(sample(logits, sampling, len(out)))
    return out
