"""Token selection: greedy by default, or temperature sampling that is a pure function of
(logits, seed, step), so a decode engine continues a prefill engine's request exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpool.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature}")


def sample(logits: torch.Tensor, sampling: Sampling, step: int) -> int:
    """The token for one row of logits; ``step`` counts the tokens this request generated."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits.float()))
    gen = torch.Generator().manual_seed((sampling.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
