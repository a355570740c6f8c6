"""The fast generation runner for Llama-family models: the only code that drives the GPU per token.

Why not `model.generate()`: it pads every prompt to the longest, computes full-vocabulary logits
for every prompt position, grows a dynamic KV cache by concatenation, and launches thousands of
small kernels per token from Python. The runner instead ties together

* the model's forward pass (workers/gpu/llama.py): prompts prefilled **packed**, in sub-batches
  of a token budget (workers/gpu/scheduler.py's `prefill_groups`), logits only at each prompt's
  last position;
* a **ragged KV cache** (workers/gpu/kv_cache.py): one flat buffer allocated once at the
  runner's `token_capacity`, where each row owns exactly its prompt + its new tokens;
* one decode step (all layers + greedy pick) captured in a **CUDA graph** per bucketed row count
  (workers/gpu/cuda_graph.py) and replayed, so a token costs one launch instead of ~1,000;

and runs the decode loop: rows that finish leave the step (a smaller bucket), and with `rolling`
waiting prompts take the graph rows and KV regions (workers/gpu/kv_regions.py) that finished rows
give back (workers/gpu/scheduler.py's `admit`). With `fold` as well, the joining prompts are not
prefilled in a pass of their own while the decode waits: the next decode steps carry them, a slice
of whole prompts each (`fold_groups`), in one forward pass with the rows (`Llama.mixed_logits`,
run eagerly outside the graph).
On CPU (tests) the same code runs with PyTorch SDPA per prompt and without graphs.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from tubesum.workers.gpu.cuda_graph import DecodeGraph, row_bucket
from tubesum.workers.gpu.kv_cache import CPU_TOKEN_CAPACITY, CacheTooSmall, KVCache, measure_capacity
from tubesum.workers.gpu.kv_regions import FreeRegions
from tubesum.workers.gpu.llama import Llama
from tubesum.workers.gpu.scheduler import admit, fold_groups, prefill_groups

# Prompt tokens per prefill forward pass. Big enough for full-speed matmuls, small enough that the
# MLP activations ([tokens, 2 × intermediate]) stay around a gigabyte for an 8B model.
PREFILL_TOKEN_BUDGET = 16384
# The longest KV region a decode graph reads (FlashAttention's max_seqlen_k, baked into the
# graph) is rounded up to a multiple of this. Tokens.
MAX_K_ROUNDING = 1024
# Decode graphs kept at once (each holds static buffers of its row count; intermediates share one
# memory pool). The least recently used is dropped beyond this.
MAX_GRAPHS = 8
# How often (in decode steps) the host checks whether every row has finished.
FINISH_CHECK_EVERY = 16
# Folded prefill (`fold`): a mixed step carries at least this many prompt tokens (fewer would not
# fill the card's GEMMs, and each mixed step runs outside the graph). Tokens.
FOLD_MIN_TOKENS = 2048


@dataclass
class RunStats:
    prefill_s: float
    decode_s: float
    computed_prompt_tokens: int  # token slots the prefill computed (no padding: = real tokens)
    folded_prompts: int = 0  # prompts prefilled inside decode steps (`fold`; their time is decode_s)


class Runner(Protocol):
    """What the Engine drives: one device's LlamaRunner, or rank 0's RankGroup of a
    tensor-parallel group (workers/gpu/tp.py), which runs each call on every rank."""

    # Rows that finished stop costing decode time (they leave the step at the next bucket).
    drop_finished_rows: bool

    @property
    def attn_implementation(self) -> str: ...

    @property
    def token_capacity(self) -> int: ...

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        stop_ids: set[int],
        ignore_eos: bool = False,
        new_tokens: list[int] | None = None,
        rolling: bool = False,
        max_rows: int | None = None,
        repeat: tuple[int, float] = (0, 1.0),
        fold: bool = False,
    ) -> tuple[list[list[int]], RunStats]: ...

    def shrink_capacity(self, factor: float) -> None: ...

    def release(self) -> None: ...


class LlamaRunner:
    """Greedy batched generation for one Llama-family HF model on one device.

    Tensor parallel: `model` is this rank's shard (workers/gpu/tp.py: a model of the same family
    whose config has this rank's heads and intermediate size) and `tp_group` its process group;
    the forward pass then sums the attention output and the MLP output over the ranks (one
    all-reduce each per layer, captured in the decode graph), and every rank computes the same
    tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        use_cuda_graphs: bool | None = None,
        allow_flash: bool = True,
        compile_ops: bool = True,
        token_capacity: int | None = None,
        tp_group: dist.ProcessGroup | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        if self.device.type == "cuda":
            # Graph capture and the side stream use the current device: make it the model's.
            torch.cuda.set_device(self.device)
        self.llama = Llama(
            model, allow_flash=allow_flash, compile_ops=compile_ops, tp_group=tp_group, kv_cache_dtype=kv_cache_dtype
        )
        self.use_graphs = self.llama.graph_capturable if use_cuda_graphs is None else use_cuda_graphs
        self._capacity: int | None = token_capacity  # KV tokens; measured on first use when None
        self._kv: KVCache | None = None
        self._graphs: OrderedDict[tuple, DecodeGraph] = OrderedDict()  # LRU, by (bucket, max_k, ...)
        self._pool = None  # the decode graphs' shared memory pool
        # Rows that finished stop costing decode time (they leave the step at the next bucket).
        self.drop_finished_rows = True

    @property
    def attn_implementation(self) -> str:
        return self.llama.attn_implementation

    @property
    def kv_cache_dtype(self) -> str:
        return self.llama.kv_cache_dtype

    # ------------------------------------------------------------------ sizes
    @property
    def token_capacity(self) -> int:
        """KV-cache tokens this runner holds: measured once (on CUDA: free memory after the
        weights and a measured activation reserve), then fixed."""
        if self._capacity is None:
            if self.device.type == "cuda":
                self.release()
                self._capacity = measure_capacity(self.llama, prefill_tokens=PREFILL_TOKEN_BUDGET)
            else:
                self._capacity = CPU_TOKEN_CAPACITY
        return self._capacity

    def shrink_capacity(self, factor: float) -> None:
        """After a real out-of-memory error: plan fewer KV tokens (the cache is re-allocated at
        the new size for the next chunk)."""
        self._capacity = int(self.token_capacity * factor)
        self.release()

    # ------------------------------------------------------------------ whole chunk
    def _cache(self) -> KVCache:
        """The one KV cache, allocated at token_capacity the first time (and again only after
        `release`): every chunk reuses it, so memory never fragments chunk by chunk."""
        if self._kv is None:
            self._kv = self.llama.new_cache(self.token_capacity)
        return self._kv

    def _decoder_for(
        self,
        rows: int,
        max_k: int,
        suppress: tuple[int, ...],
        max_new_tokens: int,
        repeat: tuple[int, float] = (0, 1.0),
    ) -> DecodeGraph:
        """The decode graph for `rows` real rows (bucketed), reused across chunks."""
        bucket = row_bucket(rows)
        max_k = math.ceil(max_k / MAX_K_ROUNDING) * MAX_K_ROUNDING
        for key, dec in self._graphs.items():
            if (
                key[0] == bucket
                and key[1] >= max_k
                and key[2] == suppress
                and key[3] >= max_new_tokens
                and key[4] == repeat
            ):
                self._graphs.move_to_end(key)
                return dec
        cache = self._cache()
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        if self.use_graphs and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs never replay at once
        sup = torch.tensor(suppress, device=self.device) if suppress else None
        dec = DecodeGraph(
            self.llama.decode_logits,
            cache,
            device=self.device,
            rows=bucket,
            max_k=max_k,
            suppress=sup,
            max_new_tokens=max_new_tokens,
            use_graph=self.use_graphs,
            pool=self._pool,
            repeat=repeat,
        )
        self._graphs[(bucket, max_k, suppress, max_new_tokens, repeat)] = dec
        return dec

    def release(self) -> None:
        """Drop the KV cache and every decode graph (before plain generate() needs the memory, or
        after an out-of-memory error); the next chunk allocates them again."""
        self._graphs.clear()
        self._kv, self._pool = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        stop_ids: set[int],
        ignore_eos: bool = False,
        new_tokens: list[int] | None = None,
        rolling: bool = False,
        max_rows: int | None = None,
        repeat: tuple[int, float] = (0, 1.0),
        fold: bool = False,
    ) -> tuple[list[list[int]], RunStats]:
        """Greedy continuation of every prompt; returns each row's new tokens (up to and including
        its first stop token) in input order. `new_tokens` gives each row its own limit (at most
        max_new_tokens): the bench's emulation of end tokens on random weights. With `rolling`,
        the prompts together may need more KV cache than the runner holds: they join the decode
        in input order as finished rows free their regions (see `_decode`), at most `max_rows`
        at once (None: as many as the first admission's bucket). `fold` (with `rolling`): prompts
        that join while other rows decode are prefilled inside the next decode steps."""
        n = len(prompts)
        limits = list(new_tokens) if new_tokens is not None else [max_new_tokens] * n
        if len(limits) != n or min(limits) < 1 or max(limits) > max_new_tokens:
            raise ValueError("new_tokens needs one limit in [1, max_new_tokens] per prompt")
        lengths = [len(p) + m for p, m in zip(prompts, limits)]  # each row's KV region, tokens
        if max(lengths) > self.llama.max_positions:
            raise ValueError(
                f"prompt of {max(len(p) for p in prompts)} tokens + {max_new_tokens} new "
                f"exceeds the model's {self.llama.max_positions} positions"
            )
        # Rolling: each region must fit on its own (it may wait for space); otherwise all at once.
        needed = max(lengths) if rolling else sum(lengths)
        if needed > self.token_capacity:
            raise CacheTooSmall(needed=needed, capacity=self.token_capacity, prompts=1 if rolling else n)
        regions = FreeRegions(self.token_capacity)
        waiting = list(range(n))
        most = max_rows if rolling and max_rows else n
        placed = admit(waiting, lengths, regions, slots=most)  # all of them unless rolling
        suppress = tuple(sorted(stop_ids)) if ignore_eos else ()
        dec = self._decoder_for(len(placed), max(lengths), suppress, max_new_tokens, tuple(repeat))
        # The graph's row count is fixed for the call: rows that join later take free slots.
        slots = min(dec.rows, most)
        rows = _Rows(prompts, limits, lengths, regions, waiting, owner=[None] * slots, joined=[0] * slots)

        t0 = _now(self.device)
        dec.park(list(range(dec.rows)))
        self._join(dec, rows, placed, steps=1)
        t1 = _now(self.device)
        tokens, joined_s = self._decode(
            dec, rows, stop_ids=stop_ids, ignore_eos=ignore_eos, suppress=suppress, fold=fold and rolling
        )
        t2 = _now(self.device)
        result = [_cut(row, limit, None if ignore_eos else stop_ids) for row, limit in zip(tokens, limits)]
        total = sum(len(p) for p in prompts)
        return result, RunStats(
            prefill_s=t1 - t0 + joined_s,
            decode_s=t2 - t1 - joined_s,
            computed_prompt_tokens=total,
            folded_prompts=rows.folded,
        )

    def _prefill_all(self, prompts: list[list[int]], starts: list[int], dec: DecodeGraph) -> torch.Tensor:
        """Sub-batches of whole prompts up to the token budget, in input order → first tokens [n]."""
        groups = prefill_groups([len(p) for p in prompts], token_budget=PREFILL_TOKEN_BUDGET)
        firsts = [self.llama.prefill(prompts[a:b], starts[a:b], dec.cache, suppress=dec.suppress) for a, b in groups]
        return torch.cat(firsts)

    def _join(self, dec: DecodeGraph, rows: _Rows, placed: list[tuple[int, int]], *, steps: int) -> None:
        """Prefill the `placed` prompts ((input row, region start), packed) and load them into the
        lowest free graph rows, as rows whose first token is step `steps`' token."""
        free = [b for b, r in enumerate(rows.owner) if r is None][: len(placed)]
        which = [i for i, _ in placed]
        starts = [s for _, s in placed]
        first = self._prefill_all([rows.prompts[i] for i in which], starts, dec)
        dec.place(free, first, [len(rows.prompts[i]) for i in which], starts, [rows.lengths[i] for i in which])
        for b, i, start in zip(free, which, starts):
            rows.owner[b], rows.joined[b], rows.starts[i] = i, steps - 1, start

    def _decode(
        self,
        dec: DecodeGraph,
        rows: _Rows,
        *,
        stop_ids: set[int],
        ignore_eos: bool,
        suppress: tuple[int, ...],
        fold: bool = False,
    ) -> tuple[list[list[int]], float]:
        """Replay decode steps until every row is done; each row's tokens (uncut), input order, and
        the seconds spent prefilling rows that joined on the way. Every FINISH_CHECK_EVERY steps:
        while prompts wait (rolling), finished rows give their graph row and cache region back and
        waiting prompts join there, so the step stays full; once none wait, with
        `drop_finished_rows`, rows that are done leave the step: once the rest fit a smaller row
        bucket, they move to that bucket's graph (their cache regions stay where they are). With
        `fold`, a step with joining prompts still to prefill is a mixed step (`_mixed_step`)."""
        stop = torch.tensor(sorted(stop_ids) or [-1], device=self.device)
        steps, joined_s = 1, 0.0
        while rows.waiting or rows.folding or steps < rows.end():
            # While prompts wait, also when a row reaches its limit: a chunk of fixed-length rows
            # then takes its next prompts at once, not up to FINISH_CHECK_EVERY steps later.
            if steps % FINISH_CHECK_EVERY == 0 or (rows.waiting and steps == rows.first_end()):
                done = self._finished(dec, rows, steps, stop, ignore_eos)
                if rows.waiting or rows.folding:
                    joined_s += self._roll(dec, rows, done, steps, fold=fold)
                elif all(done):
                    break
                elif self.drop_finished_rows:
                    active = [b for b, d in enumerate(done) if not d]
                    if row_bucket(len(active)) < dec.rows:
                        dec = self._shrink(dec, rows, active, steps, suppress)
            if rows.folding:
                self._mixed_step(dec, rows, steps)
            else:
                dec.run()
            steps += 1
        for b, row in enumerate(dec.out[: len(rows.owner)].tolist()):
            if rows.owner[b] is not None:
                rows.keep(b, row[: steps - rows.joined[b]])
        return [rows.kept[r] for r in range(len(rows.limits))], joined_s

    def _finished(self, dec: DecodeGraph, rows: _Rows, steps: int, stop: torch.Tensor, ignore_eos: bool) -> list[bool]:
        """Per graph row: done (its limit reached or, unless stop tokens are suppressed, a stop
        token among the tokens it wrote); dummy rows count as done."""
        done = [r is None or steps - j >= rows.limits[r] for r, j in zip(rows.owner, rows.joined)]
        if not ignore_eos:
            n = len(rows.owner)
            written = torch.arange(dec.out.shape[1], device=self.device) < dec.row_step[:n, None]
            hit = (torch.isin(dec.out[:n], stop) & written).any(dim=1).tolist()
            done = [a or b for a, b in zip(done, hit)]
        return done

    def _roll(self, dec: DecodeGraph, rows: _Rows, done: list[bool], steps: int, *, fold: bool = False) -> float:
        """Rows that are done leave (tokens kept, region freed); waiting prompts that fit join in
        their place: at once, or with `fold` while other rows still decode, through the next
        mixed steps (their graph rows and regions reserved now). Returns the seconds the joining
        prompts' own prefill pass took (none when folded)."""
        gone = [b for b, d in enumerate(done) if d and rows.owner[b] is not None]
        if gone:
            for b, row in zip(gone, dec.out[torch.tensor(gone, device=self.device)].tolist()):
                rows.retire(b, row[: steps - rows.joined[b]])
        placed = admit(rows.waiting, rows.lengths, rows.regions, slots=rows.free_slots())
        decoding = any(r is not None for r in rows.owner)
        took = 0.0
        if fold and decoding:
            rows.fold(placed)
        elif placed or rows.folding:
            # Nothing decodes to carry them (or no folding): one prefill pass, as without `fold`.
            placed = rows.unfold() + placed
            t0 = _now(self.device)
            self._join(dec, rows, placed, steps=steps)
            took = _now(self.device) - t0
        # A row whose region was given back and whose graph row got no new prompt must not
        # write there any more: it becomes a dummy row.
        dec.park([b for b in gone if rows.owner[b] is None])
        return took

    def _mixed_step(self, dec: DecodeGraph, rows: _Rows, steps: int) -> None:
        """Decode step `steps` for every row, with the next slice of joining prompts prefilled in
        the same forward pass; they take their reserved graph rows with their first token, as if
        they had joined after this step."""
        group = rows.folding.pop(0)
        slots, which = [b for b, _ in group], [i for _, i in group]
        prompts, starts = [rows.prompts[i] for i in which], [rows.starts[i] for i in which]
        first: list[torch.Tensor] = []

        def step_logits(tokens, pos, cu_k, cache, max_k):
            logits, joining = self.llama.mixed_logits(tokens, pos, cu_k, cache, max_k, prompts, starts)
            if dec.suppress is not None:  # as `Llama.prefill` picks a first token
                joining.index_fill_(1, dec.suppress, float("-inf"))
            first.append(joining.argmax(dim=-1))
            return logits

        dec.run_with(step_logits)
        dec.place(slots, first[0], [len(p) for p in prompts], starts, [rows.lengths[i] for i in which])
        for b, i in group:
            rows.owner[b], rows.joined[b] = i, steps
            rows.reserved.discard(b)
        rows.folded += len(group)

    def _shrink(
        self, dec: DecodeGraph, rows: _Rows, active: list[int], steps: int, suppress: tuple[int, ...]
    ) -> DecodeGraph:
        """Move the `active` graph rows of `dec` to a smaller bucket's graph at step `steps`."""
        for b, row in enumerate(dec.out[: len(rows.owner)].tolist()):
            if rows.owner[b] is not None and b not in active:
                rows.keep(b, row[: steps - rows.joined[b]])
        owner = [rows.owner[b] for b in active]
        idx = torch.tensor(active, device=self.device)
        small = self._decoder_for(len(active), dec.max_k, suppress, dec.max_new_tokens, dec.repeat)
        small.load(
            dec.tokens[idx],
            dec.pos[idx].tolist(),
            [rows.starts[r] for r in owner if r is not None],
            [rows.lengths[r] for r in owner if r is not None],
        )
        small.out[: len(active), : dec.out.shape[1]] = dec.out[idx]
        small.row_step[: len(active)] = dec.row_step[idx]
        rows.owner, rows.joined = owner, [rows.joined[b] for b in active]
        return small


@dataclass
class _Rows:
    """The host's view of one generate() call: each prompt's limit and KV region, the prompts
    still waiting (rolling), where the admitted ones sit in the cache, and which input row each
    graph row holds. Every decision on it is a function of the tokens alone, so the ranks of a
    tensor-parallel group, which share the tokens, decide alike."""

    prompts: list[list[int]]
    limits: list[int]
    lengths: list[int]  # each prompt's KV region: its tokens + its limit
    regions: FreeRegions
    waiting: list[int]  # input rows not admitted yet, in input order
    owner: list[int | None]  # graph row → input row (None: a dummy row)
    joined: list[int]  # graph row → the step before its first token (its tokens: steps - joined)
    starts: dict[int, int] = field(default_factory=dict)  # admitted input row → region offset
    kept: dict[int, list[int]] = field(default_factory=dict)  # input row → tokens, once it left
    # `fold`: admitted prompts still to prefill, one list of (graph row, input row) a mixed step;
    # their graph rows stay dummy rows, reserved, until their first token.
    folding: list[list[tuple[int, int]]] = field(default_factory=list)
    reserved: set[int] = field(default_factory=set)
    folded: int = 0  # prompts that joined through mixed steps

    def free_slots(self) -> int:
        """Graph rows no row holds and no folding prompt has reserved."""
        return self.owner.count(None) - len(self.reserved)

    def fold(self, placed: list[tuple[int, int]]) -> None:
        """Admitted prompts ((input row, region start)) to be prefilled in the next mixed steps:
        graph rows reserved, and spread over the steps until the next admission."""
        if not placed:
            return
        slots = [b for b, r in enumerate(self.owner) if r is None and b not in self.reserved][: len(placed)]
        for (i, start), b in zip(placed, slots):
            self.starts[i] = start
            self.reserved.add(b)
        runs = fold_groups(
            [len(self.prompts[i]) for i, _ in placed], steps=FINISH_CHECK_EVERY, min_tokens=FOLD_MIN_TOKENS
        )
        self.folding += [[(slots[j], placed[j][0]) for j in range(a, b)] for a, b in runs]

    def unfold(self) -> list[tuple[int, int]]:
        """The folding prompts not prefilled yet, as admitted ((input row, region start)), their
        graph rows free again: they join in one prefill pass instead."""
        back = [(i, self.starts[i]) for group in self.folding for _, i in group]
        self.folding, self.reserved = [], set()
        return back

    def end(self) -> int:
        """The step by which every row in the graph has reached its limit."""
        return max((j + self.limits[r] for r, j in zip(self.owner, self.joined) if r is not None), default=0)

    def first_end(self) -> int:
        """The step at which the first row in the graph reaches its limit."""
        return min((j + self.limits[r] for r, j in zip(self.owner, self.joined) if r is not None), default=0)

    def keep(self, b: int, tokens: list[int]) -> None:
        """Graph row `b`'s row leaves the step with these tokens."""
        r = self.owner[b]
        assert r is not None
        self.kept[r] = tokens

    def retire(self, b: int, tokens: list[int]) -> None:
        """As `keep`, and its region and graph row are free for waiting prompts."""
        self.keep(b, tokens)
        r = self.owner[b]
        assert r is not None
        self.regions.give(self.starts.pop(r), self.lengths[r])
        self.owner[b] = None


def _cut(row: list[int], limit: int, stop_ids: set[int] | None) -> list[int]:
    """A row's tokens up to its limit and, unless stop tokens are suppressed, its first stop."""
    row = row[:limit]
    if stop_ids is not None:
        for j, tok in enumerate(row):
            if tok in stop_ids:
                return row[: j + 1]
    return row


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
