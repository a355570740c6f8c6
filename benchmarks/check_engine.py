"""GPU sanity check of the fast engine against plain generate() (run on the GPU machine).

Builds a random-weight model, runs the same prompts through the fast runner (flash varlen +
CUDA graphs), the fast runner without graphs, and plain `model.generate()`, and prints the share
of greedy tokens that agree, plus batched-vs-alone agreement. bf16 ties can flip late tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from workers.gpu.bench import reference_prompts
from workers.gpu.engine import SamplingParams, load_engine


def agree(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in a))


def first_diverge(a, b) -> list[int]:
    out = []
    for ra, rb in zip(a, b):
        k = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra))
        out.append(k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3-1b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    eng = load_engine(args.model, device_map="cuda:0")
    print("engine", eng.backend, eng.attn_implementation, eng.dtype, eng.devices)
    prompts = reference_prompts(args.prompts, vocab_size=eng.model.config.vocab_size, low=100, high=900)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = {}
    for name, kwargs in [("fast", {}), ("hf", {"backend": "hf"})]:
        eng.generate(prompts, sp, **kwargs)
        t = time.perf_counter()
        gens, tm = eng.generate(prompts, sp, **kwargs)
        rows[name] = [g.token_ids for g in gens]
        print(f"{name}: {time.perf_counter() - t:.3f}s prefill {tm.prefill_s} decode {tm.decode_s} peak {tm.peak_memory_bytes}")
    alone = [eng.generate([p], sp)[0][0].token_ids for p in prompts]
    eng.runner.use_graphs = False
    eng.release()
    nograph = [g.token_ids for g in eng.generate(prompts, sp)[0]]
    print("fast vs hf agreement", agree(rows["fast"], rows["hf"]), first_diverge(rows["fast"], rows["hf"]))
    print("fast batched vs alone", agree(rows["fast"], alone), first_diverge(rows["fast"], alone))
    print("graph vs no graph", agree(rows["fast"], nograph), first_diverge(rows["fast"], nograph))


if __name__ == "__main__":
    main()
