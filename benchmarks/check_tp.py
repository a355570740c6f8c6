"""GPU check of tensor parallelism (run on a 2-GPU machine before the big timings):
the tiny Mixtral (MoE + attention, bf16, FlashAttention varlen, CUDA-graph decode with NCCL
all-reduces captured) over 2 GPUs against the same model on one GPU: logits and greedy tokens."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tubesum.bench.study import reference_prompts
from tubesum.workers.gpu.dummy import save_dummy
from tubesum.workers.gpu.engine import SamplingParams, load_engine
from tubesum.workers.gpu.tp import probe_logits


def step(text: str, t0: float = time.perf_counter()) -> None:
    print(f"{time.perf_counter() - t0:7.1f}s {text}", flush=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    faulthandler.dump_traceback_later(float(os.environ.get("TUBESUM_TP_DUMP_S", "600")), exit=False)
    spec = sys.argv[1] if len(sys.argv) > 1 else "dummy:tiny-mixtral"
    path = str(save_dummy(spec, Path(tempfile.mkdtemp(prefix="tubesum-check-tp-")) / spec.removeprefix("dummy:")))
    prompts = reference_prompts(16, vocab_size=512, low=20, high=400)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    t = time.perf_counter()
    step("saved")
    single = load_engine(path, device_map="cuda:0", dtype="bfloat16")
    a1, b1 = probe_logits(single.runner, prompts)
    step("single: probe")
    g1, _ = single.generate(prompts, params)
    g1, _ = single.generate(prompts, params)
    step("single: generate")
    del single
    torch.cuda.empty_cache()
    tp = load_engine(path, device_map="cuda:0", dtype="bfloat16", tensor_parallel=2)
    step("tp: loaded")
    a2, b2 = tp.group.probe(prompts)
    step("tp: probe")
    g2, _ = tp.generate(prompts, params)
    step("tp: generate")
    g2, timings = tp.generate(prompts, params)  # graph reused
    same = sum(x == y for p, q in zip(g1, g2) for x, y in zip(p.token_ids, q.token_ids))
    total = sum(len(p.token_ids) for p in g1)
    first_same = sum(p.token_ids[0] == q.token_ids[0] for p, q in zip(g1, g2))
    out = dict(
        model=spec,
        devices=tp.devices,
        prefill_logits_max_abs_diff=float((a1 - a2).abs().max()),
        decode_logits_max_abs_diff=float((b1 - b2).abs().max()),
        logits_scale=float(a1.abs().max()),
        first_token_match=f"{first_same}/{len(g1)}",
        token_match_rate=same / total,
        graph=any(g.graph is not None for g in tp.runner.runner._graphs.values()),
        nccl=torch.cuda.nccl.version(),
        decode_s=timings.decode_s,
        seconds=time.perf_counter() - t,
    )
    print(json.dumps(out), flush=True)
    tp.close()
    step("tp: closed")


if __name__ == "__main__":
    main()
