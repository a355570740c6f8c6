"""What goes into and comes out of one generate() call: plain dataclasses, no torch, so the
batcher, the summarise step and their tests need not import the engine."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class SamplingParams:
    """Greedy decoding knobs (the summaries are deterministic by design)."""

    max_new_tokens: int = 200
    ignore_eos: bool = False  # benchmarks: every prompt generates exactly max_new_tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


@dataclass
class Generation:
    token_ids: list[int]  # new tokens, the stop token included when one ended the row
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


@dataclass
class BatchTimings:
    batch_size: int
    prompt_tokens: int  # real prompt tokens
    padded_prompt_tokens: int  # token slots the GPU computed in prefill
    generated_tokens: int
    prefill_s: float | None
    decode_s: float | None
    wall_s: float
    peak_memory_bytes: int | None
    started_at: datetime
    ended_at: datetime

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0
