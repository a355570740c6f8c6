"""Run workers/gpu/decode_attention.py's kernel in Triton's interpreter on odd shapes and print,
as JSON, its largest error against a float32 softmax over the dequantised cache per case.

A separate process (tests/test_kv_fp8.py starts it with TRITON_INTERPRET=1): the interpreter is
chosen when Triton's own library functions (`tl.max`, `tl.sum`) are decorated, i.e. when
triton.language is first imported, which other tests in a pytest process may already have done.

    TRITON_INTERPRET=1 python tests/decode_attention_cases.py
"""

from __future__ import annotations

import json
import math

import torch

from tubesum.workers.gpu.decode_attention import KernelConfig, decode_attention
from tubesum.workers.gpu.kv_cache import dequantise_kv, quantise_kv

# (row lengths, KV heads, query heads per KV head, head dim, splits: None = num_splits[, launch
# shape: None = the default KERNEL[, cache: "fp8" (default) or "bf16"]])
CASES = {
    "gqa4_default_splits": ([1, 7, 300], 2, 4, 64, None),
    "no_gqa_empty_splits": ([300, 1, 65], 2, 1, 64, 4),
    "splits_not_dividing": ([5, 130], 1, 4, 128, 3),
    "head_dim_128_long": ([64, 129, 1000], 2, 4, 128, 2),
    # the sweep's other shapes: a smaller and a larger key block (rows not multiples of either)
    "block_32_two_warps": ([33, 1, 200], 2, 4, 128, 2, KernelConfig(block=32, warps=2, stages=2)),
    "block_128_eight_warps": ([129, 300], 2, 4, 64, None, KernelConfig(block=128, warps=8, stages=4)),
    # FlashAttention's launch order (every row of one KV head first)
    "rows_first": ([7, 300, 65], 4, 4, 64, 2, KernelConfig(heads_first=False)),
    # a bf16 cache (the bf16 decode path), both launch orders
    "bf16_cache": ([1, 130, 300], 2, 4, 128, None, None, "bf16"),
    "bf16_cache_rows_first": ([65, 1, 200], 2, 1, 64, 3, KernelConfig(heads_first=False), "bf16"),
    # SmolLM2's shape: 3 KV heads of 3 query heads each, head dim 64
    "bf16_cache_smollm2_shape": ([20, 257], 3, 3, 64, None, None, "bf16"),
}
# Blocks of stale bytes left between rows (a rolling generation's cache). Slots.
GAP = 9


def reference(q, k_cache, v_cache, k_scale, v_scale, starts, used) -> torch.Tensor:
    """Float32 softmax attention of every row over its own dequantised keys and values."""
    rows, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(rows, heads, dim)
    for b, (s, n) in enumerate(zip(starts.tolist(), used.tolist())):
        keys, vals = k_cache[s : s + n], v_cache[s : s + n]
        if k_cache.dtype == torch.uint8:  # e4m3 bytes (else a bf16 cache: the values themselves)
            keys, vals = dequantise_kv(keys, k_scale, torch.float32), dequantise_kv(vals, v_scale, torch.float32)
        keys, vals = keys.float().transpose(0, 1), vals.float().transpose(0, 1)  # [KVH, n, D]
        keys, vals = keys.repeat_interleave(group, 0), vals.repeat_interleave(group, 0)  # [H, n, D]
        scores = torch.einsum("hd,hnd->hn", q[b].float(), keys) / math.sqrt(dim)
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), vals)
    return out


def run_case(
    lengths: list[int],
    kv_heads: int,
    group: int,
    head_dim: int,
    splits: int | None,
    config: KernelConfig | None = None,
    cache: str = "fp8",
    *,
    seed: int,
) -> dict:
    torch.manual_seed(seed)
    heads = kv_heads * group
    # Rows in reverse order with stale bytes between them.
    starts, at = [0] * len(lengths), GAP
    for i in reversed(range(len(lengths))):
        starts[i], at = at, at + lengths[i] + GAP
    k_scale, v_scale = torch.rand(kv_heads) * 0.05 + 0.01, torch.rand(kv_heads) * 0.01 + 0.005
    k_cache = quantise_kv(torch.randn(at, kv_heads, head_dim) * 3, k_scale).view(torch.uint8)
    v_cache = quantise_kv(torch.randn(at, kv_heads, head_dim), v_scale).view(torch.uint8)
    q = torch.randn(len(lengths), heads, head_dim).bfloat16()
    st, used = torch.tensor(starts, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32)
    if cache == "bf16":  # the same values, held dequantised in bf16 (unit scales in the reference)
        k_cache = dequantise_kv(k_cache, k_scale, torch.bfloat16)
        v_cache = dequantise_kv(v_cache, v_scale, torch.bfloat16)
        got = decode_attention(
            q, k_cache, v_cache, None, None, st, used, max_k=max(lengths), splits=splits, config=config
        )
    else:
        got = decode_attention(
            q, k_cache, v_cache, k_scale, v_scale, st, used, max_k=max(lengths), splits=splits, config=config
        )
    want = reference(q, k_cache, v_cache, k_scale, v_scale, st, used)
    err = (got.float() - want).abs()
    return {
        "dtype": str(got.dtype),
        "shape": list(got.shape),
        "max_abs_err": float(err.max()),
        # how far past a tolerance of one bf16 step (2^-8 relative) + 1e-3: <= 0 passes
        "excess": float((err - (want.abs() * 2**-7 + 1e-3)).max()),
    }


def main() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from tubesum.workers.gpu import decode_attention as module

    results = {"interpreted": isinstance(module._split_kernel, InterpretedFunction), "tl": tl.__name__}
    for i, (name, case) in enumerate(CASES.items()):
        results[name] = run_case(*case, seed=i)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
