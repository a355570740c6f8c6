"""Where each row's KV region sits in the cache: the pure (torch-free) allocator of a rolling
generation, where finished rows give their region back and waiting prompts take one. The cache
tensors themselves are workers/gpu/kv_cache.py; who is admitted when is workers/gpu/scheduler.py.
"""

from __future__ import annotations


class FreeRegions:
    """First-fit allocator of token regions in ``[0, capacity)``: the KV cache of a rolling
    generation, where finished rows give their region back and waiting prompts take one.

    Free space is kept as sorted, disjoint, non-touching ``(start, end)`` intervals: a region
    given back merges with its free neighbours, so space two finished rows leave side by side
    can hold one longer prompt."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []

    def take(self, size: int) -> int | None:
        """The start of a region of ``size`` tokens at the lowest free offset that holds it,
        or None when no free interval is long enough."""
        if size < 1:
            raise ValueError("a region needs at least one token")
        for i, (start, end) in enumerate(self.free):
            if end - start >= size:
                if end - start == size:
                    del self.free[i]
                else:
                    self.free[i] = (start + size, end)
                return start
        return None

    def give(self, start: int, size: int) -> None:
        """Give back ``[start, start + size)``, which must be taken (not free, inside capacity)."""
        end = start + size
        if size < 1 or start < 0 or end > self.capacity:
            raise ValueError(f"region [{start}, {end}) is not inside [0, {self.capacity})")
        i = 0
        while i < len(self.free) and self.free[i][1] <= start:
            i += 1
        if i < len(self.free) and self.free[i][0] < end:
            raise ValueError(f"region [{start}, {end}) overlaps free space {self.free[i]}")
        if i > 0 and self.free[i - 1][1] == start:  # touches the free interval before: merge
            i -= 1
            start = self.free.pop(i)[0]
        if i < len(self.free) and self.free[i][0] == end:  # and the one after
            end = self.free.pop(i)[1]
        self.free.insert(i, (start, end))

    def free_tokens(self) -> int:
        return sum(end - start for start, end in self.free)
