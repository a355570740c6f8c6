"""The pure core of the GPU worker's batching: plain Python on plain numbers, no torch, no Celery.

* when a partial chunk has waited long enough (``seconds_until_ready``);
* which pending prompts go into the next chunk (``plan_chunk``; ``plan_token_chunk`` when the
  KV cache is planned in tokens: as many prompts as the token budget holds);
* how a chunk that ran out of memory is split (``halves``) and how big later chunks may be
  (``ChunkSizer``: halves after an OOM, grows back after chunks succeed);
* how a transcript too long for the model context is cut on token boundaries (``piece_budget``,
  ``split_even``) and how piece summaries are grouped for the reduce step (``pack_groups``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Tokens kept free between the longest prompt plus max_new_tokens and the model's context, so a
# tokenizer's boundary effects never push a prompt over. Tokens.
CONTEXT_MARGIN_TOKENS = 16
# The smallest piece of transcript worth a prompt of its own; below this the model's context is
# too small for the configured prompt and max_new_tokens. Tokens.
MIN_PIECE_TOKENS = 64
# Consecutive chunks that must succeed at the lowered size limit before it doubles again
# (towards the configured size) after an out-of-memory error. Chunks.
REGROW_AFTER_SUCCESSES = 4


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


def plan_token_chunk(pending: Sequence[Pending], *, max_new_tokens: int, token_capacity: int,
                     max_prompts: int) -> list[int]:
    """Indices of the prompts for the next chunk when KV memory is planned in tokens: in
    ``plan_chunk``'s order (continuations, then arrival), as many as fit both ``max_prompts`` and
    the token budget (each prompt needs its tokens + ``max_new_tokens`` of KV cache). Stops at
    the first prompt that does not fit (first come, first served: no long prompt waits forever
    behind shorter ones). Never empty: a first prompt beyond the budget goes alone, and the
    engine fails it with the numbers."""
    order = sorted(range(len(pending)), key=lambda i: (not pending[i].continuation, pending[i].arrived, i))
    chosen: list[int] = []
    used = 0
    for i in order[: max(1, max_prompts)]:
        need = pending[i].prompt_tokens + max_new_tokens
        if chosen and used + need > token_capacity:
            break
        chosen.append(i)
        used += need
    return sorted(chosen)


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


def piece_budget(*, max_context: int, max_new_tokens: int, template_tokens: int,
                 margin: int = CONTEXT_MARGIN_TOKENS) -> int:
    """Transcript tokens one prompt may carry: the context minus the summary, the prompt's own
    tokens (instruction, chat template, tags) and a margin."""
    return max_context - max_new_tokens - template_tokens - margin


def split_even(n_tokens: int, budget: int) -> list[tuple[int, int]]:
    """[start, end) token ranges covering ``n_tokens`` in as few pieces of at most ``budget`` as
    possible, of nearly equal length (no tiny last piece). Nothing is left out."""
    if budget < 1:
        raise ValueError("budget must be >= 1")
    if n_tokens <= 0:
        return [(0, 0)]
    count = math.ceil(n_tokens / budget)
    base, extra = divmod(n_tokens, count)
    ranges, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def pack_groups(lengths: Sequence[int], *, budget: int, separator: int) -> list[list[int]]:
    """Consecutive groups of items (their indices) whose lengths, joined with ``separator`` tokens
    between them, fit ``budget``. An item longer than the budget gets a group of its own (the
    caller cuts it on token boundaries)."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, length in enumerate(lengths):
        need = length + (separator if current else 0)
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
            need = length
        current.append(i)
        used += need
    if current:
        groups.append(current)
    return groups
