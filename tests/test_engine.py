"""The generation engine on the tiny CPU model (fp32): the fast runner's logic, exactly."""

from __future__ import annotations

import random
import weakref

import pytest
import torch

from tubesum.errors import OutOfMemory
from tubesum.workers.gpu import runner as runner_mod
from tubesum.workers.gpu.cuda_graph import row_bucket
from tubesum.workers.gpu.engine import SamplingParams
from tubesum.workers.gpu.kv_cache import CPU_TOKEN_CAPACITY, KVCache, kv_token_capacity
from tubesum.workers.gpu.kv_regions import FreeRegions
from tubesum.workers.gpu.runner import LlamaRunner


def mixed_prompts(n: int, *, seed: int = 0, low: int = 3, high: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 512) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def test_loads_by_path_with_the_fast_backend(tiny_engine):
    assert tiny_engine.backend == "fast"
    assert tiny_engine.dtype == "float32"
    assert tiny_engine.attn_implementation == "sdpa"  # no CUDA: PyTorch attention in the runner
    assert tiny_engine.tokenizer.padding_side == "left"
    # every end token of the generation config, not only EOS
    assert tiny_engine.stop_ids == {
        tiny_engine.tokenizer.convert_tokens_to_ids("</s>"),
        tiny_engine.tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }


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
    """Ragged cache: rows at their own offsets, with gaps between them, read only their own keys."""
    r = tiny_engine.runner.llama
    prompts = mixed_prompts(3, seed=3, low=10)
    starts = [5, 5 + len(prompts[0]) + 40, 300]  # out of order lengths, gaps of garbage between
    cache = KVCache(
        layers=len(r.layers), capacity=600, kv_heads=r.n_kv, head_dim=r.head_dim, dtype=r.dtype, device=r.device
    )
    cache.k.normal_()  # stale values from earlier chunks must never be read
    cache.v.normal_()
    with torch.inference_mode():
        ours = r.prefill_logits(prompts, starts, cache)
        tokens = ours.argmax(-1)
        pos = torch.tensor([len(p) for p in prompts])
        cu_k = torch.tensor(starts + [cache.capacity], dtype=torch.int32)
        step = r.decode_logits(tokens, pos, cu_k, cache, max_k=256)
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


def test_out_of_memory_frees_every_tensor_of_the_failed_attempt(tiny_engine, monkeypatch):
    """The error the batcher keeps while it retries the halves must not keep the failed
    attempt's tensors alive (the exception's traceback frames hold them)."""
    alive = []

    def boom(*args, **kwargs):
        activations = torch.ones(1024, 1024)  # what a real prefill holds when memory runs out
        alive.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(tiny_engine.runner.llama, "prefill_logits", boom)
    capacity = tiny_engine.runner.token_capacity
    with pytest.raises(OutOfMemory, match="chunk of 2 prompts did not fit") as caught:
        tiny_engine.generate(mixed_prompts(2), SamplingParams(max_new_tokens=4))
    assert alive and alive[0]() is None  # freed while the OutOfMemory error is still held
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert tiny_engine.runner._kv is None and not tiny_engine.runner._graphs  # released
    assert tiny_engine.runner.token_capacity == int(capacity * 0.9)  # plans a little less
    tiny_engine.runner._capacity = capacity  # the session's engine, for the other tests


def test_a_chunk_beyond_the_token_capacity_is_refused_with_the_numbers(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.runner, "_capacity", 300)
    prompts = [[10] * 100, [11] * 120]
    with pytest.raises(OutOfMemory, match=r"a chunk of 4 prompts needs 472 KV-cache tokens .*holds 300"):
        tiny_engine.generate(prompts * 2, SamplingParams(max_new_tokens=8))  # 4 × (1xx + 8)
    with pytest.raises(OutOfMemory, match=r"a single prompt needs 408 KV-cache tokens .*holds 300"):
        tiny_engine.generate([[12] * 400], SamplingParams(max_new_tokens=8))
    gens, _ = tiny_engine.generate(prompts, SamplingParams(max_new_tokens=8))  # 236 tokens: fits
    assert len(gens) == 2
    tiny_engine.release()


def test_the_cache_is_allocated_once_and_graphs_are_keyed_by_row_bucket(tiny_engine):
    tiny_engine.release()
    params = SamplingParams(max_new_tokens=8)
    tiny_engine.generate(mixed_prompts(3, seed=6, low=100, high=120), params)
    cache = tiny_engine.runner._kv
    assert cache.capacity == tiny_engine.runner.token_capacity
    tiny_engine.generate(mixed_prompts(4, seed=7, low=5, high=20), params)  # same bucket (4)
    tiny_engine.generate(mixed_prompts(9, seed=8, low=5, high=60), params)  # bucket 16
    assert tiny_engine.runner._kv is cache  # one allocation for every chunk
    assert sorted(key[0] for key in tiny_engine.runner._graphs) == [4, 16]


def test_kv_token_capacity_is_what_is_left_after_the_reserve():
    gib, per_token = 2**30, 128 * 1024  # Llama-3-8B in bf16: 128 KiB of KV a token
    assert (
        kv_token_capacity(free_bytes=64 * gib, reserve_bytes=4 * gib, bytes_per_token=per_token, share=1.0) == 60 * 8192
    )
    assert (
        kv_token_capacity(free_bytes=64 * gib, reserve_bytes=4 * gib, bytes_per_token=per_token, share=0.5) == 30 * 8192
    )
    assert kv_token_capacity(free_bytes=2 * gib, reserve_bytes=4 * gib, bytes_per_token=per_token) == 0


def test_row_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 17, 32, 33, 187, 256, 257)] == [1, 2, 4, 8, 32, 32, 64, 192, 256, 288]


def test_each_row_stops_at_its_own_length_and_finished_rows_leave_the_step(tiny_engine, monkeypatch):
    """The bench's emulated end tokens; rows that are done move out of the step (a smaller
    bucket), and that changes no token (fp32 on CPU: exact)."""
    prompts = mixed_prompts(9, seed=9)
    lengths = [3, 70, 5, 17, 9, 4, 33, 2, 6]
    params = SamplingParams(max_new_tokens=70, ignore_eos=True)
    runner = tiny_engine.runner
    tiny_engine.release()
    dropped, _ = tiny_engine.generate(prompts, params, new_tokens=lengths)
    assert [len(g.token_ids) for g in dropped] == lengths
    assert sorted(key[0] for key in runner._graphs) == [1, 2, 4, 16]  # 9 rows, then 3, 2, 1 left
    monkeypatch.setattr(runner, "drop_finished_rows", False)
    static, t = tiny_engine.generate(prompts, params, new_tokens=lengths)
    assert [g.token_ids for g in static] == [g.token_ids for g in dropped]
    assert t.generated_tokens == sum(lengths)
    full, _ = tiny_engine.generate(prompts, params)
    assert [g.token_ids[:n] for g, n in zip(full, lengths)] == [g.token_ids for g in dropped]


def test_auto_chunk_size_on_cpu_is_a_fixed_safe_number(tiny_engine):
    # The CPU has no memory to plan in: auto is one small size, whatever the prompts.
    long = tiny_engine.auto_chunk_size(prompt_tokens=1000, new_tokens=150)
    assert long == tiny_engine.auto_chunk_size(prompt_tokens=10, new_tokens=5)
    assert 1 <= long * (1000 + 150) <= tiny_engine.token_capacity  # the long prompts fit the cache
    assert tiny_engine.kv_bytes_per_token() == 2 * 4 * 4 * 32 * 4  # layers·kv heads·head dim·fp32
    assert tiny_engine.token_capacity == CPU_TOKEN_CAPACITY


def test_auto_holds_twice_the_prompts_with_rolling_chunks(tiny_engine):
    from tubesum.settings import Settings
    from tubesum.workers.gpu.worker import resolve_chunk_size

    static = resolve_chunk_size(tiny_engine, Settings(chunk_size="auto", rolling=False))
    assert static >= 1
    assert resolve_chunk_size(tiny_engine, Settings(chunk_size="auto", rolling=True)) == 2 * static
    assert resolve_chunk_size(tiny_engine, Settings(chunk_size=12, rolling=True)) == 12  # a number is a cap


def watch_regions(monkeypatch) -> dict:
    """Replace the runner's region allocator with one that asserts, at every take, that the new
    region lies inside the cache and overlaps no region in use; returns what it saw."""
    seen: dict = {"live": set(), "taken": 0, "peak_tokens": 0}

    class Watched(FreeRegions):
        def take(self, size: int) -> int | None:
            start = super().take(size)
            if start is not None:
                assert 0 <= start and start + size <= self.capacity
                assert all(start + size <= a or b <= start for a, b in seen["live"])
                seen["live"].add((start, start + size))
                seen["taken"] += 1
                seen["peak_tokens"] = max(seen["peak_tokens"], sum(b - a for a, b in seen["live"]))
            return start

        def give(self, start: int, size: int) -> None:
            seen["live"].remove((start, start + size))
            super().give(start, size)

    monkeypatch.setattr(runner_mod, "FreeRegions", Watched)
    return seen


def test_rolling_decode_equals_one_big_chunk_token_for_token(tiny_engine, monkeypatch, request):
    """Prompts needing 2.5x the KV cache: they join in input order as finished rows (at their
    limit or at a stop token) free their regions, and no token changes (fp32 on CPU: exact)."""
    runner: LlamaRunner = tiny_engine.runner
    request.addfinalizer(tiny_engine.release)  # the cache is re-allocated at the session's capacity
    prompts = mixed_prompts(16, seed=11)
    rng = random.Random(11)
    limits = [rng.randrange(2, 48) for _ in prompts]
    params = SamplingParams(max_new_tokens=48)  # stop tokens on: some rows end before their limit
    tiny_engine.release()
    reference, _ = tiny_engine.generate(prompts, params, new_tokens=limits)
    assert sum(g.finish_reason == "stop" and len(g.token_ids) < n for g, n in zip(reference, limits)) == 4

    need = sum(len(p) + n for p, n in zip(prompts, limits))
    monkeypatch.setattr(runner, "_capacity", need * 2 // 5)
    tiny_engine.release()
    seen = watch_regions(monkeypatch)
    joins: list[tuple[int, int]] = []  # (step, prompts joining then)
    join = runner._join

    def counted(dec, rows, placed, *, steps):
        joins.append((steps, len(placed)))
        join(dec, rows, placed, steps=steps)

    monkeypatch.setattr(runner, "_join", counted)
    rolled, t = tiny_engine.generate(prompts, params, new_tokens=limits, rolling=True)
    assert [g.token_ids for g in rolled] == [g.token_ids for g in reference]  # input order too
    assert len(joins) > 2 and joins[0][0] == 1 and sum(n for _, n in joins) == len(prompts)  # joined mid-decode
    assert seen["taken"] == len(prompts)  # each prompt got one region, in a cache it could not fill
    assert seen["peak_tokens"] <= runner.token_capacity < need
    assert t.prompt_tokens == t.padded_prompt_tokens == sum(map(len, prompts))
    assert t.prefill_s > 0 and t.decode_s > 0


def test_rolling_keeps_the_step_full_up_to_max_rows(tiny_engine, monkeypatch, request):
    """The bench's rolling mode: 10 prompts at most 4 rows at a time (emulated end tokens), then
    the tail drops to smaller buckets; the same tokens as all 10 at once."""
    runner: LlamaRunner = tiny_engine.runner
    request.addfinalizer(tiny_engine.release)
    prompts = mixed_prompts(10, seed=13)
    limits = [3, 40, 5, 17, 9, 4, 33, 2, 6, 21]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    tiny_engine.release()
    reference, _ = tiny_engine.generate(prompts, params, new_tokens=limits)
    tiny_engine.release()
    seen = watch_regions(monkeypatch)
    rolled, t = tiny_engine.generate(prompts, params, new_tokens=limits, rolling=True, max_rows=4)
    assert [g.token_ids for g in rolled] == [g.token_ids for g in reference]
    assert [len(g.token_ids) for g in rolled] == limits and t.generated_tokens == sum(limits)
    assert seen["taken"] == 10
    assert max(key[0] for key in runner._graphs) == 4  # never more than max_rows rows


def test_rolling_refuses_only_a_prompt_beyond_the_whole_cache(tiny_engine, monkeypatch, request):
    request.addfinalizer(tiny_engine.release)
    monkeypatch.setattr(tiny_engine.runner, "_capacity", 300)
    tiny_engine.release()
    prompts = [[10] * 100, [11] * 120]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    gens, _ = tiny_engine.generate(prompts * 3, params, rolling=True)  # 3 × 236
    assert [len(g.token_ids) for g in gens] == [8] * 6
    with pytest.raises(OutOfMemory, match=r"a single prompt needs 408 KV-cache tokens .*holds 300"):
        tiny_engine.generate([[12] * 100, [12] * 400], SamplingParams(max_new_tokens=8), rolling=True)
