"""Cutting a transcript too long for the model's context on token boundaries, and grouping piece
summaries for the reduce step. Plain Python on plain numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Tokens kept free between the longest prompt plus max_new_tokens and the model's context, so a
# tokenizer's boundary effects never push a prompt over. Tokens.
CONTEXT_MARGIN_TOKENS = 16
# The smallest piece of transcript worth a prompt of its own; below this the model's context is
# too small for the configured prompt and max_new_tokens. Tokens.
MIN_PIECE_TOKENS = 64


def piece_budget(
    *, max_context: int, max_new_tokens: int, template_tokens: int, margin: int = CONTEXT_MARGIN_TOKENS
) -> int:
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
