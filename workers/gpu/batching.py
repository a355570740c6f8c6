"""The pure core of the GPU worker's batching: plain Python on plain numbers, no torch, no Celery.

* when a partial chunk has waited long enough (``seconds_until_ready``);
* which pending prompts go into the next chunk (``plan_chunk``);
* how a chunk that ran out of memory is split (``halves``) and how big later chunks may be
  (``ChunkSizer``: remembers the largest size that worked).

Cutting long transcripts into pieces is the summarise step's business: workers/summarise/split.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

@dataclass(frozen=True)
class Pending:
    """What the planner needs to know about one prompt waiting for the GPU."""

    arrived: float  # monotonic seconds when it was queued
    prompt_tokens: int
    continuation: bool = False  # a later step (reduce) of a video already in progress


def seconds_until_ready(*, pending: int, limit: int, oldest_arrival: float, now: float, wait_s: float) -> float:
    """0 when a chunk should run now (a full chunk is waiting, or the oldest prompt has waited
    ``wait_s``); otherwise how much longer to wait for more prompts. Seconds."""
    if pending <= 0:
        return math.inf
    if pending >= limit:
        return 0.0
    return max(0.0, oldest_arrival + wait_s - now)


def plan_chunk(pending: Sequence[Pending], limit: int) -> list[int]:
    """Indices of the prompts for the next chunk, at most ``limit``: continuations of videos
    already in progress first (they finish a video; their video's task is waiting), then the
    rest in arrival order (first come, first served)."""
    order = sorted(range(len(pending)), key=lambda i: (not pending[i].continuation, pending[i].arrived, i))
    return sorted(order[: max(1, limit)])


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """Split a chunk that did not fit into two chunks (the first one gets the odd item)."""
    if len(items) < 2:
        raise ValueError("a chunk of one prompt cannot be split")
    mid = (len(items) + 1) // 2
    return list(items[:mid]), list(items[mid:])


class ChunkSizer:
    """How many prompts a chunk may hold, learnt from out-of-memory errors.

    Starts at the configured size. After an OOM at size n, chunks are capped at the largest size
    that has worked below n (or n // 2 before any has): the split halves then teach it more.
    A later OOM at or below the cap lowers it again (longer prompts need more memory)."""

    def __init__(self, configured: int) -> None:
        if configured < 1:
            raise ValueError("chunk size must be >= 1")
        self.configured = configured
        self.smallest_oom: int | None = None  # smallest chunk size that ran out of memory
        self.largest_ok = 0  # largest chunk size that worked, below smallest_oom

    @property
    def limit(self) -> int:
        if self.smallest_oom is None:
            return self.configured
        if self.largest_ok:
            return min(self.configured, self.largest_ok)
        return max(1, min(self.configured, self.smallest_oom // 2))

    def on_success(self, n: int) -> None:
        if self.smallest_oom is None or n < self.smallest_oom:
            self.largest_ok = max(self.largest_ok, n)

    def on_oom(self, n: int) -> None:
        if self.smallest_oom is None or n < self.smallest_oom:
            self.smallest_oom = n
        if self.largest_ok >= self.smallest_oom:
            self.largest_ok = 0  # what worked before was shorter prompts; learn again


# --- the per-chunk log line ---------------------------------------------------------------------
BYTES_PER_GB = 10**9  # peak memory in the log line is in decimal GB, as nvidia-smi's cards are sold


def short_count(n: int) -> str:
    """812, 31k, 310k, 1.2M: token counts at a glance."""
    if n < 1000:
        return str(n)
    if n < 10**6:
        return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n / 1000:.1f}k"
    return f"{n / 10**6:.1f}M"


def chunk_line(number: int, *, videos: int, prompt_tokens: int, generated_tokens: int,
               prefill_s: float | None, decode_s: float | None, wall_s: float,
               peak_memory_bytes: int | None) -> str:
    """One log line per chunk, like vLLM's: ``chunk 12: 256 videos, 310k prompt tok, prefill 6.6 s,
    decode 4.1 s, 3,600 gen tok/s, peak 72 GB``. The hf backend has no prefill/decode split (wall
    time instead); the CPU has no peak memory figure."""
    times = (f"prefill {prefill_s:.1f} s, decode {decode_s:.1f} s" if prefill_s is not None and decode_s is not None
             else f"wall {wall_s:.1f} s")
    rate = generated_tokens / wall_s if wall_s > 0 else 0.0
    peak = "" if peak_memory_bytes is None else f", peak {peak_memory_bytes / BYTES_PER_GB:.0f} GB"
    return (f"chunk {number}: {videos} video{'s' if videos != 1 else ''}, {short_count(prompt_tokens)} prompt tok, "
            f"{times}, {rate:,.0f} gen tok/s{peak}")
