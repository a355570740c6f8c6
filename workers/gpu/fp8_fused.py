"""One-pass Triton kernels that quantise activations per token for the FP8 projections (CUDA).

Why not the compiled torch functions (workers/gpu/llama.py `_Ops`): for rows of 4,096 and 14,336
values Inductor emits a looped reduction, which reads each row twice (once for its absolute
maximum, once to scale it), and the RMSNorm before a projection wrote its output only for the
quantiser to read it again. On the H200 those kernels took 18% of an FP8 prefill
(docs/benchmarks.md, fourth session). Here one program holds one whole row in registers: each
input is read once, and only the FP8 row and its scale are written.

* `quant_rows(x, ub)`: x [M, K] → (FP8 [M, K], scale [M, 1]), as `fp8.quantize_rows`;
* `silu_mul_quant(gu, ub)`: gu [M, 2·I] (gate | up) → silu(gate)·up quantised;
* `add_rms_norm_quant(x, delta, w, eps, ub)`: the residual add, the RMSNorm and the quantisation of
  the norm's output → (x + delta, FP8 rows, scales). The bf16 norm itself is never written.

Numbers: the same formulas as the torch versions (`fp8.quantize_rows`, `llama.rms_norm`), with
the intermediate products kept in float32 as Inductor keeps them; the residual stream is rounded
to the model dtype exactly as `x + delta` is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tubesum.workers.gpu.fp8 import FP8, FP8_MAX, MIN_AMAX


def _warps(block: int) -> int:
    # Enough threads that a whole row fits in registers (≤ 16 values of each input a thread).
    return max(4, min(32, block // 512))


# The kernels spell out FP8_MAX (448) and MIN_AMAX (1e-12): a jitted function reads no globals.
assert FP8_MAX == 448.0 and MIN_AMAX == 1e-12


@triton.jit
def _quantise_store(x, ok, q_ptr, s_ptr, row, stride_q, cols, ub, HAS_UB: tl.constexpr, RAW: tl.constexpr):
    # x: one row in float32 (masked lanes 0) → its FP8 values and scale, stored.
    amax = tl.max(tl.abs(x), axis=0)
    if HAS_UB:
        amax = tl.minimum(amax, ub)
    scale = tl.maximum(amax, 1e-12) / 448.0
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    if RAW:  # the scaled float32 values; the caller rounds them to e4m3 (see `_raw`)
        tl.store(q_ptr + row * stride_q + cols, q, mask=ok)
    else:  # e4m3 bytes (q_ptr is a uint8 view of the FP8 output)
        tl.store(q_ptr + row * stride_q + cols, q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=ok)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, n, stride_x, stride_q, ub, HAS_UB: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    _quantise_store(x, ok, q_ptr, s_ptr, row, stride_q, cols, ub, HAS_UB, RAW)


@triton.jit
def _silu_mul_quant_kernel(
    gu_ptr, q_ptr, s_ptr, n, stride_gu, stride_q, ub, HAS_UB: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + n + cols, mask=ok, other=0.0).to(tl.float32)
    x = g / (1.0 + tl.exp(-g)) * u
    _quantise_store(x, ok, q_ptr, s_ptr, row, stride_q, cols, ub, HAS_UB, RAW)


@triton.jit
def _add_rms_norm_quant_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    xo_ptr,
    q_ptr,
    s_ptr,
    n,
    stride_x,
    stride_d,
    stride_xo,
    stride_q,
    eps,
    ub,
    HAS_UB: tl.constexpr,
    RAW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    d = tl.load(d_ptr + row * stride_d + cols, mask=ok, other=0.0)
    # `x + delta` in the model dtype: the float32 sum rounded once (what torch's bf16 add does;
    # spelt out because Triton's interpreter, the CPU tests, has no bf16 arithmetic)
    s = (x.to(tl.float32) + d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
    tl.store(xo_ptr + row * stride_xo + cols, s, mask=ok)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # rms_norm's own roundings: the normalised row, and its product with the weight, in the model
    # dtype (HF's RMSNorm and `llama.rms_norm` run eagerly; the compiled function kept float32 and
    # gave one e4m3 step more or less on ~3% of values: benchmarks/check_fused.py)
    h = ((sf * rstd).to(s.dtype).to(tl.float32) * w).to(s.dtype).to(tl.float32)
    _quantise_store(h, ok, q_ptr, s_ptr, row, stride_q, cols, ub, HAS_UB, RAW)


class _Out:
    """One call's FP8 rows and scales. On a card the kernel writes e4m3 bytes; on the CPU (the tests,
    under Triton's interpreter, whose float32 → e4m3 rounding is wrong near powers of two) it
    writes the scaled float32 values and torch rounds them (`RAW`)."""

    def __init__(self, m: int, n: int, device: torch.device) -> None:
        self.raw = device.type == "cpu"
        self.q = torch.empty(m, n, dtype=torch.float32 if self.raw else FP8, device=device)
        self.s = torch.empty(m, 1, dtype=torch.float32, device=device)

    def target(self) -> torch.Tensor:
        return self.q if self.raw else self.q.view(torch.uint8)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.q.to(FP8) if self.raw else self.q), self.s


def _launch(kernel, m: int, n: int, out: _Out, *args, ub: float | None) -> None:
    # One program a row; `args` are the kernel's own leading arguments.
    if not m:
        return
    block = triton.next_power_of_2(n)
    kernel[(m,)](
        *args,
        FP8_MAX if ub is None else float(ub),
        HAS_UB=ub is not None,
        RAW=out.raw,
        BLOCK=block,
        num_warps=_warps(block),
    )


def quant_rows(x: torch.Tensor, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (FP8 [M, K], scale [M, 1] float32), one pass (see `fp8.quantize_rows`)."""
    m, n = x.shape
    assert x.stride(1) == 1
    out = _Out(m, n, x.device)
    _launch(_quant_rows_kernel, m, n, out, x, out.target(), out.s, n, x.stride(0), n, ub=ub)
    return out.result()


def silu_mul_quant(gu: torch.Tensor, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gu [M, 2·I] (gate then up) → silu(gate)·up as (FP8 [M, I], scale [M, 1]), one pass."""
    m, n2 = gu.shape
    assert gu.stride(1) == 1 and n2 % 2 == 0
    n = n2 // 2
    out = _Out(m, n, gu.device)
    _launch(_silu_mul_quant_kernel, m, n, out, gu, out.target(), out.s, n, gu.stride(0), n, ub=ub)
    return out.result()


def add_rms_norm_quant(
    x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float, ub: float | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """x, delta [M, K], w [K] → (x + delta, (rms_norm(x + delta)·w as FP8 [M, K], scale [M, 1]))."""
    m, n = x.shape
    assert x.stride(1) == 1 and delta.stride(1) == 1 and delta.shape == x.shape
    xo = torch.empty_like(x)
    out = _Out(m, n, x.device)
    args = (x, delta, w, xo, out.target(), out.s, n, x.stride(0), delta.stride(0), n, n, eps)
    _launch(_add_rms_norm_quant_kernel, m, n, out, *args, ub=ub)
    return xo, out.result()
