"""The runner's decode step through the Triton decode kernel, on the CPU under Triton's
interpreter, against the same runner's SDPA decode: what `Llama.decode_logits` does on a card
(a bf16 cache with `llama.DECODE_KERNEL = "triton"`, an FP8 cache always), wired the same way.

A separate process (tests/test_kv_fp8.py starts it with TRITON_INTERPRET=1; see
tests/decode_attention_cases.py why). Prints JSON: per cache, the largest logit difference of one
decode step and whether eight greedy tokens per prompt are the same.

    TRITON_INTERPRET=1 python tests/triton_decode_engine_case.py
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from tubesum.workers.gpu import dummy
from tubesum.workers.gpu.decode_attention import decode_attention
from tubesum.workers.gpu.runner import LlamaRunner
from tubesum.workers.gpu.tp import probe_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 5, [20, 21, 22] * 9, list(range(30, 90))]
NEW_TOKENS = 8


def main() -> None:
    config, _ = dummy.dummy_config_with_tokens("dummy:tiny")
    config.initializer_range = 0.05
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    results = {}
    for kv in ("auto", "fp8"):
        sdpa = LlamaRunner(model, kv_cache_dtype=kv)
        triton = LlamaRunner(model, kv_cache_dtype=kv)
        assert sdpa.llama._triton_decode is None  # the CPU's own path
        triton.llama._triton_decode = decode_attention  # the card's
        (p0, s0), (p1, s1) = probe_logits(sdpa, PROMPTS), probe_logits(triton, PROMPTS)
        t0, _ = sdpa.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_ids=set(), ignore_eos=True)
        t1, _ = triton.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_ids=set(), ignore_eos=True)
        results[kv] = {
            "prefill_equal": bool(torch.equal(p0, p1)),
            "step_max_abs_diff": float((s0 - s1).abs().max()),
            "step_logit_scale": float(s0.abs().max()),
            "tokens_equal": t0 == t1,
            "tokens": len(t0[0]),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
