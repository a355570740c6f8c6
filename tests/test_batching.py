"""The pure batching core: chunk timing and choice, OOM splits and sizing, cutting long transcripts."""

from __future__ import annotations

import math
import random

import pytest

from tubesum.workers.gpu.kv_regions import FreeRegions
from tubesum.workers.gpu.scheduler import (
    ChunkSizer,
    Pending,
    admit,
    fold_groups,
    halves,
    plan_chunk,
    plan_token_chunk,
    prefill_groups,
    priority_order,
    seconds_until_ready,
)
from tubesum.workers.summarise.split import pack_groups, piece_budget, split_even


def test_a_full_chunk_runs_at_once():
    assert seconds_until_ready(pending=8, limit=8, oldest_arrival=10.0, now=10.0, wait_s=2.0) == 0.0
    assert seconds_until_ready(pending=9, limit=8, oldest_arrival=10.0, now=10.0, wait_s=2.0) == 0.0


def test_a_partial_chunk_waits_from_its_oldest_prompt():
    assert seconds_until_ready(pending=3, limit=8, oldest_arrival=10.0, now=10.5, wait_s=2.0) == pytest.approx(1.5)
    assert seconds_until_ready(pending=3, limit=8, oldest_arrival=10.0, now=12.0, wait_s=2.0) == 0.0
    assert seconds_until_ready(pending=3, limit=8, oldest_arrival=10.0, now=30.0, wait_s=2.0) == 0.0


def test_nothing_pending_waits_forever():
    assert seconds_until_ready(pending=0, limit=8, oldest_arrival=0.0, now=5.0, wait_s=2.0) == math.inf


def test_plan_chunk_takes_continuations_first_then_arrival_order():
    pending = [Pending(3.0, 10), Pending(1.0, 10), Pending(5.0, 10, continuation=True), Pending(2.0, 10)]
    assert plan_chunk(pending, 2) == [1, 2]  # the reduce step, then the oldest
    assert plan_chunk(pending, 10) == [0, 1, 2, 3]
    assert plan_chunk(pending, 0) == [2]  # never an empty chunk


def test_halves():
    assert halves([1, 2, 3, 4, 5]) == ([1, 2, 3], [4, 5])
    assert halves([1, 2]) == ([1], [2])
    with pytest.raises(ValueError):
        halves([1])


def test_token_chunk_takes_as_many_prompts_as_the_budget_holds():
    pending = [Pending(float(i), n) for i, n in enumerate([1000, 1200, 1100, 900, 1300])]
    # each needs its tokens + 150 new: 1150, 1350, 1250, 1050, 1450
    assert plan_token_chunk(pending, max_new_tokens=150, token_capacity=3750, max_prompts=99) == [0, 1, 2]
    assert plan_token_chunk(pending, max_new_tokens=150, token_capacity=3749, max_prompts=99) == [0, 1]
    assert plan_token_chunk(pending, max_new_tokens=150, token_capacity=10**6, max_prompts=4) == [0, 1, 2, 3]
    assert plan_token_chunk(pending, max_new_tokens=150, token_capacity=10**6, max_prompts=99) == [0, 1, 2, 3, 4]


def test_token_chunk_keeps_plan_chunk_order_and_is_never_empty():
    pending = [Pending(3.0, 100), Pending(1.0, 5000), Pending(5.0, 100, continuation=True)]
    assert plan_token_chunk(pending, max_new_tokens=10, token_capacity=300, max_prompts=8) == [2]
    # the oldest prompt alone is beyond the budget: it goes alone (the engine fails it, with numbers)
    assert plan_token_chunk(pending[:2], max_new_tokens=10, token_capacity=300, max_prompts=8) == [1]
    # first come, first served: the short prompt behind it does not jump the queue
    assert plan_token_chunk(pending[:2], max_new_tokens=10, token_capacity=6000, max_prompts=8) == [0, 1]
    assert plan_token_chunk(pending, max_new_tokens=10, token_capacity=10**6, max_prompts=0) == [2]


def test_sizer_keeps_the_configured_size_until_an_oom():
    sizer = ChunkSizer(32)
    sizer.on_success(32)
    sizer.on_success(5)
    assert sizer.limit == 32


def test_sizer_halves_on_each_oom():
    sizer = ChunkSizer(32)
    sizer.on_oom(32)
    assert sizer.limit == 16
    sizer.on_oom(16)
    assert sizer.limit == 8
    sizer.on_oom(16)  # the other half of the same chunk: no lower than the cap it taught
    assert sizer.limit == 8
    sizer.on_oom(1)
    assert sizer.limit == 1


def test_sizer_grows_back_after_consecutive_successes_up_to_the_configured_size():
    sizer = ChunkSizer(32, regrow_after=3)
    sizer.on_oom(32)
    sizer.on_oom(16)
    assert sizer.limit == 8
    sizer.on_success(8)
    sizer.on_success(3)  # a partial chunk says nothing about the cap
    sizer.on_success(8)
    assert sizer.limit == 8
    sizer.on_success(8)
    assert sizer.limit == 16  # three in a row at the cap: doubled
    for _ in range(3):
        sizer.on_success(16)
    assert sizer.limit == 32
    for _ in range(6):
        sizer.on_success(32)
    assert sizer.limit == 32  # never above the configured size


def test_sizer_streak_restarts_after_an_oom():
    sizer = ChunkSizer(32, regrow_after=2)
    sizer.on_oom(32)
    sizer.on_success(16)
    sizer.on_oom(16)  # longer prompts this time
    assert sizer.limit == 8
    sizer.on_success(8)
    assert sizer.limit == 8
    sizer.on_success(8)
    assert sizer.limit == 16


def test_sizer_rejects_zero():
    with pytest.raises(ValueError):
        ChunkSizer(0)


def test_piece_budget():
    assert piece_budget(max_context=1024, max_new_tokens=200, template_tokens=100, margin=16) == 708


@pytest.mark.parametrize("n,budget", [(1, 5), (10, 5), (11, 5), (1000, 333), (7, 7), (8, 7)])
def test_split_even_covers_everything_within_budget(n, budget):
    ranges = split_even(n, budget)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a == b for (_, a), (b, _) in zip(ranges, ranges[1:]))  # contiguous
    sizes = [b - a for a, b in ranges]
    assert max(sizes) <= budget and max(sizes) - min(sizes) <= 1
    assert len(ranges) == math.ceil(n / budget)


def test_split_even_of_nothing_is_one_empty_piece():
    assert split_even(0, 5) == [(0, 0)]


def test_pack_groups_keeps_order_and_fits_the_budget():
    assert pack_groups([3, 3, 3, 3], budget=7, separator=1) == [[0, 1], [2, 3]]
    assert pack_groups([3, 3, 3], budget=100, separator=1) == [[0, 1, 2]]
    assert pack_groups([10, 2, 2], budget=5, separator=1) == [[0], [1, 2]]  # too long: alone
    assert pack_groups([], budget=5, separator=1) == []


def test_prefill_groups_keep_order_fit_the_budget_and_leave_nothing_out():
    assert prefill_groups([4, 4, 4, 4], token_budget=8) == [(0, 2), (2, 4)]
    assert prefill_groups([10, 3, 3], token_budget=8) == [(0, 1), (1, 3)]  # a long prompt alone
    assert prefill_groups([], token_budget=8) == []
    lengths = [5, 1, 7, 2, 2, 9, 1]
    groups = prefill_groups(lengths, token_budget=9)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(lengths)))
    assert all(sum(lengths[a:b]) <= 9 or b - a == 1 for a, b in groups)


def test_fold_groups_spread_the_joiners_over_the_steps_in_slices_worth_a_gemm():
    # 8 prompts of 1,000 tokens over 4 steps: two a step, in input order, every prompt once.
    assert fold_groups([1000] * 8, steps=4, min_tokens=512) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # Few tokens: not spread thinner than min_tokens a step (here: all in one step).
    assert fold_groups([100, 200, 50], steps=16, min_tokens=512) == [(0, 3)]
    # A prompt longer than a step's share goes alone; nothing is left out or reordered.
    lengths = [3000, 10, 10, 700, 700, 5]
    groups = fold_groups(lengths, steps=4, min_tokens=256)
    assert groups[0] == (0, 1)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(lengths)))
    assert len(fold_groups([1000] * 64, steps=16, min_tokens=512)) == 16  # in by the next check
    assert fold_groups([], steps=16, min_tokens=512) == []


def test_free_regions_take_first_fit_in_offset_order():
    regions = FreeRegions(100)
    assert [regions.take(n) for n in (30, 20, 50)] == [0, 30, 50]
    assert regions.take(1) is None and regions.free == []
    regions.give(0, 30)
    regions.give(50, 50)
    assert regions.take(40) == 50  # the first interval (30 tokens) is too short
    assert regions.take(25) == 0  # the first interval that holds it, not the best fit
    assert regions.free == [(25, 30), (90, 100)]


def test_free_regions_coalesce_with_both_neighbours():
    regions = FreeRegions(90)
    starts = [regions.take(30) for _ in range(3)]
    regions.give(starts[0], 30)
    regions.give(starts[2], 30)
    assert regions.free == [(0, 30), (60, 90)]
    assert regions.take(60) is None  # fragmented: no 60-token interval yet
    regions.give(starts[1], 30)
    assert regions.free == [(0, 90)] and regions.free_tokens() == 90
    assert regions.take(90) == 0


def test_free_regions_refuse_regions_that_are_free_or_outside():
    regions = FreeRegions(50)
    regions.take(20)
    with pytest.raises(ValueError, match="overlaps"):
        regions.give(10, 20)  # [20, 30) is still free
    with pytest.raises(ValueError, match="not inside"):
        regions.give(40, 20)
    with pytest.raises(ValueError):
        regions.take(0)


def test_free_regions_never_overlap_under_random_traffic():
    rng = random.Random(7)
    regions, taken = FreeRegions(1000), {}
    for _ in range(2000):
        if taken and rng.random() < 0.5:
            start = rng.choice(sorted(taken))
            regions.give(start, taken.pop(start))
        else:
            size = rng.randrange(1, 200)
            start = regions.take(size)
            if start is not None:
                taken[start] = size
        spans = sorted([(s, s + n) for s, n in taken.items()] + regions.free)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # nothing overlaps
        assert sum(b - a for a, b in spans) == 1000  # taken + free is the whole cache
        assert all(a[1] < b[0] for a, b in zip(regions.free, regions.free[1:]))  # free coalesced


def test_admit_takes_prompts_in_input_order_while_slots_and_regions_last():
    regions, waiting = FreeRegions(100), [0, 1, 2, 3]
    sizes = [40, 30, 50, 10]
    assert admit(waiting, sizes, regions, slots=8) == [(0, 0), (1, 40)]
    assert waiting == [2, 3]  # 50 does not fit in the 30 left; 10 would, but waits its turn
    regions.give(0, 40)
    assert admit(waiting, sizes, regions, slots=8) == []  # 40 + 30 free, but not side by side
    regions.give(40, 30)
    assert admit(waiting, sizes, regions, slots=1) == [(2, 0)]  # one free row slot
    assert admit(waiting, sizes, regions, slots=1) == [(3, 50)] and waiting == []


# --- fairness between videos (issue 18, item 5) -------------------------------------------------


def test_a_long_transcripts_pieces_take_at_most_half_a_chunk_while_other_videos_wait():
    pieces = [Pending(arrived=0.0, prompt_tokens=100, video=1) for _ in range(20)]
    small = [Pending(arrived=1.0 + k, prompt_tokens=100, video=10 + k) for k in range(5)]
    chosen = plan_chunk(pieces + small, 8)
    assert sum(1 for i in chosen if i < 20) == 4  # ceil(8 * MAX_VIDEO_SHARE)
    assert sorted(i - 20 for i in chosen if i >= 20) == [0, 1, 2, 3]


def test_reduce_steps_of_a_long_video_are_interleaved_with_new_videos():
    reduce = [Pending(arrived=5.0, prompt_tokens=100, continuation=True, video=1) for _ in range(6)]
    new = [Pending(arrived=1.0 + k, prompt_tokens=100, video=10 + k) for k in range(6)]
    order = priority_order(reduce + new, limit=4)
    assert order[:4] == [0, 1, 6, 7]  # two places for the continuation, then the oldest new videos
    assert order[-4:] == [2, 3, 4, 5]  # the rest of its prompts go last


def test_alone_a_long_video_still_fills_the_chunk():
    pieces = [Pending(arrived=0.0, prompt_tokens=100, video=1) for _ in range(10)]
    assert plan_chunk(pieces, 8) == list(range(8))
    assert plan_token_chunk(pieces, max_new_tokens=0, token_capacity=10_000, max_prompts=8) == list(range(8))


def test_the_token_planner_caps_one_videos_share_too():
    pieces = [Pending(arrived=0.0, prompt_tokens=100, video=1) for _ in range(10)]
    small = [Pending(arrived=1.0, prompt_tokens=100, video=2)]
    chosen = plan_token_chunk(pieces + small, max_new_tokens=0, token_capacity=300, max_prompts=8)
    assert 10 in chosen and len(chosen) == 3  # the small video is not behind ten pieces


def test_prompts_without_a_video_each_count_as_their_own():
    prompts = [Pending(arrived=float(k), prompt_tokens=10) for k in range(8)]
    assert plan_chunk(prompts, 8) == list(range(8))
