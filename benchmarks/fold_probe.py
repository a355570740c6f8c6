"""What would a mixed batch (prefill tokens folded into the decode step) save on this card?

    python benchmarks/fold_probe.py --out DIR [--rows 256,512] [--prompt-tokens 1050] [--steps 150]

A mixed batch (vLLM's and SGLang's chunked prefill) runs the next chunk's prompt tokens through
the decode step's projections: one GEMM of M = rows + P tokens instead of one of `rows` and one
of P. Everything else in the step is unchanged by folding: norms, rotary and activations cost the
same per token either way, decode attention still reads every row's KV cache, and the prefill
tokens' attention is still computed. So the GEMMs are the whole of what folding can save, and
this probe times exactly them, with Llama-3-8B's shapes (one layer's q/k/v, o, gate/up and down
projections, times 32 layers), in bf16 and in FP8 (the engine's `fp8.scaled_matmul`, activations
already quantised: the quantisers are per token, so they too cost the same folded or not).

P is the share of the next chunk's prefill one decode step carries when it is spread evenly over
the chunk's decode: rows × prompt-tokens ÷ steps (512 rows of 1,050 tokens over 150 steps: 3,584).
`saved_per_chunk_s` = steps × (t(rows) + t(P) − t(rows + P)): the most a mixed batch takes off a
chunk's wall time; set it beside the bench's chunk time of the same call. Writes DIR/fold_probe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tubesum.workers.gpu import fp8

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4096, 14336, 32, 8, 128, 32
# (N, K) of one layer's projections: q/k/v fused, o, gate/up fused, down.
SHAPES = {
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HEADS * HEAD_DIM),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
}
ITERS = 20
REPEATS = 5


def _time_ms(fn) -> float:
    """Median over REPEATS of the mean of ITERS calls, after a warm-up. Milliseconds."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ITERS):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / ITERS)
    return statistics.median(runs)


class Layer:
    """One decoder layer's four projections in one precision, and the time of a pass of M tokens."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision, self.device = precision, device
        gen = torch.Generator(device=device).manual_seed(0)
        self.weights = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
            self.weights[name] = fp8.quantize_weight(w) if precision == "fp8" else w

    def pass_ms(self, m: int) -> float:
        inputs = {}
        for name, (_, k) in SHAPES.items():
            x = torch.randn(m, k, device=self.device, dtype=torch.bfloat16)
            inputs[name] = fp8.quantize_rows(x) if self.precision == "fp8" else x

        def run() -> None:
            for name, w in self.weights.items():
                if self.precision == "fp8":
                    xq, sx = inputs[name]
                    fp8.scaled_matmul(xq, sx, w, torch.bfloat16)
                else:
                    torch.nn.functional.linear(inputs[name], w)

        return _time_ms(run) * LAYERS


def probe(precision: str, rows: list[int], prompt_tokens: int, steps: int) -> list[dict]:
    layer = Layer(precision, torch.device("cuda", 0))
    out = []
    for r in rows:
        p = r * prompt_tokens // steps
        alone, prefill, folded = layer.pass_ms(r), layer.pass_ms(p), layer.pass_ms(r + p)
        saved = alone + prefill - folded
        out.append(
            {
                "precision": precision,
                "rows": r,
                "prefill_tokens_per_step": p,
                "decode_gemms_ms": alone,
                "prefill_gemms_ms": prefill,
                "folded_gemms_ms": folded,
                "saved_per_step_ms": saved,
                "saved_per_chunk_s": saved * steps / 1e3,
                "decode_gemm_tflops": 2 * r * _flops_per_token() / (alone / 1e3) / 1e12,
                "folded_gemm_tflops": 2 * (r + p) * _flops_per_token() / (folded / 1e3) / 1e12,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def _flops_per_token() -> int:
    """Multiply-adds of one token through the 32 layers' projections."""
    return LAYERS * sum(n * k for n, k in SHAPES.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="128,256,512")
    ap.add_argument("--prompt-tokens", type=int, default=1050)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--precision", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [int(r) for r in args.rows.split(",")]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "probes": []}
    for precision in args.precision or ["bf16", "fp8"]:
        result["probes"] += probe(precision, rows, args.prompt_tokens, args.steps)
        (out / "fold_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
