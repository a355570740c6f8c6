"""Folded prefill (rolling with `fold`): prompts that join while other rows decode are prefilled
inside the next decode steps, one forward pass with the rows (`Llama.mixed_logits`). On the CPU in
float32 every token must be the one rolling without folding (and one big chunk) writes."""

from __future__ import annotations

import random

import pytest

from tests.test_engine import mixed_prompts, watch_regions
from tubesum.workers.gpu import runner as runner_mod
from tubesum.workers.gpu.engine import SamplingParams, load_engine


def count_steps(monkeypatch, runner) -> dict[str, list[int]]:
    """Record each mixed step's prompts and each separate join's prompts."""
    seen: dict[str, list[int]] = {"mixed": [], "joined": []}
    mixed, join = runner._mixed_step, runner._join

    def counted_mixed(dec, rows, steps):
        seen["mixed"].append(len(rows.folding[0]))
        mixed(dec, rows, steps)

    def counted_join(dec, rows, placed, *, steps):
        seen["joined"].append(len(placed))
        join(dec, rows, placed, steps=steps)

    monkeypatch.setattr(runner, "_mixed_step", counted_mixed)
    monkeypatch.setattr(runner, "_join", counted_join)
    return seen


def test_folded_joins_write_the_tokens_rolling_writes(tiny_engine, monkeypatch, request):
    """Prompts needing 2.5x the KV cache, stop tokens on (rows end at their limit or earlier):
    every prompt after the first admission joins through mixed steps, spread over several steps
    (FOLD_MIN_TOKENS lowered to the tiny prompts' scale), and no token changes."""
    runner = tiny_engine.runner
    request.addfinalizer(tiny_engine.release)
    prompts = mixed_prompts(16, seed=11)
    rng = random.Random(11)
    limits = [rng.randrange(2, 48) for _ in prompts]
    params = SamplingParams(max_new_tokens=48)
    tiny_engine.release()
    reference, _ = tiny_engine.generate(prompts, params, new_tokens=limits)

    monkeypatch.setattr(runner, "_capacity", sum(len(p) + n for p, n in zip(prompts, limits)) * 2 // 5)
    monkeypatch.setattr(runner_mod, "FOLD_MIN_TOKENS", 64)
    tiny_engine.release()
    rolled, _ = tiny_engine.generate(prompts, params, new_tokens=limits, rolling=True)
    seen_regions = watch_regions(monkeypatch)
    seen = count_steps(monkeypatch, runner)
    folded, t = tiny_engine.generate(prompts, params, new_tokens=limits, rolling=True, fold=True)

    assert [g.token_ids for g in folded] == [g.token_ids for g in reference] == [g.token_ids for g in rolled]
    assert len(seen["joined"]) == 1  # the first admission only: nothing was decoding before it
    assert len(seen["mixed"]) > 2 and seen["joined"][0] + sum(seen["mixed"]) == len(prompts)
    assert seen_regions["taken"] == len(prompts)  # each prompt one region, never overlapping
    assert t.generated_tokens == sum(len(g.token_ids) for g in reference)


def test_folding_keeps_the_step_at_max_rows_and_spreads_a_big_join(tiny_engine, monkeypatch, request):
    """The bench's rolling mode with emulated end tokens: at most 4 rows, later prompts folded
    into the steps of the rows still decoding; the same tokens as all 10 at once."""
    runner = tiny_engine.runner
    request.addfinalizer(tiny_engine.release)
    prompts = mixed_prompts(10, seed=13)
    limits = [3, 40, 5, 17, 9, 4, 33, 2, 6, 21]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    tiny_engine.release()
    reference, _ = tiny_engine.generate(prompts, params, new_tokens=limits)
    tiny_engine.release()
    monkeypatch.setattr(runner_mod, "FOLD_MIN_TOKENS", 1)  # one prompt a mixed step
    seen = count_steps(monkeypatch, runner)
    folded, t = tiny_engine.generate(prompts, params, new_tokens=limits, rolling=True, max_rows=4, fold=True)
    assert [g.token_ids for g in folded] == [g.token_ids for g in reference]
    assert [len(g.token_ids) for g in folded] == limits and t.generated_tokens == sum(limits)
    assert seen["mixed"] and set(seen["mixed"]) == {1}
    assert max(key[0] for key in runner._graphs) == 4  # reserved rows never took a bigger bucket


def test_fold_without_rolling_changes_nothing(tiny_engine, monkeypatch, request):
    request.addfinalizer(tiny_engine.release)
    prompts = mixed_prompts(6, seed=5)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    tiny_engine.release()
    plain, _ = tiny_engine.generate(prompts, params)
    seen = count_steps(monkeypatch, tiny_engine.runner)
    folded, _ = tiny_engine.generate(prompts, params, fold=True)
    assert [g.token_ids for g in folded] == [g.token_ids for g in plain]
    assert seen["mixed"] == []


@pytest.mark.parametrize(("quantize", "kv"), [("fp8", "auto"), ("none", "fp8"), ("fp8", "fp8")])
def test_folding_writes_the_same_tokens_with_fp8_projections_and_cache(monkeypatch, quantize, kv):
    """FP8 scales are per token (activations) and per layer, fixed at the first prefill (cache):
    a prompt folded into a decode step is quantised as it would be alone."""
    engine = load_engine("dummy:tiny", device_map="cpu", quantize=quantize, kv_cache_dtype=kv, fp8_card=False)
    runner = engine.runner
    prompts = mixed_prompts(12, seed=21)
    limits = [random.Random(i).randrange(2, 30) for i in range(len(prompts))]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    monkeypatch.setattr(runner, "_capacity", sum(len(p) + n for p, n in zip(prompts, limits)) // 2)
    monkeypatch.setattr(runner_mod, "FOLD_MIN_TOKENS", 32)
    rolled, _ = engine.generate(prompts, params, new_tokens=limits, rolling=True)
    engine.release()
    seen = count_steps(monkeypatch, runner)
    folded, _ = engine.generate(prompts, params, new_tokens=limits, rolling=True, fold=True)
    assert [g.token_ids for g in folded] == [g.token_ids for g in rolled]
    assert sum(seen["mixed"]) >= 4


def test_fold_prefill_reaches_generate_with_rolling_chunks_only(make_batcher, tiny_engine, monkeypatch):
    from tests.test_summarise_worker import summarise_all, transcript
    from tubesum.settings import Settings

    monkeypatch.setenv("TUBESUM_FOLD_PREFILL", "1")
    assert Settings().fold_prefill and not Settings(fold_prefill=False).fold_prefill
    seen: list[tuple[bool, bool]] = []
    real = tiny_engine.generate

    def spy(*args, **kwargs):
        seen.append((kwargs.get("rolling"), kwargs.get("fold")))
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "generate", spy)
    rolling, _ = make_batcher(chunk_size=2, chunk_wait_s=0.05, rolling=True, fold=True)
    assert summarise_all(rolling, {1: transcript(1)})[1].status == "done"
    static, _ = make_batcher(chunk_size=2, chunk_wait_s=0.05, rolling=False, fold=True)
    assert summarise_all(static, {2: transcript(2)})[2].status == "done"
    assert seen == [(True, True), (False, False)]  # folding needs rolling chunks
