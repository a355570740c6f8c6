"""The KV cache: one flat buffer of keys and values, its size in tokens, and whether a chunk fits.

Memory is planned in tokens, not in rows × (longest prompt + max new): each row owns exactly its
prompt + its new tokens at its own offset (a region) and reads only its own length. The buffer
is allocated once at the runner's token capacity: on CUDA the free memory after the weights, a
measured activation reserve and a headroom (`measure_capacity`); every chunk reuses it. Where a
rolling generation puts each row's region is the pure allocator's business
(workers/gpu/kv_regions.py).

`--kv-cache-dtype fp8` stores keys and values as float8 e4m3 with one float32 scale per layer
and KV head (`x ≈ stored · scale`): half the bytes a decode step reads, twice the tokens a
chunk holds. Only the cache write is quantised (the prefill attends with the keys it just
computed); decode reads it with workers/gpu/decode_attention.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tubesum.workers.gpu.llama import Llama

log = logging.getLogger(__name__)

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

# `--kv-cache-dtype`: "auto" keeps the model's dtype (bf16: FlashAttention reads it), "fp8" stores
# e4m3 with per-layer, per-KV-head scales.
KV_CACHE_DTYPES = ("auto", "fp8")
KV_FP8 = torch.float8_e4m3fn
KV_FP8_MAX = float(torch.finfo(KV_FP8).max)  # 448.0
# The FP8 scales come from the first prefill written into a fresh cache: per layer and KV head,
# its absolute maximum × this, mapped onto KV_FP8_MAX. Why: keys of some heads reach the
# hundreds (outlier channels, Qwen's biases), where a fixed scale of 1.0 (vLLM's default without
# calibration) would saturate; e4m3's precision is relative, so the headroom costs nothing for
# ordinary values, and later prompts up to twice the first chunk's extremes stay exact to
# e4m3's 3 mantissa bits (beyond it the cast saturates, never overflows to NaN). Dimensionless.
KV_SCALE_HEADROOM = 2.0
# Floor on a head's absolute maximum, so an all-zero head still gets a finite scale. Same units.
KV_MIN_AMAX = 1e-6


def kv_scales(x: torch.Tensor) -> torch.Tensor:
    """x: [T, KVH, D] keys or values → [KVH] float32 scales (see KV_SCALE_HEADROOM)."""
    amax = x.abs().amax(dim=(0, 2)).float().clamp(min=KV_MIN_AMAX)
    return amax * (KV_SCALE_HEADROOM / KV_FP8_MAX)


def quantise_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [T, KVH, D], scale: [KVH] → e4m3 [T, KVH, D], saturating: a value past the scale's
    range becomes ±448 (a plain cast would make it NaN: e4m3fn has no infinity)."""
    return (x.float() / scale[:, None]).clamp(-KV_FP8_MAX, KV_FP8_MAX).to(KV_FP8)


def dequantise_kv(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 [T, KVH, D] (or its uint8 view), scale [KVH] → [T, KVH, D] in `dtype`."""
    return (xq.view(KV_FP8).float() * scale[:, None]).to(dtype)


def kv_element_bytes(dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes one cached key or value element takes: 1 in FP8, else the model dtype's size."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")
    return 1 if kv_cache_dtype == "fp8" else torch.finfo(dtype).bits // 8


class KVCache:
    """Keys and values of every row in one flat buffer per layer: [layers, capacity + 1, kv_heads,
    head_dim]. A row owns `[start, start + prompt + new tokens)`; the last slot is scratch that
    dummy rows of a padded decode graph write to and read from. With `kv_cache_dtype="fp8"` the
    buffers hold e4m3 and `k_scale`, `v_scale` [layers, kv_heads] float32 (set by the first
    prefill written, `calibrated` after it)."""

    def __init__(
        self,
        *,
        layers: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
    ) -> None:
        kv_element_bytes(dtype, kv_cache_dtype)  # validates the name
        self.fp8 = kv_cache_dtype == "fp8"
        shape = (layers, capacity + 1, kv_heads, head_dim)
        store = KV_FP8 if self.fp8 else dtype
        # Empty, not zeroed: every reader is limited to slots its row has written (seqused_k on
        # CUDA, per-row slices on the CPU). Only the scratch slot is zeroed (no NaN in dummy rows).
        self.k = torch.empty(shape, dtype=store, device=device)
        self.v = torch.empty(shape, dtype=store, device=device)
        self.k[:, capacity].view(torch.uint8 if self.fp8 else dtype).zero_()
        self.v[:, capacity].view(torch.uint8 if self.fp8 else dtype).zero_()
        self.k_scale = torch.ones(layers, kv_heads, dtype=torch.float32, device=device) if self.fp8 else None
        self.v_scale = torch.ones(layers, kv_heads, dtype=torch.float32, device=device) if self.fp8 else None
        self.calibrated = not self.fp8
        self.capacity = capacity
        self.scratch = capacity  # the dummy rows' slot

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [capacity + 1, kv_heads, head_dim]: token t of the row starting at s is at s + t
        return self.k[layer], self.v[layer]

    def write(
        self, layer: int, dest: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, calibrate: bool = False
    ) -> None:
        """Store keys and values k, v [T, KVH, D] at slots dest [T]. In FP8, with `calibrate`
        (the first prefill into this cache) this layer's scales are first taken from these very
        values, in place (a captured decode graph reads the same scale tensors); writes go
        through uint8 views (index_copy_ has no float8 kernels everywhere)."""
        k_flat, v_flat = self.flat(layer)
        if not self.fp8:
            k_flat.index_copy_(0, dest, k)
            v_flat.index_copy_(0, dest, v)
            return
        assert self.k_scale is not None and self.v_scale is not None
        if calibrate:
            self.k_scale[layer] = kv_scales(k)
            self.v_scale[layer] = kv_scales(v)
        k_flat.view(torch.uint8).index_copy_(0, dest, quantise_kv(k, self.k_scale[layer]).view(torch.uint8))
        v_flat.view(torch.uint8).index_copy_(0, dest, quantise_kv(v, self.v_scale[layer]).view(torch.uint8))


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


def kv_cache_fits(
    prompts: list[list[int]], max_new_tokens: int, new_tokens: list[int] | None, *, rolling: bool, capacity: int
) -> bool:
    """Whether the chunk's KV regions (each row: its prompt + its new tokens) fit a ragged cache
    of `capacity` tokens: all together, or with `rolling` each on its own (they take turns)."""
    limits = new_tokens if new_tokens is not None else [max_new_tokens] * len(prompts)
    regions = [len(p) + m for p, m in zip(prompts, limits)]
    return (max(regions) if rolling else sum(regions)) <= capacity


class CacheTooSmall(Exception):
    """A chunk needs more KV-cache tokens than the runner holds (nothing was allocated)."""

    def __init__(self, *, needed: int, capacity: int, prompts: int) -> None:
        self.needed, self.capacity, self.prompts = needed, capacity, prompts
        what = "a single prompt" if prompts == 1 else f"a chunk of {prompts} prompts"
        super().__init__(f"{what} needs {needed:,} KV-cache tokens (prompt + new tokens); the cache holds {capacity:,}")


@torch.inference_mode()
def measure_capacity(model: Llama, *, prefill_tokens: int) -> int:
    """Free memory minus the activation peak of one full prefill piece of `prefill_tokens`
    (measured, not guessed), the decode logits of MAX_PLANNED_ROWS rows and a headroom, in KV
    tokens. CUDA only; the caller has released its own cache and graphs."""
    dev = model.device
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probe = KVCache(
        layers=len(model.layers),
        capacity=prefill_tokens,
        kv_heads=model.n_kv,
        head_dim=model.head_dim,
        dtype=model.dtype,
        device=dev,
        kv_cache_dtype=model.kv_cache_dtype,
    )
    probe_bytes = probe.k.numel() * probe.k.element_size() * 2
    rows = 8  # several prompts: the varlen path the chunks take
    length = prefill_tokens // rows
    model.prefill_logits([[1] * length] * rows, row_starts([length] * rows), probe)
    torch.cuda.synchronize(dev)
    activations = torch.cuda.max_memory_allocated(dev) - base - probe_bytes
    del probe
    torch.cuda.empty_cache()
    logits = MAX_PLANNED_ROWS * model.lm_head.shape[0] * model.lm_head.element_size()
    free, _total = torch.cuda.mem_get_info(dev)
    capacity = kv_token_capacity(
        free_bytes=free,
        reserve_bytes=activations + logits + MEMORY_HEADROOM_BYTES,
        bytes_per_token=model.kv_bytes_per_token,
    )
    log.info(
        "KV cache: %d tokens (%.1f GiB) = free %.1f GiB - activations %.2f GiB - logits %.2f GiB - headroom %.1f GiB",
        capacity,
        capacity * model.kv_bytes_per_token / 2**30,
        free / 2**30,
        activations / 2**30,
        logits / 2**30,
        MEMORY_HEADROOM_BYTES / 2**30,
    )
    return capacity
