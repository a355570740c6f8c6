"""CUDA-graph capture and replay of one decode step.

A decode step of an 8B model launches ~1,000 kernels from Python; captured once in a CUDA graph
per bucketed row count (rows padded with dummy rows up to the bucket) and replayed, a token
costs one launch. `DecodeGraph` holds the step's static buffers and its own bookkeeping, and is
given the step's logits function (the model's `decode_logits`); on the CPU (tests) the same step
runs eagerly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tubesum.workers.gpu.kv_cache import KVCache
from tubesum.workers.gpu.repetition import ban_repeated_ngrams, penalise_repeats

# Decode graphs are captured for bucketed row counts (powers of two up to this, then multiples of
# it): a chunk of 187 rows replays the 192-row graph with 5 dummy rows. Rows.
ROW_BUCKET = 32

# One decode step's logits: (tokens [B], pos [B], cu_k [B + 1] int32, cache, max_k) → [B, V].
StepLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KVCache, int], torch.Tensor]


def row_bucket(rows: int) -> int:
    """The row count a decode graph is captured for: powers of two below ROW_BUCKET, then
    multiples of ROW_BUCKET (few captures; at most ROW_BUCKET - 1 dummy rows)."""
    if rows <= ROW_BUCKET:
        return 1 << max(0, rows - 1).bit_length()
    return math.ceil(rows / ROW_BUCKET) * ROW_BUCKET


class DecodeGraph:
    """Static buffers and (on CUDA) a captured graph for one decode step of `rows` rows (a
    bucket: real rows first, dummy rows after; a rolling generation also parks finished rows as
    dummy rows and loads joining rows into any slot). The step also does its own bookkeeping
    (store the pick, advance each row's position and `out` column), so a token costs exactly one
    graph launch from the host."""

    def __init__(
        self,
        step_logits: StepLogits,
        cache: KVCache,
        *,
        device: torch.device,
        rows: int,
        max_k: int,
        suppress: torch.Tensor | None,
        max_new_tokens: int,
        use_graph: bool,
        pool=None,
        repeat: tuple[int, float] = (0, 1.0),
    ) -> None:
        dev = self.device = device
        self.step_logits, self.cache, self.suppress = step_logits, cache, suppress
        self.repeat = repeat  # (no-repeat n-gram size, repetition penalty), baked into the graph
        self.rows, self.max_k, self.max_new_tokens = rows, max_k, max_new_tokens
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)  # [B] last token
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)  # [B] its position
        # [B] the last position a row may reach (its region's last slot; 0 for dummy rows): a row
        # that is done but still in the step writes there, never into the next row's region.
        self.last_pos = torch.zeros(rows, dtype=torch.long, device=dev)
        # [B + 1] each row's offset in the flat cache; dummy rows sit on the scratch slot.
        self.cu_k = torch.full((rows + 1,), cache.scratch, dtype=torch.int32, device=dev)
        self.cu_k[rows] = cache.scratch + 1
        # [B, N + 1]: graph capture runs one step at column 1, which must exist even when N is 1.
        self.out = torch.zeros(rows, max_new_tokens + 1, dtype=torch.long, device=dev)
        # [B] each row's next column of `out`: per row, so a row that joins a rolling generation
        # at a later step writes from column 1 of its own row. Clamped to the last column (a row
        # past its limit, or a dummy row, overwrites it there: tokens past a limit are cut).
        self.row_step = torch.ones(rows, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        if use_graph:
            self._capture(pool)

    def _step(self, step_logits: StepLogits | None = None) -> None:
        fn = step_logits or self.step_logits
        logits = fn(self.tokens, self.pos, self.cu_k, self.cache, self.max_k)  # [B, V]
        if self.suppress is not None:
            logits.index_fill_(1, self.suppress, float("-inf"))
        ngram, penalty = self.repeat  # on the row's own tokens out[:, :row_step]: no host sync
        if penalty != 1.0:
            penalise_repeats(logits, self.out, self.row_step, penalty)
        if ngram:
            ban_repeated_ngrams(logits, self.out, self.row_step, ngram)
        nxt = logits.argmax(dim=-1)  # [B]
        self.out.scatter_(1, self.row_step[:, None], nxt[:, None])
        self.tokens.copy_(nxt)
        torch.minimum(self.pos + 1, self.last_pos, out=self.pos)  # dummy rows stay on scratch
        self.row_step.add_(1).clamp_(max=self.out.shape[1] - 1)

    def _capture(self, pool) -> None:
        # Warm up on a side stream (cuBLAS workspaces, kernel compilation), then record one step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.row_step.fill_(1)
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.row_step.fill_(1)
        self.pos.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self._step()

    def load(self, first: torch.Tensor, pos: list[int], starts: list[int], lengths: list[int]) -> None:
        """Point the first len(pos) rows at a chunk (see `place`); the others become dummy rows."""
        self.park(list(range(len(pos), self.rows)))
        self.place(list(range(len(pos))), first, pos, starts, lengths)

    def place(
        self, slots: list[int], first: torch.Tensor, pos: list[int], starts: list[int], lengths: list[int]
    ) -> None:
        """Point graph rows `slots` at new rows: first tokens [n], positions, cache offsets and
        region lengths (prompt + that row's new tokens). The other rows are left as they are."""
        dev = self.device
        idx = torch.tensor(slots, dtype=torch.long, device=dev)
        self.tokens[idx] = first
        self.pos[idx] = torch.tensor(pos, dtype=torch.long, device=dev)
        self.last_pos[idx] = torch.tensor(lengths, dtype=torch.long, device=dev) - 1
        self.cu_k[idx] = torch.tensor(starts, dtype=torch.int32, device=dev)
        self.out[idx, 0] = first
        self.row_step[idx] = 1

    def park(self, slots: list[int]) -> None:
        """Make graph rows `slots` dummy rows on the scratch slot: a finished row whose region
        was given back must not write into it any more."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.tokens[idx] = 0
        self.pos[idx] = 0
        self.last_pos[idx] = 0
        self.cu_k[idx] = self.cache.scratch

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def run_with(self, step_logits: StepLogits) -> None:
        """One step, eagerly, whose logits come from `step_logits` instead (a mixed step that also
        prefills joining prompts, workers/gpu/runner.py); the same pick and bookkeeping as a
        replay, on the same buffers, so the graph replays on from where it left."""
        self._step(step_logits)
