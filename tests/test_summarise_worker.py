"""The GPU worker: the Batcher on the tiny CPU model, the database writes on PostgreSQL, and the
`tubesum worker summarise` process against Redis and PostgreSQL."""

from __future__ import annotations

import threading
import time
import weakref
from functools import partial

import pytest
import torch
from sqlalchemy import select

from tests.factories import batch_row
from tests.tiny_model import summarise_worker_argv
from tests.worker_fixtures import FUTURE_TIMEOUT_S, INSTRUCTION, MAX_NEW
from tubesum.errors import OutOfMemory
from tubesum.models import Batch, Job, Summary, Transcript, Video
from tubesum.models.base import utcnow
from tubesum.workers.gpu.batcher import Batcher
from tubesum.workers.summarise.store import VideoInput, VideoOutcome, store_batch
from tubesum.workers.summarise.tasks import refusal
from tubesum.workers.video_state import Step, claim, release

SENTENCES = [
    "Octopuses have three hearts and blue blood.",
    "Some birds migrate thousands of kilometres every year, guided by the stars.",
    "Trees talk to each other through fungi in the soil. Bees dance to tell their sisters where the flowers are.",
    "The blue whale is the largest animal that has ever lived.",
    "In this video we learn how plants turn sunlight into sugar and why leaves change colour in autumn.",
]


def transcript(i: int) -> str:
    """Transcripts of different lengths."""
    return " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4))


class OomAbove:
    """The engine, except that a chunk of more than ``max_batch`` prompts (or any chunk holding
    a prompt longer than ``max_prompt`` tokens) raises OutOfMemory, as a full GPU would."""

    def __init__(self, engine, *, max_batch: int = 10**9, max_prompt: int = 10**9) -> None:
        self.engine, self.max_batch, self.max_prompt = engine, max_batch, max_prompt

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompts, params, **kwargs):
        if len(prompts) > self.max_batch or max(len(p) for p in prompts) > self.max_prompt:
            raise OutOfMemory(f"injected: chunk of {len(prompts)} prompts")
        return self.engine.generate(prompts, params, **kwargs)


def summarise_all(batcher: Batcher, texts: dict[int, str]) -> dict[int, VideoOutcome]:
    futures = {pk: batcher.submit(VideoInput(pk, text)) for pk, text in texts.items()}
    return {pk: f.result(timeout=FUTURE_TIMEOUT_S) for pk, f in futures.items()}


# --- the Batcher on the tiny model ------------------------------------------------------------------


def test_a_full_chunk_runs_without_waiting(make_batcher):
    batcher, sink = make_batcher(chunk_size=4, chunk_wait_s=30.0)
    t0 = time.monotonic()
    outcomes = summarise_all(batcher, {pk: transcript(pk) for pk in range(8)})
    assert time.monotonic() - t0 < 20  # two full chunks, not a 30 s wait
    assert [b.batch_size for b in sink.batches] == [4, 4]
    assert all(o.status == "done" and o.generated_tokens > 0 for o in outcomes.values())
    assert {o.batch_id for o in outcomes.values()} == {b.id for b in sink.batches}
    # Each outcome carries its batch's facts: the task's shown result needs no database read.
    by_id = {b.id: b for b in sink.batches}
    assert all(
        (o.batch_size, o.generate_s) == (by_id[o.batch_id].batch_size, by_id[o.batch_id].wall_s)
        for o in outcomes.values()
    )


def test_a_partial_chunk_runs_after_the_wait(make_batcher):
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=0.5)
    t0 = time.monotonic()
    outcomes = summarise_all(batcher, {pk: transcript(pk) for pk in range(3)})
    assert time.monotonic() - t0 >= 0.5
    assert [b.batch_size for b in sink.batches] == [3]
    (batch,) = sink.batches
    assert batch.chunk_size == 8 and batch.status == "ok" and not batch.oom_split
    assert batch.prompt_tokens == sum(o.prompt_tokens for o in outcomes.values())
    assert batch.generated_tokens == sum(o.generated_tokens for o in outcomes.values())
    assert batch.prefill_s is not None and batch.decode_s is not None and batch.wall_s > 0
    assert batch.engine == "fast" and batch.dtype == "float32" and batch.devices == "cpu"


def test_out_of_memory_splits_the_chunk_and_remembers_the_size(make_batcher, tiny_engine):
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=30.0, engine=OomAbove(tiny_engine, max_batch=2))
    outcomes = summarise_all(batcher, {pk: transcript(pk) for pk in range(8)})
    assert all(o.status == "done" for o in outcomes.values())  # no video fails because of OOM
    rows = [(b.batch_size, b.status, b.oom_split) for b in sink.batches]
    assert rows == [
        (8, "oom", False),
        (4, "oom", True),
        (2, "ok", True),
        (2, "ok", True),
        (4, "oom", True),
        (2, "ok", True),
        (2, "ok", True),
    ]
    assert "out of memory" in sink.batches[0].note
    assert batcher.sizer.limit == 2
    # Later chunks are capped at the size that worked: no more OOM.
    sink.batches.clear()
    summarise_all(batcher, {pk: transcript(pk) for pk in range(100, 104)})
    assert [(b.batch_size, b.status, b.oom_split) for b in sink.batches] == [(2, "ok", False), (2, "ok", False)]
    assert "capped at 2" in sink.batches[0].note


def test_a_prompt_that_does_not_fit_alone_fails_only_its_video(make_batcher, tiny_engine):
    long_pk, text = 7, " ".join(SENTENCES * 3)
    engine = OomAbove(tiny_engine, max_prompt=len(batcher_prompt(tiny_engine, text)) - 1)
    batcher, sink = make_batcher(chunk_size=4, chunk_wait_s=30.0, engine=engine)
    outcomes = summarise_all(batcher, {0: transcript(0), 1: transcript(1), 2: transcript(2), long_pk: text})
    assert outcomes[long_pk].status == "failed" and "out of memory on a single prompt" in outcomes[long_pk].error
    assert all(outcomes[pk].status == "done" for pk in (0, 1, 2))
    assert sink.batches[0].status == "oom" and sink.batches[0].batch_size == 4


def test_a_real_oom_gives_memory_back_splits_and_the_size_grows_back(make_batcher, tiny_engine, monkeypatch):
    """torch's OutOfMemoryError inside the real engine (one unlucky chunk): the failed attempt's
    tensors are freed before the halves run, the halves succeed, and after enough chunks at the
    lowered cap it doubles back to the configured size."""
    from tubesum.workers.gpu.scheduler import REGROW_AFTER_SUCCESSES

    runner = tiny_engine.runner
    real_prefill, capacity = runner.llama.prefill_logits, runner.token_capacity
    failed_attempt: list = []

    def prefill_once_oom(prompts, starts, cache):
        if len(prompts) > 4 and not failed_attempt:
            activations = torch.ones(256, 1024)
            failed_attempt.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        assert not failed_attempt or failed_attempt[0]() is None  # freed before any retry ran
        return real_prefill(prompts, starts, cache)

    monkeypatch.setattr(runner.llama, "prefill_logits", prefill_once_oom)
    try:
        batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=30.0)
        outcomes = summarise_all(batcher, {pk: transcript(pk) for pk in range(8)})
        assert all(o.status == "done" for o in outcomes.values())
        assert [(b.batch_size, b.status, b.oom_split) for b in sink.batches] == [
            (8, "oom", False),
            (4, "ok", True),
            (4, "ok", True),
        ]
        assert "Tried to allocate 2.00 GiB" in sink.batches[0].note
        assert batcher.sizer.limit == 4
        pk = 100
        while batcher.sizer.limit < 8:  # chunks at the cap until it grows back
            summarise_all(batcher, {pk + i: transcript(i) for i in range(4)})
            pk += 4
        assert sum(1 for b in sink.batches if b.batch_size == 4) == REGROW_AFTER_SUCCESSES
        sink.batches.clear()
        summarise_all(batcher, {pk + i: transcript(i) for i in range(8)})
        assert [(b.batch_size, b.status) for b in sink.batches] == [(8, "ok")]
    finally:
        runner._capacity = capacity  # the engine planned 10% less after the OOM; the session's engine
        runner.release()


def test_chunks_are_cut_by_the_token_budget_and_never_run_out(make_batcher, tiny_engine, monkeypatch):
    texts = {pk: transcript(pk) for pk in range(12)}
    lengths = {pk: len(batcher_prompt(tiny_engine, t)) for pk, t in texts.items()}
    budget = 3 * (max(lengths.values()) + MAX_NEW)  # about three prompts a chunk
    monkeypatch.setattr(tiny_engine.runner, "_capacity", budget)
    tiny_engine.runner.release()
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=1.0)  # the last, partial chunk waits
    outcomes = summarise_all(batcher, texts)
    assert all(o.status == "done" for o in outcomes.values())
    assert all(b.status == "ok" for b in sink.batches)  # no OOM: planned in tokens
    assert sum(b.batch_size for b in sink.batches) == 12
    assert all(3 <= b.batch_size < 8 for b in sink.batches[:-1])  # full by tokens, not by count
    for b in sink.batches:
        assert b.prompt_tokens + MAX_NEW * b.batch_size <= budget
    tiny_engine.runner.release()


def test_rolling_chunks_hold_more_than_fits_and_summarise_alike(make_batcher, tiny_engine, monkeypatch):
    texts = {pk: transcript(pk) * (1 + pk % 3) for pk in range(12)}
    lengths = {pk: len(batcher_prompt(tiny_engine, t)) for pk, t in texts.items()}
    budget = 3 * (max(lengths.values()) + MAX_NEW)  # three prompts at once at least
    monkeypatch.setattr(tiny_engine.runner, "_capacity", budget)
    tiny_engine.runner.release()
    static, static_sink = make_batcher(chunk_size=12, chunk_wait_s=1.0)
    expected = summarise_all(static, texts)
    static.stop(timeout=30)
    rolling, sink = make_batcher(chunk_size=12, chunk_wait_s=1.0, rolling=True)
    outcomes = summarise_all(rolling, texts)
    # Each rolling chunk needs more KV cache than exists (its prompts decode in turns) and up to
    # twice of it; no OOM, and every summary is the one the static chunks made.
    assert all(b.status == "ok" for b in sink.batches) and sum(b.batch_size for b in sink.batches) == 12
    assert len(sink.batches) < len(static_sink.batches)
    assert any(b.prompt_tokens + MAX_NEW * b.batch_size > budget for b in sink.batches)
    assert all(b.prompt_tokens + MAX_NEW * b.batch_size <= 2 * budget for b in sink.batches)
    assert {pk: o.token_ids for pk, o in outcomes.items()} == {pk: o.token_ids for pk, o in expected.items()}
    tiny_engine.runner.release()


def batcher_prompt(engine, text: str) -> list[int]:
    from tubesum.workers.summarise.plan import SummaryPlan
    from tubesum.workers.summarise.prompt import PromptBuilder

    b = PromptBuilder(
        engine.tokenizer,
        instruction=INSTRUCTION,
        max_context=engine.max_context,
        max_new_tokens=MAX_NEW,
        stop_ids=engine.stop_ids,
    )
    (ids,) = SummaryPlan(text, b).step
    return ids


def test_same_summary_alone_or_in_a_crowd_of_mixed_lengths(make_batcher):
    batcher, _ = make_batcher(chunk_size=8, chunk_wait_s=0.05, max_new_tokens=40)
    probe = "Bees dance to tell their sisters where the flowers are, and octopuses have three hearts."
    alone = summarise_all(batcher, {1: probe})[1]
    crowd = {pk: transcript(pk) * (1 + pk % 3) for pk in range(10, 17)}
    batcher.chunk_wait_s = 30.0  # the 8 prompts go together
    together = summarise_all(batcher, {**crowd, 1: probe})
    assert len({o.batch_id for o in together.values()}) == 1
    assert together[1].token_ids == alone.token_ids and len(alone.token_ids) > 0
    assert together[1].text == alone.text


def test_a_transcript_longer_than_the_context_is_map_reduced(make_batcher, tiny_engine):
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=0.2)
    long_text = " ".join(SENTENCES) * 40
    assert len(tiny_engine.tokenizer.encode(long_text)) > tiny_engine.max_context
    outcomes = summarise_all(batcher, {1: long_text, 2: transcript(2)})
    long_outcome = outcomes[1]
    assert long_outcome.status == "done" and long_outcome.pieces >= 2
    # First chunk: the pieces and the short video; next chunk: the reduce prompt.
    assert [b.batch_size for b in sink.batches] == [long_outcome.pieces + 1, 1]
    assert long_outcome.batch_id == sink.batches[1].id
    assert long_outcome.first_batch_started_at == sink.batches[0].started_at
    assert outcomes[2].pieces == 1 and outcomes[2].batch_id == sink.batches[0].id


def test_a_long_video_whose_pieces_do_not_fit_fails_alone(make_batcher, tiny_engine):
    engine = OomAbove(tiny_engine, max_prompt=400)  # every piece of the long transcript is longer
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=0.2, engine=engine)
    outcomes = summarise_all(batcher, {1: " ".join(SENTENCES) * 40, 2: transcript(2)})
    assert outcomes[1].status == "failed" and "single prompt" in outcomes[1].error and outcomes[1].pieces >= 2
    assert outcomes[2].status == "done"
    # The first piece failed alone (tried once more on the emptied card); the long video's other
    # pieces never ran again.
    ok = sink.ok()
    assert len(ok) == 1 and ok[0].batch_size == 1 and ok[0].oom_split
    assert sum(1 for b in sink.batches if b.status == "oom" and b.batch_size == 1) == 2


def test_a_redelivered_video_joins_the_one_in_flight(make_batcher):
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=0.3)
    first = batcher.submit(VideoInput(5, transcript(5)))
    second = batcher.submit(VideoInput(5, transcript(5)))
    assert first.result(timeout=FUTURE_TIMEOUT_S) is second.result(timeout=FUTURE_TIMEOUT_S)
    assert [b.batch_size for b in sink.batches] == [1]


class SlowEngine:
    """The engine, with a pause before each chunk (time to hand back mid-chunk)."""

    def __init__(self, engine, delay_s: float) -> None:
        self.engine, self.delay_s, self.started = engine, delay_s, threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompts, params, **kwargs):
        self.started.set()
        time.sleep(self.delay_s)
        return self.engine.generate(prompts, params, **kwargs)


@pytest.mark.parametrize("grace_s", [30.0, 0.2])
def test_hand_back_returns_waiting_videos_at_once_and_the_running_chunk_after_the_grace(
    make_batcher, tiny_engine, wait_until, grace_s
):
    """hand_back: videos not in the running chunk fail with WorkerStopping at once (their tasks
    requeue them); the running chunk is stored if it finishes within the grace, else handed back."""
    from tubesum.errors import WorkerStopping

    engine = SlowEngine(tiny_engine, delay_s=1.5)
    batcher, sink = make_batcher(chunk_size=2, chunk_wait_s=0.05, engine=engine)
    running = [batcher.submit(VideoInput(pk, transcript(pk))) for pk in (1, 2)]
    assert engine.started.wait(FUTURE_TIMEOUT_S)
    waiting = [batcher.submit(VideoInput(pk, transcript(pk))) for pk in (3, 4)]
    t0 = time.monotonic()
    batcher.hand_back(grace_s)
    for future in waiting:
        with pytest.raises(WorkerStopping):
            future.result(timeout=0.5)
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(WorkerStopping):
        batcher.submit(VideoInput(5, transcript(5)))
    assert batcher.wait_handed_back(FUTURE_TIMEOUT_S)
    if grace_s > 1.5:
        assert [f.result(timeout=1).status for f in running] == ["done", "done"]
        assert sorted(sink.outcomes) == [1, 2]
    else:
        for future in running:
            with pytest.raises(WorkerStopping):
                future.result(timeout=1)
        # The abandoned chunk still ends and its batch row is stored (the last thing a chunk does),
        # without its videos: they were handed back.
        wait_until(lambda: sink.batches, timeout=FUTURE_TIMEOUT_S, message="the abandoned chunk's batch row")
        assert [b.batch_size for b in sink.batches] == [2]
        assert not sink.outcomes


def test_a_video_tokenized_across_a_hand_back_goes_back_and_no_chunk_counts_as_abandoned(make_batcher, monkeypatch):
    """A SIGTERM that lands while a video is being tokenized (its submit began before the hand-back
    and ends after it): the video goes back at once, and since no chunk was running the worker
    exits 0, not with the abandoned-chunk code (CI saw exit 75 with no chunk ever started)."""
    from tubesum.errors import WorkerStopping
    from tubesum.workers.gpu import batcher as batcher_module

    batcher, sink = make_batcher(chunk_size=4, chunk_wait_s=0.3)
    real_plan = batcher_module.SummaryPlan

    def plan_then_sigterm(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        batcher.hand_back(30.0)
        return plan

    monkeypatch.setattr(batcher_module, "SummaryPlan", plan_then_sigterm)
    with pytest.raises(WorkerStopping):
        batcher.submit(VideoInput(1, transcript(1)))
    assert batcher.wait_handed_back(FUTURE_TIMEOUT_S)
    assert not batcher.abandoned()
    assert not sink.batches and not sink.outcomes


def test_a_failing_store_fails_the_tasks_and_the_batcher_goes_on(tiny_engine):
    calls = []

    def flaky(batch, outcomes):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("database unreachable")

    batcher = Batcher(
        tiny_engine, sink=flaky, chunk_size=2, chunk_wait_s=0.05, max_new_tokens=8, instruction=INSTRUCTION
    ).start()
    try:
        with pytest.raises(RuntimeError, match="unreachable"):
            batcher.submit(VideoInput(1, transcript(1))).result(timeout=FUTURE_TIMEOUT_S)
        assert batcher.submit(VideoInput(1, transcript(1))).result(timeout=FUTURE_TIMEOUT_S).status == "done"
    finally:
        batcher.stop(timeout=30)


# --- the database writes (PostgreSQL) ------------------------------------------------------------------


def add_videos(session, texts: list[str], *, status: str = "fetched") -> list[int]:
    now = utcnow()
    job = Job(sources=["test"], model="tiny")
    session.add(job)
    videos = []
    for i, text in enumerate(texts):
        video = Video(job=job, video_id=f"vid{i:08d}", position=i, status=status, queued_at=now, fetched_at=now)
        session.add(video)
        session.add(Transcript(video=video, text=text, source="csv"))
        videos.append(video)
    session.commit()
    return [v.id for v in videos]


def record(batch_id: str = "b" * 32, **overrides) -> Batch:
    return batch_row(id=batch_id, model="tiny", **overrides)


def claim_video(pk: int, **kwargs) -> VideoInput | None:  # type: ignore[no-untyped-def]
    """The summarise task's claim: ``claim(step=summarise)`` with its readable-transcript check."""
    claimed = claim(pk, step=Step.summarise, refuse=partial(refusal, max_chars=10**6), **kwargs)
    return None if claimed is None else VideoInput(pk, claimed.transcript or "")


def test_claim_moves_a_fetched_video_to_summarising(db_url, db_session):
    (pk, empty, done) = add_videos(db_session, ["Bees dance.", "  ", "Whales sing."])
    db_session.get(Video, done).status = "done"
    db_session.commit()
    assert claim_video(pk, database_url=db_url) == VideoInput(pk, "Bees dance.")
    assert claim_video(pk, database_url=db_url) is not None  # a redelivery after a crash claims again
    assert claim_video(empty, database_url=db_url) is None
    assert claim_video(done, database_url=db_url) is None
    db_session.expire_all()
    video = db_session.get(Video, pk)
    assert video.status == "summarising" and video.summarising_at is not None
    assert db_session.get(Video, empty).status == "failed" and db_session.get(Video, empty).error == "empty transcript"
    assert db_session.get(Video, done).status == "done"


def test_a_claim_takes_a_lease_that_only_its_worker_renews_and_releases(db_url, db_session):
    """A claim holds the video under its worker's lease; another worker's delivery is dropped while
    the lease runs (unless it takes over: RabbitMQ's redelivery); the heartbeat renews only the
    holder's lease; a hand-back releases it without counting the claim."""
    from tubesum.workers.summarise.store import touch_videos

    (pk,) = add_videos(db_session, ["Bees dance."])
    assert claim_video(pk, database_url=db_url, owner="gpu@a", lease_s=60) is not None
    assert claim_video(pk, database_url=db_url, owner="gpu@b", lease_s=60) is None
    assert claim_video(pk, database_url=db_url, owner="gpu@a", lease_s=60) is not None  # its own redelivery
    db_session.expire_all()
    video = db_session.get(Video, pk)
    assert (video.lease_owner, video.summarise_attempts) == ("gpu@a", 1)  # a redelivery to the holder is no attempt
    first_expiry = video.lease_expires_at
    touch_videos([pk], database_url=db_url, owner="gpu@b", lease_s=600)
    db_session.expire_all()
    assert db_session.get(Video, pk).lease_expires_at == first_expiry
    touch_videos([pk], database_url=db_url, owner="gpu@a", lease_s=600)
    db_session.expire_all()
    assert db_session.get(Video, pk).lease_expires_at > first_expiry
    assert not release(pk, step=Step.summarise, database_url=db_url, owner="gpu@b")
    assert release(pk, step=Step.summarise, database_url=db_url, owner="gpu@a")
    db_session.expire_all()
    video = db_session.get(Video, pk)
    assert (video.status, video.lease_owner, video.lease_expires_at, video.summarise_attempts) == (
        "fetched",
        None,
        None,
        0,
    )
    assert claim_video(pk, database_url=db_url, owner="gpu@b", lease_s=60) is not None
    assert claim_video(pk, database_url=db_url, owner="gpu@c", lease_s=60, takeover=True) is not None
    db_session.expire_all()
    assert db_session.get(Video, pk).lease_owner == "gpu@c"


def test_store_batch_is_idempotent(db_url, db_session):
    (pk, failing) = add_videos(db_session, ["Bees dance.", "Whales sing."])
    claim_video(pk, database_url=db_url)
    outcome = VideoOutcome(
        video_pk=pk,
        status="done",
        text="bees",
        token_ids=[1],
        finish_reason="stop",
        prompt_tokens=10,
        generated_tokens=5,
        first_batch_started_at=utcnow(),
    )
    failure = VideoOutcome(video_pk=failing, status="failed", error="out of memory on a single prompt")
    store_batch(record("a" * 32), [outcome, failure], database_url=db_url)
    store_batch(record("c" * 32), [outcome], database_url=db_url)  # a second delivery's chunk
    db_session.expire_all()
    (summary,) = db_session.scalars(select(Summary)).all()
    assert summary.batch_id == "a" * 32 and summary.text == "bees" and summary.pieces == 1
    assert summary.queue_wait_s >= 0 and summary.latency_s >= summary.queue_wait_s
    video = db_session.get(Video, pk)
    assert video.status == "done" and video.done_at is not None
    assert db_session.get(Video, failing).status == "failed"
    assert len(db_session.scalars(select(Batch)).all()) == 2


# --- the worker process (Redis + PostgreSQL) -------------------------------------------------------------

TIMING_COLUMNS = (
    "worker_host",
    "devices",
    "model",
    "dtype",
    "attn_implementation",
    "engine",
    "chunk_size",
    "batch_size",
    "prompt_tokens",
    "padded_prompt_tokens",
    "generated_tokens",
    "prefill_s",
    "decode_s",
    "wall_s",
    "generated_tokens_per_s",
    "status",
    "started_at",
    "ended_at",
)


@pytest.mark.slow
def test_summarise_worker_process(env, settings, db_session, start_worker, wait_until, tiny_model_dir):
    from tubesum.celery_app import SUMMARISE_TASK, app

    pks = add_videos(db_session, [transcript(i) for i in range(10)])
    env.update(TUBESUM_MAX_NEW_TOKENS=str(MAX_NEW), TUBESUM_CHUNK_WAIT_S="1.0")
    name = "gpu-test"
    start_worker(
        argv=summarise_worker_argv(tiny_model_dir, f"{name}@%h", chunk_size=8),
        name=name,
        env=env,
    )
    for pk in pks:
        app.send_task(SUMMARISE_TASK, args=[pk])

    def statuses():
        db_session.expire_all()
        return [s for (s,) in db_session.execute(select(Video.status).where(Video.id.in_(pks)))]

    wait_until(lambda: all(s == "done" for s in statuses()), timeout=90, message=lambda: f"videos done: {statuses()}")
    summaries = db_session.scalars(select(Summary)).all()
    batches = db_session.scalars(select(Batch)).all()
    assert len(summaries) == 10 and {s.video_pk for s in summaries} == set(pks)
    assert sorted(b.batch_size for b in batches) == [2, 8]
    for b in batches:
        assert all(getattr(b, column) is not None for column in TIMING_COLUMNS), b.__dict__
        assert b.engine == "fast" and b.model == str(tiny_model_dir) and b.chunk_size == 8
    for s in summaries:
        assert s.batch_id in {b.id for b in batches} and s.generated_tokens > 0
        assert s.queue_wait_s is not None and s.latency_s is not None and s.finish_reason in ("stop", "length")
    for v in db_session.scalars(select(Video).where(Video.id.in_(pks))):
        assert v.summarising_at is not None and v.done_at is not None

    # A redelivered message for a video already done is a no-op: only the new video is generated.
    (new_pk,) = add_videos(db_session, [transcript(3)])
    for pk in [pks[0], pks[1], new_pk]:
        app.send_task(SUMMARISE_TASK, args=[pk])
    wait_until(
        lambda: db_session.scalar(select(Summary.id).where(Summary.video_pk == new_pk)),
        timeout=60,
        message="the new video's summary",
    )
    db_session.expire_all()
    assert [b.batch_size for b in db_session.scalars(select(Batch).order_by(Batch.started_at))][-1] == 1
    assert len(db_session.scalars(select(Summary)).all()) == 11


def test_a_long_transcript_shares_its_chunks_with_the_videos_behind_it(make_batcher, tiny_engine):
    """Issue 18, item 5: the pieces of a long transcript take at most half of each chunk while
    other videos wait, so videos sent after it finish long before it (they used to wait for all
    its pieces)."""
    batcher, sink = make_batcher(chunk_size=8, chunk_wait_s=0.2)
    long_text = " ".join(SENTENCES) * 120
    long_future = batcher.submit(VideoInput(1, long_text))
    small = {pk: batcher.submit(VideoInput(pk, transcript(pk))) for pk in range(10, 14)}
    small_outcomes = {pk: f.result(timeout=FUTURE_TIMEOUT_S) for pk, f in small.items()}
    long_outcome = long_future.result(timeout=FUTURE_TIMEOUT_S * 3)
    assert long_outcome.status == "done" and long_outcome.pieces >= 16
    batch_index = {b.id: i for i, b in enumerate(sink.batches)}
    assert max(batch_index[o.batch_id] for o in small_outcomes.values()) <= 1
    assert batch_index[long_outcome.batch_id] >= 3
    print(f"{long_outcome.pieces} pieces; small videos done by chunk 2 of {len(sink.batches)}")
