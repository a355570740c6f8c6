"""Folded prefill on a card: the same tokens as rolling without it, and what it saves.

    python benchmarks/check_fold.py --out DIR [--model dummy:llama-3-8b] [--rows 128,256]
        [--quantize none] [--kv-cache-dtype auto]

For each row count R: 2R reference prompts (700-1,399 tokens) with the bench's varied output
lengths (40-250, mean about 120: rows end apart, as real summaries do), one rolling generate()
call, at most R rows at once (the bench's "rolling" mode), once with `fold` off and once on, each
after a warm-up call and timed REPEATS times (median). Reports summaries/s both ways, how many
prompts joined through mixed steps, and the share of rows whose tokens are the same both ways
(bf16 GEMMs of another shape may round differently, so near-ties can flip late tokens).
Writes DIR/check_fold.json after every row count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tubesum.bench.study import reference_prompts, varied_lengths
from tubesum.workers.gpu.engine import SamplingParams, load_engine

REPEATS = 3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(
    engine, prompts, params, limits, rows: int, fold: bool, repeats: int = REPEATS
) -> tuple[float, list[list[int]], int]:
    """Median seconds of `repeats` calls (after one warm-up), the tokens, the prompts folded."""
    runner = engine.runner
    folded: list[int] = []
    real = runner.generate

    def counting(*args, **kwargs):
        tokens, stats = real(*args, **kwargs)
        folded.append(stats.folded_prompts)
        return tokens, stats

    runner.generate = counting
    try:
        engine.generate(prompts, params, new_tokens=limits, rolling=True, max_rows=rows, fold=fold)
        times = []
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            gens, _ = engine.generate(prompts, params, new_tokens=limits, rolling=True, max_rows=rows, fold=fold)
            _sync()
            times.append(time.perf_counter() - t0)
    finally:
        runner.generate = real
    return statistics.median(times), [g.token_ids for g in gens], folded[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--rows", default="128,256")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--prompt-tokens", default="700,1400", help="low,high: prompt lengths (a CPU smoke: 20,60)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = load_engine(args.model, quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
    engine.warmup()
    result = {
        "device": engine.devices,
        "torch": torch.__version__,
        "model": args.model,
        "quantize": args.quantize,
        "kv_cache_dtype": args.kv_cache_dtype,
        "runs": [],
    }
    for rows in [int(r) for r in args.rows.split(",")]:
        low, high = (int(n) for n in args.prompt_tokens.split(","))
        prompts = reference_prompts(2 * rows, vocab_size=engine.model.config.vocab_size, low=low, high=high)
        limits = varied_lengths(len(prompts))
        params = SamplingParams(max_new_tokens=max(limits), ignore_eos=True)
        plain_s, plain, _ = _timed(engine, prompts, params, limits, rows, fold=False, repeats=args.repeats)
        fold_s, folded, n_folded = _timed(engine, prompts, params, limits, rows, fold=True, repeats=args.repeats)
        same = sum(a == b for a, b in zip(plain, folded)) / len(prompts)
        first32 = sum(a[:32] == b[:32] for a, b in zip(plain, folded)) / len(prompts)
        run = {
            "rows": rows,
            "prompts": len(prompts),
            "rolling_s": plain_s,
            "fold_s": fold_s,
            "rolling_per_s": len(prompts) / plain_s,
            "fold_per_s": len(prompts) / fold_s,
            "gain": plain_s / fold_s,
            "folded_prompts": n_folded,
            "rows_identical": same,
            "rows_identical_first_32": first32,
            "lengths_equal": [len(t) for t in plain] == [len(t) for t in folded] == limits,
        }
        result["runs"].append(run)
        (out / "check_fold.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
