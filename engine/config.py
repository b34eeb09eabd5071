"""Engine configuration: the model's shape and the engine's knobs, as frozen dataclasses."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import xxhash

from kvpool.config import doc
from kvpool.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer; with ``seed`` it fully determines the weights."""

    name: str = doc("tiny", "Human-readable model name; part of the pool namespace.")
    layers: int = doc(2, "Number of transformer blocks.")
    hidden: int = doc(64, "Width of the residual stream.")
    heads: int = doc(4, "Query heads.")
    kv_heads: int = doc(2, "Key/value heads (grouped-query attention); divides heads.")
    head_dim: int = doc(16, "Width of one attention head.")
    ffn: int = doc(128, "Width of the SwiGLU MLP.")
    vocab: int = doc(256, "Vocabulary size; 256 covers the byte-level tokenizer.")
    max_positions: int = doc(8192, "Longest sequence (prompt and output) the rotary table covers.")
    rope_theta: float = doc(10000.0, "Base of the rotary embedding frequencies.")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    dtype: str = doc("float32", "Weights, activations and KV cache element type.")
    seed: int = doc(0, "Seed of the deterministic random weights (ignored for checkpoints).")

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def fingerprint(self) -> str:
        """A short hash of every field: two configs share it only if they are the same model."""
        body = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return xxhash.xxh3_64_hexdigest(body)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"unknown model config key(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(names))}")
        return cls(**values)


# Named sizes: the tests' tiny model, the demo's, and the benchmark's (its 4096-token
# prefill takes about a second on one thread of this project's 2-core VM).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(name="small", layers=4, hidden=256, heads=8, kv_heads=2, head_dim=32,
                         ffn=704),
    "bench": ModelConfig(name="bench", layers=2, hidden=768, heads=4, kv_heads=2, head_dim=64,
                         ffn=2048),
}


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs its model against the pool."""

    block_tokens: int = doc(16, "Tokens per page of the KV cache, and per pool block.")
    num_pages: int = doc(512, "Pages in the engine's KV cache.")
    max_batch: int = doc(8, "Prompts prefilled per step; sequences decoded per step is unbounded.")
    torch_threads: int = doc(1, "torch intra-op threads of the engine process.")
    salt: str = doc("", "Salt of the pool namespace; engines share blocks only with equal salts.")
    partial_block: str = doc("fetch", "How a decode engine gets a prompt's trailing partial block: "
                             "'fetch' (the prefill engine writes it as a leaf block keyed by its "
                             "tokens) or 'recompute' (from the tokens; nothing extra in the pool).")

    def __post_init__(self) -> None:
        if self.partial_block not in ("fetch", "recompute"):
            raise ConfigError(f"partial_block must be 'fetch' or 'recompute', got {self.partial_block!r}")
        if self.block_tokens <= 0 or self.num_pages <= 0:
            raise ConfigError("block_tokens and num_pages must be positive")
