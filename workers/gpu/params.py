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
    # transformers' rules over each row's generated tokens (workers/gpu/repetition.py):
    # no n-gram of this size twice (0: off), and its repetition penalty (1.0: off).
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.no_repeat_ngram_size < 0 or self.repetition_penalty <= 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 and repetition_penalty > 0")

    @property
    def repeat_rules(self) -> tuple[int, float]:
        """(no_repeat_ngram_size, repetition_penalty): part of a decode graph's identity."""
        return (self.no_repeat_ngram_size, self.repetition_penalty)


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
