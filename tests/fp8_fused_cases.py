"""Run workers/gpu/fp8_fused.py's kernels in Triton's interpreter and print, as JSON, how their
FP8 rows and scales compare with the torch functions they replace on a card.

A separate process (tests/test_fp8.py starts it with TRITON_INTERPRET=1; see
tests/decode_attention_cases.py why). On the CPU the kernels write scaled float32 values and torch
rounds them to e4m3 (`fp8_fused._Out`), and inputs are float32: the interpreter's own bf16 and
e4m3 roundings truncate, where a card rounds to nearest.

    TRITON_INTERPRET=1 python tests/fp8_fused_cases.py
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from tubesum.workers.gpu import fp8, fp8_fused
from tubesum.workers.gpu.llama import add_rms_norm

# (rows, width, activation-scale upper bound or None); widths not powers of two on purpose.
CASES = {
    "quant_rows": (5, 96, None),
    "quant_rows_ub": (3, 200, 1.5),
    "silu_mul_quant": (4, 80, None),
    "silu_mul_quant_ub": (3, 48, 0.5),
    "add_rms_norm_quant": (5, 96, None),
    "add_rms_norm_quant_ub": (2, 40, 2.0),
}


def compare(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> dict:
    """Share of FP8 values that differ, and the largest difference of the dequantised values in
    units of the row's e4m3 step at that value (one step = a rounding that went the other way)."""
    a, b = q.float() * s, q_ref.float() * s_ref
    step = torch.maximum(b.abs(), 2**-6 * s_ref) * 2**-3  # e4m3: 3 mantissa bits, normals from 2^-6
    return {
        "differing": float((q.float() != q_ref.float()).float().mean()),
        "max_steps": float(((a - b).abs() / step).max()),
        "scale_rel_err": float(((s - s_ref).abs() / s_ref).max()),
        "dtype": str(q.dtype),
        "shape": list(q.shape),
    }


def run_case(name: str, rows: int, width: int, ub: float | None, *, seed: int) -> dict:
    torch.manual_seed(seed)
    if name.startswith("quant_rows"):
        x = torch.randn(rows, width) * 3
        x[0, 1] = 40.0  # one outlier: the upper bound then clamps
        return compare(*fp8_fused.quant_rows(x, ub), *fp8.quantize_rows(x, ub))
    if name.startswith("silu_mul_quant"):
        gu = torch.randn(rows, 2 * width) * 2
        g, u = gu.chunk(2, dim=-1)
        return compare(*fp8_fused.silu_mul_quant(gu, ub), *fp8.quantize_rows(F.silu(g) * u, ub))
    x, delta, w = torch.randn(rows, width), torch.randn(rows, width) * 2, torch.rand(width) + 0.5
    xo, (q, s) = fp8_fused.add_rms_norm_quant(x, delta, w, 1e-5, ub)
    x_ref, h = add_rms_norm(x, delta, w, 1e-5)
    return {**compare(q, s, *fp8.quantize_rows(h, ub)), "residual_equal": bool(torch.equal(xo, x_ref))}


def main() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    results: dict = {"interpreted": isinstance(fp8_fused._quant_rows_kernel, InterpretedFunction)}
    for i, (name, case) in enumerate(CASES.items()):
        results[name] = run_case(name, *case, seed=i)
    # A bf16 input (what the card feeds): bf16 → float32 is exact in the interpreter too.
    x = (torch.randn(4, 64) * 3).bfloat16()
    results["quant_rows_bf16_input"] = compare(*fp8_fused.quant_rows(x), *fp8.quantize_rows(x))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
