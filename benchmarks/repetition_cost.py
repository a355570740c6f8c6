"""The repetition rule's cost on the reference workload (docs/PERF "summary-8b": Llama-3-8B shapes,
random weights, bf16, prompts of 700-1400 tokens, 150 new tokens each, EOS suppressed): the same
engine.generate() call with and without the rule, alternating, best of --reps. Writes
$OUT/repetition_cost.json after every measurement.

    python $REPO/benchmarks/repetition_cost.py --rows 64,256 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tubesum.bench.study import reference_prompts
from tubesum.workers.gpu.engine import SamplingParams, load_engine

NEW_TOKENS = 150  # the reference workload's summary length


def timed(eng, prompts, params) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--rows", default="64,256", help="prompts per call (comma-separated)")
    ap.add_argument("--ngram", type=int, default=3, help="no_repeat_ngram_size of the rule")
    ap.add_argument("--penalty", type=float, default=1.0, help="repetition_penalty of the rule (1.0: off)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out) / "repetition_cost.json"
    eng = load_engine(args.model, device_map="cuda:0")
    eng.warmup()
    off = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    on = SamplingParams(
        max_new_tokens=NEW_TOKENS, ignore_eos=True, no_repeat_ngram_size=args.ngram, repetition_penalty=args.penalty
    )
    report: dict = {"model": args.model, "device": torch.cuda.get_device_name(0), "rule": on.repeat_rules, "runs": []}
    for rows in (int(r) for r in args.rows.split(",")):
        prompts = reference_prompts(rows, vocab_size=eng.model.config.vocab_size)
        for params in (off, on):
            eng.generate(prompts, params)  # capture this graph once, outside the timing
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(args.reps):
            for name, params in (("off", off), ("on", on)):
                best[name] = min(best[name], timed(eng, prompts, params))
        tokens = rows * NEW_TOKENS
        run = {
            "rows": rows,
            "off_s": best["off"],
            "on_s": best["on"],
            "off_tokens_per_s": tokens / best["off"],
            "on_tokens_per_s": tokens / best["on"],
            "cost": best["on"] / best["off"] - 1.0,
        }
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
