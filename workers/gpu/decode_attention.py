"""Decode attention over the KV cache: one Triton split-KV (flash-decoding) kernel with GQA.

Why its own kernel: FlashAttention reads bf16/fp16 keys only, and the FP8 cache
(`--kv-cache-dtype fp8`, workers/gpu/kv_cache.py) exists to halve the bytes a decode step reads.
The same kernel reads a bf16 cache too (where it beats FlashAttention's decode: see
`heads_first` below and docs/benchmarks.md).
The kernel reads each row's region of the flat cache (`starts[b]`, `used[b]` keys, the same
layout FlashAttention's `cu_seqlens_k` + `seqused_k` read), and

* **GQA**: one program handles the `group` query heads that share a KV head (padded to a tile of
  16 rows for `tl.dot`), so each key and value is read from memory once, not once per head;
* **split-KV**: a row's keys are cut into `splits` pieces processed by separate programs, each
  keeping its own running max, sum and float32 accumulator; a second kernel merges them. Few
  rows (one long prompt) then still fill the card;
* **scales**: the cache holds `k / k_scale` in e4m3; the per-head scale multiplies the scores
  (and `v_scale` the output) once per tile, never per element;
* **CUDA graphs**: no host syncs; the grid and the split count depend only on the batch's row
  count and `max_k`, both fixed for a captured graph.

The cache tensors come as `uint8` views of the e4m3 bytes and are bitcast in the kernel: torch's
indexing ops and the Triton interpreter (the CPU tests) both handle bytes, not every float8 op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelConfig:
    """The first kernel's launch shape: keys per loop iteration (tokens), warps per program, and
    software-pipeline stages (loads of the next tiles in flight while one is computed)."""

    block: int = 64
    warps: int = 4
    stages: int = 3  # Triton's own defaults: 4 warps, 3 stages
    # Programs in launch order: the KV heads of one row next to each other (True), or every row of
    # one KV head first (False, FlashAttention's order). A cache slot holds all KV heads of a
    # token side by side ([S, KVH, D]), so heads first reads whole slots at a time. Measured on
    # the H200: the same within 3% either way (benchmarks/check_fused.py); kept for the bf16
    # cache at 512 rows, where it was the 3% faster.
    heads_first: bool = True


# What every call uses unless given one (benchmarks/check_kv_fp8.py's `sweep` times the others).
KERNEL = KernelConfig()
# Query heads of one KV head are padded to this many tile rows (`tl.dot` wants at least 16).
MIN_GROUP_TILE = 16
# Programs the first kernel aims for: a few waves over a card's ~132 SMs, so short batches
# split their keys and big batches (rows × KV heads already above it) do not. Programs.
TARGET_PROGRAMS = 1024
# The fewest keys a split is given (smaller splits spend more on the merge than they save). Tokens.
MIN_SPLIT_TOKENS = 256


def num_splits(*, rows: int, kv_heads: int, max_k: int) -> int:
    """How many pieces each row's keys are cut into: enough programs to fill the card, never
    splits shorter than MIN_SPLIT_TOKENS. A function of the graph's fixed shapes only."""
    want = max(1, math.ceil(TARGET_PROGRAMS / max(1, rows * kv_heads)))
    return max(1, min(want, math.ceil(max_k / MIN_SPLIT_TOKENS)))


@triton.jit
def _split_kernel(
    q_ptr,  # [B, H, D] bf16 or fp16
    k_ptr,  # [S, KVH, D] uint8 (e4m3 bytes)
    v_ptr,
    k_scale_ptr,  # [KVH] float32
    v_scale_ptr,
    starts_ptr,  # [B] int32: row b's first slot
    used_ptr,  # [B] int32: row b's key count
    m_ptr,  # [B, H, SPLITS] float32: each split's running max (log2 domain)
    l_ptr,  # [B, H, SPLITS] float32: its sum of exp2
    acc_ptr,  # [B, H, SPLITS, D] float32: its unnormalised output
    sm_scale_log2,  # softmax scale × log2(e)
    split_len,  # keys per split (a multiple of the block)
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    GROUP: tl.constexpr,
    GROUP_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
    DOT_F32: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    if HEADS_FIRST:
        kvh = tl.program_id(0)
        b = tl.program_id(1)
        heads = tl.num_programs(0) * GROUP
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        heads = tl.num_programs(1) * GROUP
    split = tl.program_id(2)

    g = tl.arange(0, GROUP_TILE)  # query head within the group (rows past GROUP are padding)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK)
    g_ok = g < GROUP
    head = kvh * GROUP + g  # [G]

    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    elif KV_FP8:
        # e4m3 → fp16 is one packed instruction (→ bf16 goes through float32): the dots over an
        # FP8 cache run in fp16, exact for every e4m3 value; q (a rotated query, far below
        # fp16's 65,504) loses nothing that matters, p in [0, 1] gains 3 mantissa bits.
        q = q.to(tl.float16)
    start = tl.load(starts_ptr + b)
    used = tl.load(used_ptr + b)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, used)
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr + kvh)
        v_scale = tl.load(v_scale_ptr + kvh)
    else:  # a 16-bit cache holds the values themselves
        k_scale = 1.0
        v_scale = 1.0
    qk_scale = k_scale * sm_scale_log2  # scores in the log2 domain (exp2 is the fast one)

    m_i = tl.full([GROUP_TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_TILE], tl.float32)
    acc = tl.zeros([GROUP_TILE, HEAD_DIM], tl.float32)
    for at in range(lo, hi, BLOCK):
        keys = at + n
        k_ok = keys < hi
        slot = (start + keys).to(tl.int64)
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=k_ok[:, None], other=0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=k_ok[:, None], other=0)
        # e4m3 → bf16/fp16 is exact (3 mantissa bits fit), so the dots run on 16-bit tensor cores
        # (float32 under the interpreter: see DOT_F32).
        if KV_FP8:
            k = k.to(tl.float8e4nv, bitcast=True)
            v = v.to(tl.float8e4nv, bitcast=True)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [G, N] float32
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new

    # An empty split (a row shorter than this split's start) leaves max -inf, sum 0, acc 0:
    # the merge gives it weight 0.
    part = (b * heads + head) * SPLITS + split  # [G]
    tl.store(m_ptr + part, m_i, mask=g_ok)
    tl.store(l_ptr + part, l_i, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc * v_scale, mask=g_ok[:, None])


@triton.jit
def _merge_kernel(
    m_ptr,  # [B, H, SPLITS]
    l_ptr,
    acc_ptr,  # [B, H, SPLITS, D]
    out_ptr,  # [B, H, D] the queries' dtype
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_TILE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    s = tl.arange(0, SPLITS_TILE)
    d = tl.arange(0, HEAD_DIM)
    s_ok = s < SPLITS
    base = (b * heads + h) * SPLITS
    m = tl.load(m_ptr + base + s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + base + s, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)  # finite: split 0 holds every row's first key (used >= 1)
    w = tl.exp2(m - m_all)  # 0 for empty splits
    total = tl.sum(l_s * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    starts: torch.Tensor,
    used: torch.Tensor,
    *,
    max_k: int,
    splits: int | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """One decode step's attention: q [B, H, D] bf16 (or fp16); k_cache, v_cache [S, KVH, D]:
    uint8 views of e4m3 values (`k ≈ k_cache · k_scale[head]`, k_scale and v_scale [KVH]
    float32), or a 16-bit cache in q's dtype (scales None); starts, used [B] int32 (row b reads
    slots starts[b] .. starts[b] + used[b] - 1, used[b] in [1, max_k]) → [B, H, D] in q's dtype.
    `splits` (default `num_splits`) must not depend on data; `config` defaults to KERNEL."""
    cfg = config or KERNEL
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    kv_fp8 = k_cache.dtype == torch.uint8
    assert v_cache.dtype == k_cache.dtype and (k_cache.dtype == q.dtype or kv_fp8)
    assert (k_scale is not None and v_scale is not None) == kv_fp8
    if splits is None:
        splits = num_splits(rows=rows, kv_heads=kv_heads, max_k=max_k)
    split_len = math.ceil(math.ceil(max_k / splits) / cfg.block) * cfg.block
    dev = q.device
    m = torch.empty(rows, heads, splits, dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    acc = torch.empty(rows, heads, splits, dim, dtype=torch.float32, device=dev)
    out = torch.empty(rows, heads, dim, dtype=q.dtype, device=dev)
    sm_scale_log2 = (1.0 / math.sqrt(dim)) * math.log2(math.e)
    # CPU tensors only run under Triton's interpreter (TRITON_INTERPRET=1, the tests), whose
    # `tl.dot` multiplies bf16 tiles as their raw uint16 bits (triton 3.9): there the dots run
    # in float32 instead.
    interpreted = q.device.type == "cpu"
    grid = (kv_heads, rows, splits) if cfg.heads_first else (rows, kv_heads, splits)
    _split_kernel[grid](
        q,
        k_cache,
        v_cache,
        k_scale if kv_fp8 else q,  # never read without FP8 (any pointer will do)
        v_scale if kv_fp8 else q,
        starts,
        used,
        m,
        l_sum,
        acc,
        sm_scale_log2,
        split_len,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        GROUP=group,
        GROUP_TILE=max(MIN_GROUP_TILE, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        SPLITS=splits,
        BLOCK=cfg.block,
        DOT_F32=interpreted,
        HEADS_FIRST=cfg.heads_first,
        KV_FP8=kv_fp8,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    _merge_kernel[(rows, heads)](
        m,
        l_sum,
        acc,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=dim,
        SPLITS=splits,
        SPLITS_TILE=triton.next_power_of_2(splits),
    )
    return out
