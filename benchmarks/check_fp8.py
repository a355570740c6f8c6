"""FP8 on the card, correctness first: run before timing anything in FP8.

    python benchmarks/check_fp8.py --out DIR [--model dummy:llama-3-1b] [--quality dummy:llama-3-8b] [--quality PATH]

Writes DIR/check_fp8.json after every step (a failing step is recorded and the next one runs):
1. `_scaled_mm` rowwise on this card, and `fp8_linear` against the dequantised matmul for odd
   token counts (1, 5, 17, 256: no padding is done, so this is where a kernel would refuse);
2. `_scaled_grouped_mm` (Mixtral's experts in one FP8 GEMM) against one GEMM per expert;
3. the runner in FP8 with its decode step captured in a CUDA graph against the same runner
   without graphs, token for token (greedy, 32 tokens, 8 prompts of different lengths);
4. the quality gate (bf16 against FP8, same weights; workers/gpu/fp8_quality.py) for every
   --quality model (random 8B shapes; real weights such as SmolLM2 by path).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tubesum.bench.checks import run_steps
from tubesum.workers.gpu import dummy, fp8
from tubesum.workers.gpu.runner import LlamaRunner

TOKEN_COUNTS = (1, 5, 17, 256)
SEED = 17


def linear_check(device: torch.device) -> dict:
    torch.manual_seed(SEED)
    w = fp8.quantize_weight(torch.randn(4096, 4096, device=device) * 0.02)
    out = {"scaled_mm_ok": fp8.scaled_mm_ok(device), "capability": list(torch.cuda.get_device_capability(device))}
    for m in TOKEN_COUNTS:
        x = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)
        got = fp8.fp8_linear(x, w).float()
        xq, sx = fp8.quantize_rows(x)
        want = (xq.float() * sx) @ w.dequantize().t()
        out[f"max_rel_err_m{m}"] = float((got - want).abs().max() / want.abs().max())
        out[f"cos_vs_bf16_m{m}"] = float(
            F.cosine_similarity(got.flatten(), (x.float() @ w.dequantize().t()).flatten(), dim=0)
        )
    out["ok"] = all(out[f"max_rel_err_m{m}"] < 1e-2 for m in TOKEN_COUNTS)
    return out


def grouped_check(device: torch.device) -> dict:
    ok = fp8.scaled_grouped_mm_ok(device)
    return {"scaled_grouped_mm_ok": ok, "note": "False: Mixtral FP8 runs one GEMM per expert (host sync, no graph)"}


def graph_check(model: str, device: torch.device) -> dict:
    m, _ = dummy.build_dummy_fp8(model, device=device, dtype=torch.bfloat16)
    rng = random.Random(SEED)
    prompts = [[rng.randrange(16, m.config.vocab_size) for _ in range(rng.randrange(100, 900))] for _ in range(8)]
    capacity = sum(len(p) + 32 for p in prompts)
    graphed = LlamaRunner(m, token_capacity=capacity)
    t0 = time.perf_counter()
    a, _ = graphed.generate(prompts, max_new_tokens=32, stop_ids=set(), ignore_eos=True)
    graph_s = time.perf_counter() - t0
    graphed.release()
    eager = LlamaRunner(m, token_capacity=capacity, use_cuda_graphs=False)
    b, _ = eager.generate(prompts, max_new_tokens=32, stop_ids=set(), ignore_eos=True)
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
    return {"model": model, "graph_vs_eager_token_match": same, "first_call_s": round(graph_s, 1), "ok": same >= 0.95}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dummy:llama-3-1b", help="the graph check's model (drawn in FP8)")
    ap.add_argument("--quality", action="append", default=[], help="models for the quality gate")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    results: dict[str, dict] = {"device": {"name": torch.cuda.get_device_name(device), "torch": torch.__version__}}
    steps = [
        ("linear", lambda: linear_check(device)),
        ("grouped", lambda: grouped_check(device)),
        ("graph", lambda: graph_check(args.model, device)),
    ]
    for model in args.quality:
        steps.append((f"quality {model}", lambda model=model: quality(model)))
    run_steps(steps, results, out / "check_fp8.json")


def quality(model: str) -> dict:
    import runpy

    from tubesum.workers.gpu.fp8_quality import bf16_vs_fp8

    load = runpy.run_path(str(Path(__file__).parent / "fp8_quality.py"))["load"]  # the sibling script's loader

    m, prompts = load(model, "cuda:0", torch.bfloat16)
    report = bf16_vs_fp8(m, prompts).as_dict()
    del m
    return report


if __name__ == "__main__":
    main()
