"""Where the time goes (run on the GPU machine): one chunk's packed prefill and its decode step,
kernel by kernel, per precision; and prefill throughput at several prefill token budgets.

    python benchmarks/profile_engine.py --out DIR [--model dummy:llama-3-8b] [--rows 256]
        [--quantize none --quantize fp8] [--kv-cache-dtype auto --kv-cache-dtype fp8]
        [--budgets 16384,32768,65536]

Kernels are grouped into what they do (GEMM, attention, the compiled elementwise kernels, the
FP8 decode kernel, copies, other) so a table says which part an optimisation has to shrink.
Writes DIR/profile_engine.json as it goes; prints one table per precision.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import tubesum.workers.gpu.runner as runner_mod
from tubesum.workers.gpu import dummy
from tubesum.workers.gpu.kv_cache import row_starts
from tubesum.workers.gpu.runner import LlamaRunner

NEW_TOKENS = 150
STEPS = 20  # profiled decode steps
SEED = 1234

# First match wins (FlashAttention's template names mention GEMMs, so attention comes first); names
# as CUPTI reports them (cuBLAS/CUTLASS GEMMs, FlashAttention, Triton).
CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|attention", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|sm90_xmma|xmma|f8f8bf16|scaled_mm", re.I)),
    ("fp8 decode kernel", re.compile(r"_split_kernel|_merge_kernel")),
    ("compiled elementwise", re.compile(r"^triton_")),
    ("copy / fill", re.compile(r"memcpy|memset|copy|fill|CatArrayBatched", re.I)),
)


def category(name: str) -> str:
    return next((c for c, pat in CATEGORIES if pat.search(name)), "other")


def _prompts(n: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(SEED)
    return [[rng.randrange(16, vocab) for _ in range(rng.randrange(700, 1400))] for _ in range(n)]


def _kernels(prof) -> dict:
    """Per category and per kernel name: total device milliseconds and calls."""
    by_name: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        slot = by_name.setdefault(ev.name, [0.0, 0])
        slot[0] += ev.device_time_total / 1e3  # µs → ms
        slot[1] += 1
    cats: dict[str, float] = {}
    for name, (ms, _) in by_name.items():
        cats[category(name)] = cats.get(category(name), 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "total_ms": sum(cats.values()),
        "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:120], "ms": ms, "calls": c, "category": category(n)} for n, (ms, c) in top],
    }


def _sync_s(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(model_name: str, quantize: str, kv_cache_dtype: str, rows: int, budgets: list[int]) -> dict:
    device = torch.device("cuda", 0)
    build = dummy.build_dummy_fp8 if quantize == "fp8" else dummy.build_dummy
    model, _ = build(model_name, device=device, dtype=torch.bfloat16)
    prompts = _prompts(rows, model.config.vocab_size)
    lengths = [len(p) + NEW_TOKENS for p in prompts]
    starts = row_starts(lengths)
    runner = LlamaRunner(model, kv_cache_dtype=kv_cache_dtype, token_capacity=sum(lengths) + 1024)
    out: dict = {"model": model_name, "quantize": quantize, "kv_cache_dtype": kv_cache_dtype, "rows": rows}
    tokens = sum(len(p) for p in prompts)
    with torch.inference_mode():
        dec = runner._decoder_for(rows, max(lengths), (), NEW_TOKENS)

        def load() -> None:
            dec.park(list(range(dec.rows)))
            first = runner._prefill_all(prompts, starts, dec)
            dec.place(list(range(rows)), first, [len(p) for p in prompts], starts, lengths)

        sweep = {}
        for budget in budgets:
            runner_mod.PREFILL_TOKEN_BUDGET = budget
            _sync_s(load)  # warm-up at this budget (new shapes compile once)
            sweep[budget] = min(_sync_s(load) for _ in range(2))
        out["prefill_s_by_budget"] = sweep
        out["prefill_tok_s_by_budget"] = {b: tokens / s for b, s in sweep.items()}
        runner_mod.PREFILL_TOKEN_BUDGET = budgets[0]
        _sync_s(load)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            load()
            torch.cuda.synchronize()
        out["prefill"] = _kernels(prof)
        out["prefill_tokens"] = tokens

        for _ in range(3):
            dec.run()
        out["decode_step_ms"] = _sync_s(lambda: [dec.run() for _ in range(STEPS)]) / STEPS * 1e3
        load()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                dec.run()
            torch.cuda.synchronize()
        d = _kernels(prof)
        out["decode"] = {**d, "per_step_ms": d["total_ms"] / STEPS}
    runner.release()
    runner_mod.PREFILL_TOKEN_BUDGET = 16384
    return out


def _table(r: dict) -> str:
    lines = [f"== {r['quantize']} / kv {r['kv_cache_dtype']} / {r['rows']} rows"]
    lines.append("prefill s by budget: " + ", ".join(f"{b}: {s:.3f}" for b, s in r["prefill_s_by_budget"].items()))
    for phase in ("prefill", "decode"):
        p = r[phase]
        lines.append(f"{phase}: {p['total_ms']:.1f} ms of kernels")
        for c, ms in p["categories_ms"].items():
            lines.append(f"  {c:22s} {ms:9.1f} ms {100 * ms / p['total_ms']:5.1f}%")
        for k in p["top"][:8]:
            lines.append(f"    {k['ms']:9.1f} ms {k['calls']:6d}x  {k['name'][:90]}")
    lines.append(f"decode step (timed) {r['decode_step_ms']:.2f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--quantize", action="append", default=[])
    ap.add_argument("--kv-cache-dtype", action="append", default=[])
    ap.add_argument("--budgets", default="16384,32768,65536")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in args.budgets.split(",")]
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    for q in args.quantize or ["none", "fp8"]:
        for kv in args.kv_cache_dtype or ["auto"]:
            try:
                r = run(args.model, q, kv, args.rows, budgets)
                print(_table(r), flush=True)
            except Exception as e:  # recorded; the next precision still runs
                r = {"quantize": q, "kv_cache_dtype": kv, "error": f"{type(e).__name__}: {e}"[:500]}
                print(r, flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            results["runs"].append(r)
            (out / "profile_engine.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
