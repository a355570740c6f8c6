"""The scheduler: the pure core of the GPU worker's batching, plain Python on plain numbers (no
torch, no Celery).

* when a partial chunk has waited long enough (``seconds_until_ready``);
* which pending prompts go into the next chunk (``plan_chunk``; ``plan_token_chunk`` when the
  KV cache is planned in tokens: as many prompts as the token budget holds);
* how a chunk that ran out of memory is split (``halves``) and how big later chunks may be
  (``ChunkSizer``: halves after an OOM, grows back after chunks succeed);
* which pieces one chunk's prefill is computed in (``prefill_groups``);
* which waiting prompts join a rolling generation now (``admit``; their KV regions come from
  workers/gpu/kv_regions.py), and, with folded prefill, how the joining prompts are spread over
  the next decode steps (``fold_groups``).

Cutting long transcripts into pieces is the summarise step's business: workers/summarise/split.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from tubesum.workers.gpu.kv_regions import FreeRegions

T = TypeVar("T")

# While prompts of other videos wait, one video's prompts take at most this share of a chunk's
# prompt cap (at least one prompt): the pieces of a long transcript no longer hold the GPU alone (a
# 1 MB transcript kept 5 small videos waiting 146 s, a 5 MB one over 15 min). Fraction.
MAX_VIDEO_SHARE = 0.5

# Consecutive chunks that must succeed at the lowered size limit before it doubles again
# (towards the configured size) after an out-of-memory error. Chunks.
REGROW_AFTER_SUCCESSES = 4


@dataclass(frozen=True)
class Pending:
    """What the planner needs to know about one prompt waiting for the GPU."""

    arrived: float  # monotonic seconds when it was queued
    prompt_tokens: int
    continuation: bool = False  # a later step (reduce) of a video already in progress
    video: int | None = None  # the video the prompt belongs to (None: a video of its own)


def seconds_until_ready(*, pending: int, limit: int, oldest_arrival: float, now: float, wait_s: float) -> float:
    """0 when a chunk should run now (a full chunk is waiting, or the oldest prompt has waited
    ``wait_s``); otherwise how much longer to wait for more prompts. Seconds."""
    if pending <= 0:
        return math.inf
    if pending >= limit:
        return 0.0
    return max(0.0, oldest_arrival + wait_s - now)


def priority_order(pending: Sequence[Pending], *, limit: int, max_share: float = MAX_VIDEO_SHARE) -> list[int]:
    """Indices of all pending prompts in the order the next chunk takes them: continuations of
    videos already in progress first (they finish a video; its task is waiting), then arrival
    order (first come, first served); but one video's prompts take at most
    ``ceil(limit * max_share)`` places ahead of other videos' prompts, the rest of them going last
    (they still fill places that nobody else wants). So a long transcript's pieces share every
    chunk with new videos instead of filling it."""
    order = sorted(range(len(pending)), key=lambda i: (not pending[i].continuation, pending[i].arrived, i))
    cap = max(1, math.ceil(max(1, limit) * max_share))
    ahead: list[int] = []
    behind: list[int] = []
    taken: dict[object, int] = {}
    for i in order:
        video: object = pending[i].video if pending[i].video is not None else ("prompt", i)
        if taken.get(video, 0) < cap:
            taken[video] = taken.get(video, 0) + 1
            ahead.append(i)
        else:
            behind.append(i)
    return ahead + behind


def plan_chunk(pending: Sequence[Pending], limit: int) -> list[int]:
    """Indices of the prompts for the next chunk, at most ``limit``, in ``priority_order``."""
    return sorted(priority_order(pending, limit=limit)[: max(1, limit)])


def plan_token_chunk(
    pending: Sequence[Pending], *, max_new_tokens: int, token_capacity: int, max_prompts: int
) -> list[int]:
    """Indices of the prompts for the next chunk when KV memory is planned in tokens: in
    ``priority_order`` (continuations, then arrival, one video's share capped), as many as fit
    both ``max_prompts`` and the token budget (each prompt needs its tokens + ``max_new_tokens``
    of KV cache). One video's share is of the chunk the budget holds, not of ``max_prompts``.
    Stops at the first prompt that does not fit (first come, first served: no long prompt waits
    forever behind shorter ones). Never empty: a first prompt beyond the budget goes alone, and
    the engine fails it with the numbers."""
    arrival = priority_order(pending, limit=max_prompts, max_share=1.0)
    fits = len(_fitting(arrival, pending, max_new_tokens=max_new_tokens, budget=token_capacity, cap=max_prompts))
    order = priority_order(pending, limit=fits)
    return sorted(_fitting(order, pending, max_new_tokens=max_new_tokens, budget=token_capacity, cap=max_prompts))


def _fitting(order: list[int], pending: Sequence[Pending], *, max_new_tokens: int, budget: int, cap: int) -> list[int]:
    """The longest prefix of ``order`` (at most ``cap``, at least one) within ``budget`` tokens."""
    chosen: list[int] = []
    used = 0
    for i in order[: max(1, cap)]:
        need = pending[i].prompt_tokens + max_new_tokens
        if chosen and used + need > budget:
            break
        chosen.append(i)
        used += need
    return chosen


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """Split a chunk that did not fit into two chunks (the first one gets the odd item)."""
    if len(items) < 2:
        raise ValueError("a chunk of one prompt cannot be split")
    mid = (len(items) + 1) // 2
    return list(items[:mid]), list(items[mid:])


class ChunkSizer:
    """How many prompts a chunk may hold, learnt from out-of-memory errors.

    Starts at the configured size. An OOM at size n caps chunks at n // 2 (the split halves then
    run at about that size). After REGROW_AFTER_SUCCESSES chunks in a row succeed at the cap,
    it doubles, up to the configured size: an OOM is often one unlucky chunk (longest prompts,
    a fragmented moment), not a property of the card for the rest of the worker's life."""

    def __init__(self, configured: int, *, regrow_after: int = REGROW_AFTER_SUCCESSES) -> None:
        if configured < 1:
            raise ValueError("chunk size must be >= 1")
        self.configured = configured
        self.regrow_after = regrow_after
        self.limit = configured
        self.streak = 0  # chunks in a row that succeeded at the current limit

    def on_success(self, n: int) -> None:
        if self.limit >= self.configured or n < self.limit:
            return  # a smaller chunk says nothing about whether the cap could be raised
        self.streak += 1
        if self.streak >= self.regrow_after:
            self.limit, self.streak = min(self.configured, self.limit * 2), 0

    def on_oom(self, n: int) -> None:
        self.limit, self.streak = max(1, min(self.limit, n // 2)), 0


def prefill_groups(lengths: Sequence[int], *, token_budget: int) -> list[tuple[int, int]]:
    """[start, end) runs of whole prompts, in input order, each at most ``token_budget`` tokens
    (a longer prompt gets a run of its own): the pieces one chunk's prefill is computed in, so its
    activations stay bounded whatever the chunk size."""
    groups: list[tuple[int, int]] = []
    start, n = 0, len(lengths)
    while start < n:
        end, used = start, 0
        while end < n and (end == start or used + lengths[end] <= token_budget):
            used += lengths[end]
            end += 1
        groups.append((start, end))
        start = end
    return groups


def admit(waiting: list[int], sizes: Sequence[int], regions: FreeRegions, *, slots: int) -> list[tuple[int, int]]:
    """The waiting prompts that join a rolling generation now: ``(prompt index, region start)``
    in input order, while a row slot is free and the next prompt's region (``sizes[i]`` tokens)
    fits. The first that does not fit waits, and every prompt after it too (input order: a long
    prompt is never overtaken for ever by shorter ones). Takes them off the front of
    ``waiting`` and their regions from ``regions``."""
    joined: list[tuple[int, int]] = []
    while waiting and len(joined) < slots:
        start = regions.take(sizes[waiting[0]])
        if start is None:
            break
        joined.append((waiting.pop(0), start))
    return joined


def fold_groups(lengths: Sequence[int], *, steps: int, min_tokens: int) -> list[tuple[int, int]]:
    """[start, end) runs of whole prompts, in input order, one per mixed decode step: the prompts
    that join a rolling generation, prefilled inside the next decode steps (their tokens folded
    into the step's projections) instead of in a pass of their own while the decode waits.
    Spread evenly over at most ``steps`` steps (the joiners are in before the next admission),
    each run at least ``min_tokens`` tokens (smaller slices would not fill the card's GEMMs), a
    prompt longer than that a run of its own."""
    if not lengths:
        return []
    per_step = max(min_tokens, math.ceil(sum(lengths) / max(1, steps)))
    return prefill_groups(lengths, token_budget=per_step)
