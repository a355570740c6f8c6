"""The fourth session's kernels against what they replace, on the card, one call:

* the one-pass FP8 quantisers (workers/gpu/fp8_fused.py) against the compiled torch functions,
  at a prefill sub-batch's shape (16,384 tokens, Llama-3-8B widths): same bytes? how fast?
* the decode attention kernel launched KV heads first against rows first, on an FP8 and a bf16
  cache, and the bf16 cache against FlashAttention's varlen kernel with GQA packing (the bf16
  path until now), at 256 and 512 rows of ~1,100 keys: same output? how fast?

    python benchmarks/check_fused.py --out DIR

Writes DIR/check_fused.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from tubesum.workers.gpu import fp8, fp8_fused
from tubesum.workers.gpu.decode_attention import KernelConfig, decode_attention
from tubesum.workers.gpu.kv_cache import quantise_kv, row_starts
from tubesum.workers.gpu.llama import _flash, add_rms_norm_quant, silu_mul_quant

HIDDEN, INTER, TOKENS = 4096, 14336, 16384
KV_HEADS, HEADS, HEAD_DIM = 8, 32, 128
REPEATS = 20


def _time_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / REPEATS * 1e3


def _agree(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict:
    return {
        "same_fp8_share": float((a[0].view(torch.uint8) == b[0].view(torch.uint8)).float().mean()),
        "scale_rel_err": float(((a[1] - b[1]).abs() / b[1]).max()),
    }


def quantisers() -> dict:
    dev = torch.device("cuda", 0)
    x = torch.randn(TOKENS, HIDDEN, device=dev, dtype=torch.bfloat16)
    delta = torch.randn_like(x)
    w = torch.rand(HIDDEN, device=dev, dtype=torch.bfloat16) + 0.5
    gu = torch.randn(TOKENS, 2 * INTER, device=dev, dtype=torch.bfloat16)
    compiled = {
        "quant_rows": torch.compile(fp8.quantize_rows, fullgraph=True),
        "silu_mul_quant": torch.compile(silu_mul_quant, fullgraph=True),
        "add_rms_norm_quant": torch.compile(add_rms_norm_quant, fullgraph=True),
    }
    out = {}
    for name, args in {
        "quant_rows": (x, None),
        "silu_mul_quant": (gu, None),
        "add_rms_norm_quant": (x, delta, w, 1e-5, None),
    }.items():
        old, new = compiled[name], getattr(fp8_fused, name)
        a, b = new(*args), old(*args)
        if name == "add_rms_norm_quant":
            r = {"residual_equal": bool(torch.equal(a[0], b[0])), **_agree(a[1], b[1])}
        else:
            r = _agree(a, b)
        r["compiled_ms"] = _time_ms(lambda: old(*args))  # noqa: B023 (called at once)
        r["one_pass_ms"] = _time_ms(lambda: new(*args))  # noqa: B023
        out[name] = r
        print(name, json.dumps(r), flush=True)
    return out


def decode(rows: int) -> dict:
    dev = torch.device("cuda", 0)
    rng = random.Random(1234)
    used_list = [rng.randrange(700, 1400) + 75 for _ in range(rows)]
    starts_list = row_starts([u + 75 for u in used_list])
    slots = starts_list[-1] + used_list[-1] + 75
    k16 = torch.randn(slots, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v16 = torch.randn_like(k16)
    scale = torch.full((KV_HEADS,), 4.0 / 448, device=dev)
    k8, v8 = quantise_kv(k16, scale).view(torch.uint8), quantise_kv(v16, scale).view(torch.uint8)
    q = torch.randn(rows, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    starts = torch.tensor(starts_list, device=dev, dtype=torch.int32)
    used = torch.tensor(used_list, device=dev, dtype=torch.int32)
    max_k = max(used_list)
    group = HEADS // KV_HEADS
    cu_k = torch.tensor([*starts_list, slots], device=dev, dtype=torch.int32)
    cu_grouped = torch.arange(rows + 1, device=dev, dtype=torch.int32) * group

    def flash() -> torch.Tensor:  # the bf16 path so far (workers/gpu/llama.py, GQA packing)
        qg = q.view(rows, KV_HEADS, group, HEAD_DIM).transpose(1, 2).reshape(rows * group, KV_HEADS, HEAD_DIM)
        o = _flash(qg, k16, v16, cu_grouped, cu_k, group, max_k, causal=False, seqused_k=used)
        return o.view(rows, group, KV_HEADS, HEAD_DIM).transpose(1, 2).reshape(rows, HEADS, HEAD_DIM)

    first, rows_first = KernelConfig(), KernelConfig(heads_first=False)
    runs = {
        "flash_bf16": flash,
        "triton_bf16_heads_first": lambda: decode_attention(
            q, k16, v16, None, None, starts, used, max_k=max_k, config=first
        ),
        "triton_bf16_rows_first": lambda: decode_attention(
            q, k16, v16, None, None, starts, used, max_k=max_k, config=rows_first
        ),
        "triton_fp8_heads_first": lambda: decode_attention(
            q, k8, v8, scale, scale, starts, used, max_k=max_k, config=first
        ),
        "triton_fp8_rows_first": lambda: decode_attention(
            q, k8, v8, scale, scale, starts, used, max_k=max_k, config=rows_first
        ),
    }
    kv_tokens = sum(used_list)
    out: dict = {"rows": rows, "kv_tokens": kv_tokens}
    ref16, ref8 = flash().float(), runs["triton_fp8_rows_first"]().float()
    for name, fn in runs.items():
        ms = _time_ms(fn)
        ref = ref8 if "fp8" in name else ref16
        bytes_read = kv_tokens * KV_HEADS * HEAD_DIM * 2 * (1 if "fp8" in name else 2)
        out[name] = {"ms": ms, "TB_s": bytes_read / ms / 1e9, "max_abs_diff": float((fn().float() - ref).abs().max())}
        print(rows, name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with torch.inference_mode():
        res["quantisers"] = quantisers()
        (out / "check_fused.json").write_text(json.dumps(res, indent=1))
        res["decode"] = [decode(256), decode(512)]
    (out / "check_fused.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
