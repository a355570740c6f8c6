"""The generation engine on the tiny CPU model (fp32): the fast runner's logic, exactly."""

from __future__ import annotations

import random

import pytest
import torch

from tubesum.errors import OutOfMemory
from tubesum.workers.gpu.engine import SamplingParams
from tubesum.workers.gpu.runner import KVCache, LlamaRunner


def mixed_prompts(n: int, *, seed: int = 0, low: int = 3, high: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 512) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def test_loads_by_path_with_the_fast_backend(tiny_engine):
    assert tiny_engine.backend == "fast"
    assert tiny_engine.dtype == "float32"
    assert tiny_engine.attn_implementation == "sdpa"  # no CUDA: PyTorch attention in the runner
    assert tiny_engine.tokenizer.padding_side == "left"
    # every end token of the generation config, not only EOS
    assert tiny_engine.stop_ids == {tiny_engine.tokenizer.convert_tokens_to_ids("</s>"),
                                    tiny_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_batched_equals_alone_exactly(tiny_engine):
    prompts = mixed_prompts(7, seed=1)
    params = SamplingParams(max_new_tokens=24)
    batched, timings = tiny_engine.generate(prompts, params)
    for prompt, gen in zip(prompts, batched):
        alone, _ = tiny_engine.generate([prompt], params)
        assert alone[0].token_ids == gen.token_ids
    assert timings.batch_size == 7
    assert timings.prompt_tokens == sum(map(len, prompts))
    assert timings.padded_prompt_tokens == timings.prompt_tokens  # packed prefill: no padding
    assert timings.generated_tokens == sum(len(g.token_ids) for g in batched)
    assert timings.prefill_s > 0 and timings.decode_s > 0 and timings.wall_s > 0


def test_fast_runner_equals_plain_generate(tiny_engine):
    """The runner re-implements the forward pass; HF's generate() is the reference."""
    prompts = mixed_prompts(5, seed=2)
    params = SamplingParams(max_new_tokens=20)
    fast, _ = tiny_engine.generate(prompts, params, backend="fast")
    plain, plain_t = tiny_engine.generate(prompts, params, backend="hf")
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]
    assert plain_t.padded_prompt_tokens == 5 * max(map(len, prompts))  # generate() pads


def test_logits_match_hf_forward(tiny_engine):
    r: LlamaRunner = tiny_engine.runner
    prompts = mixed_prompts(3, seed=3, low=10)
    cache = KVCache(layers=len(r.layers), rows=3, slots=256, kv_heads=r.n_kv, head_dim=r.head_dim,
                    dtype=r.dtype, device=r.device)
    with torch.inference_mode():
        ours = r.prefill_logits(prompts, [0, 1, 2], cache)
        tokens = ours.argmax(-1)
        pos = torch.tensor([len(p) for p in prompts])
        step = r.decode_logits(tokens, pos, cache)
        for i, p in enumerate(prompts):
            ref = tiny_engine.model(input_ids=torch.tensor([p + [int(tokens[i])]])).logits[0, -2:]
            torch.testing.assert_close(ours[i], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(step[i], ref[1], rtol=1e-4, atol=1e-4)


def test_stops_on_every_end_token_and_reports_finish_reason(tiny_engine):
    prompts = mixed_prompts(12, seed=4)
    gens, _ = tiny_engine.generate(prompts, SamplingParams(max_new_tokens=40))
    for g in gens:
        ends = [t for t in g.token_ids if t in tiny_engine.stop_ids]
        if g.finish_reason == "stop":
            assert ends == [g.token_ids[-1]]  # cut right after the first end token
        else:
            assert not ends and len(g.token_ids) == 40
    assert {g.finish_reason for g in gens} == {"stop", "length"}  # this seed has both


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_engine):
    gens, t = tiny_engine.generate(mixed_prompts(4, seed=5), SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert all(len(g.token_ids) == 30 for g in gens)
    assert not any(tok in tiny_engine.stop_ids for g in gens for tok in g.token_ids)
    assert t.generated_tokens == 120


def test_rejects_prompts_beyond_the_context(tiny_engine):
    with pytest.raises(ValueError, match="exceeds"):
        tiny_engine.generate([[10] * 1020], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        tiny_engine.generate([[]], SamplingParams(max_new_tokens=4))


def test_out_of_memory_becomes_a_named_error_and_frees_the_cache(tiny_engine, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(tiny_engine.runner, "prefill_logits", boom)
    with pytest.raises(OutOfMemory, match="chunk of 2 prompts did not fit"):
        tiny_engine.generate(mixed_prompts(2), SamplingParams(max_new_tokens=4))
    assert tiny_engine.runner._graph is None  # released: the halves start from free memory


def test_cache_is_reused_for_same_rows_and_smaller_prompts(tiny_engine):
    params = SamplingParams(max_new_tokens=8)
    tiny_engine.generate(mixed_prompts(3, seed=6, low=100, high=120), params)
    first = tiny_engine.runner._graph
    tiny_engine.generate(mixed_prompts(3, seed=7, low=5, high=20), params)
    assert tiny_engine.runner._graph is first
    tiny_engine.generate(mixed_prompts(4, seed=7, low=5, high=20), params)
    assert tiny_engine.runner._graph is not first  # other row count: a new cache


def test_auto_chunk_size_on_cpu_is_a_fixed_safe_number(tiny_engine):
    assert tiny_engine.auto_chunk_size(prompt_tokens=1000, new_tokens=150) >= 1
    assert tiny_engine.kv_bytes_per_token() == 2 * 4 * 4 * 32 * 4  # layers·kv heads·head dim·fp32
