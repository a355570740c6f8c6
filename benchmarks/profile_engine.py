"""Where the time goes (run on the GPU machine): decode-step kernels at a given chunk size,
and prefill throughput at two prefill token budgets.

    python benchmarks/profile_engine.py --model dummy:llama-3-8b --rows 256
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import tubesum.workers.gpu.runner as runner_mod
from tubesum.bench.study import reference_prompts
from tubesum.workers.gpu.engine import SamplingParams, load_engine


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budgets", default="16384,32768")
    args = ap.parse_args()
    eng = load_engine(args.model, device_map="cuda:0")
    eng.warmup()
    prompts = reference_prompts(args.rows, vocab_size=eng.model.config.vocab_size)

    for budget in map(int, args.budgets.split(",")):
        runner_mod.PREFILL_TOKEN_BUDGET = budget
        eng.generate(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True))
        times = [
            eng.generate(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True))[1].prefill_s for _ in range(2)
        ]
        tokens = sum(map(len, prompts))
        print(f"prefill budget {budget}: {min(times):.3f}s for {tokens} tokens = {tokens / min(times):,.0f} tok/s")
    runner_mod.PREFILL_TOKEN_BUDGET = 16384

    # Cache and graph sized for 64 new tokens; rewind so the profiled steps stay inside them.
    eng.generate(prompts, SamplingParams(max_new_tokens=64, ignore_eos=True))
    dec = next(reversed(eng.runner._graphs.values()))  # the graph that chunk used last
    dec.step.fill_(1)
    dec.pos[: len(prompts)].copy_(torch.tensor([len(p) for p in prompts], device=dec.pos.device))
    for _ in range(3):
        dec.run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        dec.run()
    torch.cuda.synchronize()
    print(f"decode step at {args.rows} rows: {(time.perf_counter() - t0) / args.steps * 1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            dec.run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
