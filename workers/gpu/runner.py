"""The fast generation runner for Llama-family models: the only code that drives the GPU per token.

Why not `model.generate()`: it pads every prompt to the longest, computes full-vocabulary logits
for every prompt position, grows a dynamic KV cache by concatenation, and launches thousands of
small kernels per token from Python. This runner instead

* prefills prompts **packed** (no padding: one long sequence of all prompts, with variable-length
  FlashAttention when on CUDA) in sub-batches of a token budget, and computes logits only at each
  prompt's last position;
* decodes from a **ragged KV cache**: one flat buffer `[layers, tokens, kv_heads, head_dim]`,
  allocated once at the runner's `token_capacity`, where each row owns exactly its prompt + its
  new tokens at its own offset and reads only its own length (FlashAttention varlen through
  `cu_seqlens_k` offsets and `seqused_k`), with GQA handled by the kernel. Memory is planned in
  tokens, not in rows × (longest prompt + max new);
* captures one decode step (all layers + greedy pick) in a **CUDA graph** per bucketed row count
  (rows padded with dummy entries up to the bucket) and replays it, so a token costs one launch
  instead of ~1,000.

It reuses the HF model's own weights (q/k/v and gate/up are fused in place into single matrices;
the HF modules keep working as views), so the HF model can still run `generate()` beside it.
On CPU (tests) the same code runs with PyTorch SDPA per prompt and without graphs.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tubesum.workers.gpu import fp8
from tubesum.workers.gpu.batching import FreeRegions, admit, prefill_groups
from tubesum.workers.gpu.moe import MoEWeights, moe_mlp

log = logging.getLogger(__name__)

# Prompt tokens per prefill forward pass. Big enough for full-speed matmuls, small enough that the
# MLP activations ([tokens, 2 × intermediate]) stay around a gigabyte for an 8B model.
PREFILL_TOKEN_BUDGET = 16384
# Decode graphs are captured for bucketed row counts (powers of two up to this, then multiples of
# it): a chunk of 187 rows replays the 192-row graph with 5 dummy rows. Rows.
ROW_BUCKET = 32
# The longest KV region a decode graph reads (FlashAttention's max_seqlen_k, baked into the
# graph) is rounded up to a multiple of this. Tokens.
MAX_K_ROUNDING = 1024
# Decode graphs kept at once (each holds static buffers of its row count; intermediates share one
# memory pool). The least recently used is dropped beyond this.
MAX_GRAPHS = 8
# Memory left unplanned beside weights, KV cache and the measured activation peak: cuBLAS
# workspaces, CUDA-graph pools, allocator fragmentation. Bytes.
MEMORY_HEADROOM_BYTES = int(1.5 * 2**30)
# Share of the remaining free memory the KV cache may take (the rest is slack for fragmentation).
KV_MEMORY_SHARE = 0.97
# The most rows a decode step is planned for when reserving its logits ([rows, vocab]). Rows.
MAX_PLANNED_ROWS = 512
# KV-cache tokens on the CPU (tests): enough for any chunk of the tiny models; the buffer is
# `empty`, so untouched pages cost nothing. Tokens.
CPU_TOKEN_CAPACITY = 1 << 16
# From this many rows on, decode attention packs each KV head's query heads together (reads the
# cache once instead of once per query head); below it, the two layout copies cost more.
GQA_PACK_MIN_ROWS = 16
# How often (in decode steps) the host checks whether every row has finished.
FINISH_CHECK_EVERY = 16

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "mixtral"}


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch ships FlashAttention-2 (with varlen + seqused_k) inside its CUDA build."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and hasattr(torch.ops.aten, "_flash_attention_forward")
    )


def _flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool, seqused_k=None):
    # q: [Tq, H, D]; k, v: [Tk, KVH, D]; cu_*: [n+1] int32 offsets. Returns [Tq, H, D].
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, seqused_k=seqused_k
    )
    return out[0]


# A projection's weight: a plain matrix, or its FP8 form (workers/gpu/fp8.py, `--quantize fp8`).
Weight = torch.Tensor | fp8.Fp8Weight


@dataclass
class _Layer:
    wqkv: Weight  # [(H + 2·KVH)·D, hidden]
    bqkv: torch.Tensor | None
    wo: Weight  # [hidden, H·D]
    w13: Weight | None  # [2·inter, hidden]; None for a mixture of experts
    w2: Weight | None  # [hidden, inter]
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head
    k_norm: torch.Tensor | None
    moe: MoEWeights | None = None  # Mixtral: routed experts instead of w13/w2


def _fuse(linears: list[torch.nn.Linear]) -> tuple[Weight, torch.Tensor | None]:
    """Concatenate weights into one matrix and make each Linear a view into it (no extra memory).
    FP8 projections fuse by concatenating their rows and per-row scales (their modules keep no
    bf16 weight to view)."""
    weights = [fp8.weight_of(lin) for lin in linears]
    if any(isinstance(w, fp8.Fp8Weight) for w in weights):
        bias = torch.cat([lin.bias.data for lin in linears]) if linears[0].bias is not None else None
        fused = fp8.concat(weights)  # type: ignore[arg-type]
        row = 0
        for lin, w in zip(linears, weights):  # each piece becomes a view into the fused copy
            n = w.shape[0]
            setattr(lin, fp8.FP8_ATTR, fp8.rows_of(fused, row, row + n))
            row += n
        return fused, bias
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.data for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if bias is not None:
            lin.bias.data = bias[row : row + n]
        row += n
    return weight, bias


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D] (HF's rotate-half convention)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add fused with the next RMSNorm: returns (new residual stream, its norm)."""
    x = x + delta
    return x, rms_norm(x, w, eps)


def qkv_rope(
    qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    pos: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
):
    # qkv: [T, (H + 2·KVH)·D]; pos: [T] → q [T, H, D], k, v [T, KVH, D], q and k rotated
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(-1, n_heads, head_dim)
    k = k.reshape(-1, n_kv, head_dim)
    v = v.reshape(-1, n_kv, head_dim)
    if q_norm is not None:  # Qwen3: RMSNorm over each head before rotation
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    cos, sin = cos_table[pos].unsqueeze(1), sin_table[pos].unsqueeze(1)  # [T, 1, D]
    return rope(q, cos, sin), rope(k, cos, sin), v


class _Ops:
    """The elementwise steps between matmuls. On CUDA each is compiled (dynamic shapes, so one
    compile serves every chunk) into one fused kernel: unfused, a decode step launches ~40 small
    kernels per layer and they, not the weights, dominate batch-1 latency."""

    def __init__(self, compiled: bool) -> None:
        # Automatic dynamic shapes: only the token dimension becomes symbolic after the first
        # recompile. (dynamic=True also made hidden sizes symbolic, and the resulting runtime
        # index divisions made the prefill kernels 2-3x slower than memory speed.)
        wrap = (lambda f: torch.compile(f, fullgraph=True)) if compiled else (lambda f: f)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.qkv_rope = wrap(qkv_rope)
        self.silu_mul = wrap(silu_mul)
        self.quant_rows = wrap(fp8.quantize_rows)  # FP8 activations: one kernel per projection


class KVCache:
    """Keys and values of every row in one flat buffer per layer: [layers, capacity + 1, kv_heads,
    head_dim]. A row owns `[start, start + prompt + new tokens)`; the last slot is scratch that
    dummy rows of a padded decode graph write to and read from."""

    def __init__(
        self, *, layers: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (layers, capacity + 1, kv_heads, head_dim)
        # Empty, not zeroed: every reader is limited to slots its row has written (seqused_k on
        # CUDA, per-row slices on the CPU). Only the scratch slot is zeroed (no NaN in dummy rows).
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, capacity].zero_()
        self.v[:, capacity].zero_()
        self.capacity = capacity
        self.scratch = capacity  # the dummy rows' slot

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [capacity + 1, kv_heads, head_dim]: token t of the row starting at s is at s + t
        return self.k[layer], self.v[layer]


def kv_token_capacity(
    *, free_bytes: int, reserve_bytes: int, bytes_per_token: int, share: float = KV_MEMORY_SHARE
) -> int:
    """KV-cache tokens that fit in `free_bytes` once `reserve_bytes` (activations, logits,
    headroom) are set aside, using `share` of what is left (slack for fragmentation)."""
    return int(max(0, free_bytes - reserve_bytes) * share) // bytes_per_token


def row_starts(lengths: list[int]) -> list[int]:
    """Rows packed back to back: each row's offset in the flat cache ([n]), given its length."""
    starts, at = [], 0
    for n in lengths:
        starts.append(at)
        at += n
    return starts


def row_bucket(rows: int) -> int:
    """The row count a decode graph is captured for: powers of two below ROW_BUCKET, then
    multiples of ROW_BUCKET (few captures; at most ROW_BUCKET - 1 dummy rows)."""
    if rows <= ROW_BUCKET:
        return 1 << max(0, rows - 1).bit_length()
    return math.ceil(rows / ROW_BUCKET) * ROW_BUCKET


class _DecodeGraph:
    """Static buffers and (on CUDA) a captured graph for one decode step of `rows` rows (a
    bucket: real rows first, dummy rows after; a rolling generation also parks finished rows as
    dummy rows and loads joining rows into any slot). The step also does its own bookkeeping
    (store the pick, advance each row's position and `out` column), so a token costs exactly one
    graph launch from the host."""

    def __init__(
        self,
        runner: LlamaRunner,
        cache: KVCache,
        *,
        rows: int,
        max_k: int,
        suppress: torch.Tensor | None,
        max_new_tokens: int,
        use_graph: bool,
        pool=None,
    ) -> None:
        dev = runner.device
        self.runner, self.cache, self.suppress = runner, cache, suppress
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

    def _step(self) -> None:
        logits = self.runner.decode_logits(self.tokens, self.pos, self.cu_k, self.cache, self.max_k)  # [B, V]
        if self.suppress is not None:
            logits.index_fill_(1, self.suppress, float("-inf"))
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
        dev = self.runner.device
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
        idx = torch.tensor(slots, dtype=torch.long, device=self.runner.device)
        self.tokens[idx] = 0
        self.pos[idx] = 0
        self.last_pos[idx] = 0
        self.cu_k[idx] = self.cache.scratch

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


@dataclass
class RunStats:
    prefill_s: float
    decode_s: float
    computed_prompt_tokens: int  # token slots the prefill computed (no padding: = real tokens)


class LlamaRunner:
    """Greedy batched generation for one Llama-family HF model on one device.

    Tensor parallel: `model` is this rank's shard (workers/gpu/tp.py: a model of the same family
    whose config has this rank's heads and intermediate size) and `tp_group` its process group;
    the runner then sums the attention output and the MLP output over the ranks (one all-reduce
    each per layer, captured in the decode graph), and every rank computes the same tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        use_cuda_graphs: bool | None = None,
        allow_flash: bool = True,
        compile_ops: bool = True,
        token_capacity: int | None = None,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"fast runner does not support model_type {cfg.model_type!r}")
        self.model = model
        self.tp_group = tp_group
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = cfg.max_position_embeddings
        if self.device.type == "cuda":
            # Graph capture and the side stream use the current device: make it the model's.
            torch.cuda.set_device(self.device)
        self.use_flash = allow_flash and flash_varlen_available(self.device, self.dtype)
        self.use_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.attn_implementation = "flash_varlen" if self.use_flash else "sdpa"
        self.ops = _Ops(compiled=self.device.type == "cuda" and compile_ops)

        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in inner.layers:
                att, mlp = layer.self_attn, layer.mlp
                wqkv, bqkv = _fuse([att.q_proj, att.k_proj, att.v_proj])
                moe = w13 = w2 = None
                if hasattr(mlp, "experts"):
                    moe = MoEWeights.from_hf(mlp, cfg.num_experts_per_tok)
                else:
                    w13, _ = _fuse([mlp.gate_proj, mlp.up_proj])
                    w2 = fp8.weight_of(mlp.down_proj)
                self.layers.append(
                    _Layer(
                        wqkv=wqkv,
                        bqkv=bqkv,
                        wo=fp8.weight_of(att.o_proj),
                        w13=w13,
                        w2=w2,
                        moe=moe,
                        ln1=layer.input_layernorm.weight,
                        ln2=layer.post_attention_layernorm.weight,
                        q_norm=getattr(getattr(att, "q_norm", None), "weight", None),
                        k_norm=getattr(getattr(att, "k_norm", None), "weight", None),
                    )
                )
            if any(isinstance(w, fp8.Fp8Weight) for lyr in self.layers for w in (lyr.wqkv, lyr.moe and lyr.moe.w13)):
                # Probe the FP8 kernels now: the probes read a result on the host, which a decode
                # graph being captured must never do.
                fp8.scaled_mm_ok(self.device)
                fp8.scaled_grouped_mm_ok(self.device)
            # cos/sin for every position once, with the model's own rotary code (rope scaling incl.)
            positions = torch.arange(self.max_positions, device=self.device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
            self.cos = cos[0].to(self.dtype)  # [max_positions, D]
            self.sin = sin[0].to(self.dtype)
        self._capacity: int | None = token_capacity  # KV tokens; measured on first use when None
        self._kv: KVCache | None = None
        self._graphs: OrderedDict[tuple, _DecodeGraph] = OrderedDict()  # LRU, by (bucket, max_k, ...)
        self._pool = None  # the decode graphs' shared memory pool
        # Rows that finished stop costing decode time (they leave the step at the next bucket).
        self.drop_finished_rows = True
        # generate() may get more prompts than the KV cache holds at once: they join the decode
        # as finished rows free their regions, and the step stays full (drop applies to the tail).
        self.rolling = False
        # Rolling: the most rows decoding at once (None: as many as the first admission's bucket).
        self.max_rows: int | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * len(self.layers) * self.n_kv * self.head_dim * elem

    @property
    def token_capacity(self) -> int:
        """KV-cache tokens this runner holds: measured once (on CUDA: free memory after the
        weights and a measured activation reserve), then fixed."""
        if self._capacity is None:
            self._capacity = self._measure_capacity() if self.device.type == "cuda" else CPU_TOKEN_CAPACITY
        return self._capacity

    @torch.inference_mode()
    def _measure_capacity(self) -> int:
        """Free memory minus the activation peak of one full prefill piece (measured, not
        guessed), the decode logits of MAX_PLANNED_ROWS rows and a headroom, in KV tokens."""
        dev = self.device
        self.release()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        probe = KVCache(
            layers=len(self.layers),
            capacity=PREFILL_TOKEN_BUDGET,
            kv_heads=self.n_kv,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=dev,
        )
        probe_bytes = probe.k.numel() * probe.k.element_size() * 2
        rows = 8  # several prompts: the varlen path the chunks take
        length = PREFILL_TOKEN_BUDGET // rows
        self.prefill_logits([[1] * length] * rows, row_starts([length] * rows), probe)
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - base - probe_bytes
        del probe
        torch.cuda.empty_cache()
        logits = MAX_PLANNED_ROWS * self.lm_head.shape[0] * self.lm_head.element_size()
        free, _total = torch.cuda.mem_get_info(dev)
        capacity = kv_token_capacity(
            free_bytes=free,
            reserve_bytes=activations + logits + MEMORY_HEADROOM_BYTES,
            bytes_per_token=self.kv_bytes_per_token,
        )
        log.info(
            "KV cache: %d tokens (%.1f GiB) = free %.1f GiB - activations %.2f GiB - logits "
            "%.2f GiB - headroom %.1f GiB",
            capacity,
            capacity * self.kv_bytes_per_token / 2**30,
            free / 2**30,
            activations / 2**30,
            logits / 2**30,
            MEMORY_HEADROOM_BYTES / 2**30,
        )
        return capacity

    def shrink_capacity(self, factor: float) -> None:
        """After a real out-of-memory error: plan fewer KV tokens (the cache is re-allocated at
        the new size for the next chunk)."""
        self._capacity = int(self.token_capacity * factor)
        self.release()

    # ------------------------------------------------------------------ all layers
    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-sharded projection over the tensor-parallel ranks (in place)."""
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        # F.linear for bf16 weights (unchanged), the FP8 GEMM for quantised ones.
        return fp8.linear(x, w, bias, quant=self.ops.quant_rows)

    def _mlp(self, lyr: _Layer, h: torch.Tensor) -> torch.Tensor:
        if lyr.moe is not None:
            return moe_mlp(h, lyr.moe, self.ops.silu_mul, quant=self.ops.quant_rows)
        assert lyr.w13 is not None and lyr.w2 is not None
        return self._linear(self.ops.silu_mul(self._linear(h, lyr.w13)), lyr.w2)

    def _forward(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, dest: torch.Tensor, attend
    ) -> torch.Tensor:
        """ids, pos, dest: [T] → final-normed hidden states [T, hidden]. Writes every token's
        keys and values to its cache slot `dest`; `attend(layer, q, k, v)` does the attention."""
        ops, eps = self.ops, self.eps
        x = F.embedding(ids, self.embed)  # [T, hidden]: the residual stream
        h = ops.rms_norm(x, self.layers[0].ln1, eps)
        for i, lyr in enumerate(self.layers):
            q, k, v = ops.qkv_rope(
                self._linear(h, lyr.wqkv, lyr.bqkv),
                self.cos,
                self.sin,
                pos,
                self.n_heads,
                self.n_kv,
                self.head_dim,
                lyr.q_norm,
                lyr.k_norm,
                eps,
            )
            k_flat, v_flat = cache.flat(i)
            k_flat.index_copy_(0, dest, k)
            v_flat.index_copy_(0, dest, v)
            attn = attend(i, q, k, v)  # [T, H, D]
            x, h = ops.add_rms_norm(x, self._all_reduce(self._linear(attn.flatten(1), lyr.wo)), lyr.ln2, eps)
            mlp = self._all_reduce(self._mlp(lyr, h))
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            x, h = ops.add_rms_norm(x, mlp, after, eps)
        return h

    # ------------------------------------------------------------------ prefill
    def prefill(
        self, prompts: list[list[int]], starts: list[int], cache: KVCache, suppress: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `prompts` packed into one sequence, write their keys and values at `starts`,
        return their first generated token [n]."""
        logits = self.prefill_logits(prompts, starts, cache)
        if suppress is not None:
            logits.index_fill_(1, suppress, float("-inf"))
        return logits.argmax(dim=-1)

    def prefill_logits(self, prompts: list[list[int]], starts: list[int], cache: KVCache) -> torch.Tensor:
        """Logits [n, V] at each prompt's last position only (never the whole vocabulary for
        every prompt token: at 256 × 1,400 tokens that alone would be ~180 GB). Prompt i's
        token t goes to cache slot starts[i] + t."""
        lens = [len(p) for p in prompts]
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)  # [T]
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])  # [T]
        start_of = torch.repeat_interleave(torch.tensor(starts, device=dev), torch.tensor(lens, device=dev))  # [T]
        dest = start_of + pos  # flat cache slot of every token
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32, device=dev)
        last = cu[1:].long() - 1  # [n] index of each prompt's last token

        longest = max(lens)

        def attend(_layer: int, q, k, v):
            if self.use_flash:
                return _flash(q, k, v, cu, cu, longest, longest, causal=True)
            return self._sdpa_prefill(q, k, v, offsets)

        h = self._forward(ids, pos, cache, dest, attend)[last]  # [n, hidden]
        return F.linear(h, self.lm_head).float()

    def _sdpa_prefill(self, q, k, v, offsets: list[int]) -> torch.Tensor:
        out = torch.empty_like(q)
        for a, b in zip(offsets[:-1], offsets[1:]):
            # [1, H, L, D] causal attention over one prompt; GQA by repeating kv heads
            qi = q[a:b].transpose(0, 1)[None]
            ki = k[a:b].transpose(0, 1)[None].repeat_interleave(self.n_heads // self.n_kv, dim=1)
            vi = v[a:b].transpose(0, 1)[None].repeat_interleave(self.n_heads // self.n_kv, dim=1)
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1)
        return out

    # ------------------------------------------------------------------ decode
    def decode_logits(
        self, tokens: torch.Tensor, pos: torch.Tensor, cu_k: torch.Tensor, cache: KVCache, max_k: int
    ) -> torch.Tensor:
        """One step for every row: tokens, pos: [B]; cu_k: [B + 1] int32, row i's region starts
        at cu_k[i]; max_k ≥ every row's length → logits [B, V]. Capturable in a CUDA graph."""
        rows = tokens.shape[0]
        dest = cu_k[:-1].long() + pos  # [B]
        used = (pos + 1).to(torch.int32)  # [B] keys each row may read
        cu_q = torch.arange(rows + 1, device=self.device, dtype=torch.int32)

        group = self.n_heads // self.n_kv
        cu_grouped = cu_q * group
        pack = group > 1 and rows >= GQA_PACK_MIN_ROWS

        def attend(layer: int, q, _k, _v):
            if not self.use_flash:
                return self._sdpa_decode(q, layer, cache, cu_k, used)
            k_flat, v_flat = cache.flat(layer)
            if not pack:
                return _flash(q, k_flat, v_flat, cu_q, cu_k, 1, max_k, causal=False, seqused_k=used)
            # GQA packing: the `group` query heads that share a KV head become `group` query
            # rows of that head, so each row's keys and values are read once, not once per head.
            # q [B, H, D] → [B, KVH, g, D] → [B·g, KVH, D]
            qg = q.view(rows, self.n_kv, group, self.head_dim).transpose(1, 2)
            qg = qg.reshape(rows * group, self.n_kv, self.head_dim)
            out = _flash(qg, k_flat, v_flat, cu_grouped, cu_k, group, max_k, causal=False, seqused_k=used)
            # back: [B·g, KVH, D] → [B, g, KVH, D] → [B, KVH, g, D] → [B, H, D]
            out = out.view(rows, group, self.n_kv, self.head_dim).transpose(1, 2)
            return out.reshape(rows, self.n_heads, self.head_dim)

        # bf16 logits are fine for a greedy pick (same argmax as after a float cast).
        return F.linear(self._forward(tokens, pos, cache, dest, attend), self.lm_head)

    def _sdpa_decode(self, q, layer: int, cache: KVCache, cu_k: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        # q: [B, H, D]; each row attends to its own region's written slots only (CPU path: the
        # host reads the offsets, so this is not graph-capturable).
        k_flat, v_flat = cache.flat(layer)
        group = self.n_heads // self.n_kv
        out = torch.empty_like(q)
        for i, (start, n) in enumerate(zip(cu_k[:-1].tolist(), used.tolist())):
            keys = k_flat[start : start + n].transpose(0, 1).repeat_interleave(group, dim=0)  # [H, n, D]
            vals = v_flat[start : start + n].transpose(0, 1).repeat_interleave(group, dim=0)
            out[i] = F.scaled_dot_product_attention(q[i][:, None], keys, vals)[:, 0]
        return out  # [B, H, D]

    # ------------------------------------------------------------------ whole chunk
    def _cache(self) -> KVCache:
        """The one KV cache, allocated at token_capacity the first time (and again only after
        `release`): every chunk reuses it, so memory never fragments chunk by chunk."""
        if self._kv is None:
            self._kv = KVCache(
                layers=len(self.layers),
                capacity=self.token_capacity,
                kv_heads=self.n_kv,
                head_dim=self.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
        return self._kv

    def _decoder_for(self, rows: int, max_k: int, suppress: tuple[int, ...], max_new_tokens: int) -> _DecodeGraph:
        """The decode graph for `rows` real rows (bucketed), reused across chunks."""
        bucket = row_bucket(rows)
        max_k = math.ceil(max_k / MAX_K_ROUNDING) * MAX_K_ROUNDING
        for key, dec in self._graphs.items():
            if key[0] == bucket and key[1] >= max_k and key[2] == suppress and key[3] >= max_new_tokens:
                self._graphs.move_to_end(key)
                return dec
        cache = self._cache()
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        if self.use_graphs and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs never replay at once
        sup = torch.tensor(suppress, device=self.device) if suppress else None
        dec = _DecodeGraph(
            self,
            cache,
            rows=bucket,
            max_k=max_k,
            suppress=sup,
            max_new_tokens=max_new_tokens,
            use_graph=self.use_graphs,
            pool=self._pool,
        )
        self._graphs[(bucket, max_k, suppress, max_new_tokens)] = dec
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
    ) -> tuple[list[list[int]], RunStats]:
        """Greedy continuation of every prompt; returns each row's new tokens (up to and including
        its first stop token) in input order. `new_tokens` gives each row its own limit (at most
        max_new_tokens): the bench's emulation of end tokens on random weights. With `rolling`,
        the prompts together may need more KV cache than the runner holds: they join the decode
        in input order as finished rows free their regions (see `_decode`)."""
        n = len(prompts)
        limits = list(new_tokens) if new_tokens is not None else [max_new_tokens] * n
        if len(limits) != n or min(limits) < 1 or max(limits) > max_new_tokens:
            raise ValueError("new_tokens needs one limit in [1, max_new_tokens] per prompt")
        lengths = [len(p) + m for p, m in zip(prompts, limits)]  # each row's KV region, tokens
        if max(lengths) > self.max_positions:
            raise ValueError(
                f"prompt of {max(len(p) for p in prompts)} tokens + {max_new_tokens} new "
                f"exceeds the model's {self.max_positions} positions"
            )
        # Rolling: each region must fit on its own (it may wait for space); otherwise all at once.
        needed = max(lengths) if self.rolling else sum(lengths)
        if needed > self.token_capacity:
            raise CacheTooSmall(needed=needed, capacity=self.token_capacity, prompts=1 if self.rolling else n)
        regions = FreeRegions(self.token_capacity)
        waiting = list(range(n))
        most = self.max_rows if self.rolling and self.max_rows else n
        placed = admit(waiting, lengths, regions, slots=most)  # all of them unless rolling
        suppress = tuple(sorted(stop_ids)) if ignore_eos else ()
        dec = self._decoder_for(len(placed), max(lengths), suppress, max_new_tokens)
        # The graph's row count is fixed for the call: rows that join later take free slots.
        slots = min(dec.rows, most)
        rows = _Rows(prompts, limits, lengths, regions, waiting, owner=[None] * slots, joined=[0] * slots)

        t0 = _now(self.device)
        dec.park(list(range(dec.rows)))
        self._join(dec, rows, placed, steps=1)
        t1 = _now(self.device)
        tokens, joined_s = self._decode(dec, rows, stop_ids=stop_ids, ignore_eos=ignore_eos, suppress=suppress)
        t2 = _now(self.device)
        result = [_cut(row, limit, None if ignore_eos else stop_ids) for row, limit in zip(tokens, limits)]
        total = sum(len(p) for p in prompts)
        return result, RunStats(prefill_s=t1 - t0 + joined_s, decode_s=t2 - t1 - joined_s, computed_prompt_tokens=total)

    def _prefill_all(self, prompts: list[list[int]], starts: list[int], dec: _DecodeGraph) -> torch.Tensor:
        """Sub-batches of whole prompts up to the token budget, in input order → first tokens [n]."""
        groups = prefill_groups([len(p) for p in prompts], token_budget=PREFILL_TOKEN_BUDGET)
        firsts = [self.prefill(prompts[a:b], starts[a:b], dec.cache, suppress=dec.suppress) for a, b in groups]
        return torch.cat(firsts)

    def _join(self, dec: _DecodeGraph, rows: _Rows, placed: list[tuple[int, int]], *, steps: int) -> None:
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
        dec: _DecodeGraph,
        rows: _Rows,
        *,
        stop_ids: set[int],
        ignore_eos: bool,
        suppress: tuple[int, ...],
    ) -> tuple[list[list[int]], float]:
        """Replay decode steps until every row is done; each row's tokens (uncut), input order, and
        the seconds spent prefilling rows that joined on the way. Every FINISH_CHECK_EVERY steps:
        while prompts wait (rolling), finished rows give their graph row and cache region back and
        waiting prompts join there, so the step stays full; once none wait, with
        `drop_finished_rows`, rows that are done leave the step: once the rest fit a smaller row
        bucket, they move to that bucket's graph (their cache regions stay where they are)."""
        stop = torch.tensor(sorted(stop_ids) or [-1], device=self.device)
        steps, joined_s = 1, 0.0
        while rows.waiting or steps < rows.end():
            # While prompts wait, also when a row reaches its limit: a chunk of fixed-length rows
            # then takes its next prompts at once, not up to FINISH_CHECK_EVERY steps later.
            if steps % FINISH_CHECK_EVERY == 0 or (rows.waiting and steps == rows.first_end()):
                done = self._finished(dec, rows, steps, stop, ignore_eos)
                if rows.waiting:
                    joined_s += self._roll(dec, rows, done, steps)
                elif all(done):
                    break
                elif self.drop_finished_rows:
                    active = [b for b, d in enumerate(done) if not d]
                    if row_bucket(len(active)) < dec.rows:
                        dec = self._shrink(dec, rows, active, steps, suppress)
            dec.run()
            steps += 1
        for b, row in enumerate(dec.out[: len(rows.owner)].tolist()):
            if rows.owner[b] is not None:
                rows.keep(b, row[: steps - rows.joined[b]])
        return [rows.kept[r] for r in range(len(rows.limits))], joined_s

    def _finished(self, dec: _DecodeGraph, rows: _Rows, steps: int, stop: torch.Tensor, ignore_eos: bool) -> list[bool]:
        """Per graph row: done (its limit reached or, unless stop tokens are suppressed, a stop
        token among the tokens it wrote); dummy rows count as done."""
        done = [r is None or steps - j >= rows.limits[r] for r, j in zip(rows.owner, rows.joined)]
        if not ignore_eos:
            n = len(rows.owner)
            written = torch.arange(dec.out.shape[1], device=self.device) < dec.row_step[:n, None]
            hit = (torch.isin(dec.out[:n], stop) & written).any(dim=1).tolist()
            done = [a or b for a, b in zip(done, hit)]
        return done

    def _roll(self, dec: _DecodeGraph, rows: _Rows, done: list[bool], steps: int) -> float:
        """Rows that are done leave (tokens kept, region freed); waiting prompts that fit join in
        their place. Returns the seconds the joining prompts' prefill took."""
        gone = [b for b, d in enumerate(done) if d and rows.owner[b] is not None]
        if gone:
            for b, row in zip(gone, dec.out[torch.tensor(gone, device=self.device)].tolist()):
                rows.retire(b, row[: steps - rows.joined[b]])
        placed = admit(rows.waiting, rows.lengths, rows.regions, slots=rows.owner.count(None))
        took = 0.0
        if placed:
            t0 = _now(self.device)
            self._join(dec, rows, placed, steps=steps)
            took = _now(self.device) - t0
        # A row whose region was given back and whose graph row got no new prompt must not
        # write there any more: it becomes a dummy row.
        dec.park([b for b in gone if rows.owner[b] is None])
        return took

    def _shrink(
        self, dec: _DecodeGraph, rows: _Rows, active: list[int], steps: int, suppress: tuple[int, ...]
    ) -> _DecodeGraph:
        """Move the `active` graph rows of `dec` to a smaller bucket's graph at step `steps`."""
        for b, row in enumerate(dec.out[: len(rows.owner)].tolist()):
            if rows.owner[b] is not None and b not in active:
                rows.keep(b, row[: steps - rows.joined[b]])
        owner = [rows.owner[b] for b in active]
        idx = torch.tensor(active, device=self.device)
        small = self._decoder_for(len(active), dec.max_k, suppress, dec.max_new_tokens)
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


class CacheTooSmall(Exception):
    """A chunk needs more KV-cache tokens than the runner holds (nothing was allocated)."""

    def __init__(self, *, needed: int, capacity: int, prompts: int) -> None:
        self.needed, self.capacity, self.prompts = needed, capacity, prompts
        what = "a single prompt" if prompts == 1 else f"a chunk of {prompts} prompts"
        super().__init__(f"{what} needs {needed:,} KV-cache tokens (prompt + new tokens); the cache holds {capacity:,}")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
