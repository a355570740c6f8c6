"""The in-process chunk collector of the GPU worker.

Celery runs the summarise tasks in N threads (N = chunk size). Each task thread hands its video to
the process-wide ``Batcher`` and blocks on a Future. The Batcher's single GPU thread collects up to
N prompts, or whatever arrived within ``chunk_wait_s`` of the first one, runs ONE
``engine.generate()`` over the whole chunk, commits every finished summary together with the batch
row, and only then resolves the futures: a task returns (and Celery acks its message) only once
its summary is in the database. Only this thread touches the model.

A long transcript becomes several map prompts in the chunk(s) of its video, and its reduce
prompts are queued first for the next chunk (see ``workers.summarise.SummaryPlan``).
Memory is planned in tokens: a chunk takes as many prompts as the engine's KV cache holds (each
prompt's tokens + max new tokens), capped by the chunk size; rolling chunks (the default) take up
to ROLLING_WAVES times that, and the engine starts the rest as rows finish. Out of memory all the
same: the failed attempt's memory is given back (the engine), the batch row is recorded as ``oom``, the
chunk is split in halves and each half retried; ``ChunkSizer`` caps later chunks and grows the
cap back after chunks succeed.

Shutting down (SIGTERM, a preemption notice, Ctrl-C): ``hand_back`` fails every video that is not
in the running chunk with WorkerStopping at once (its task returns the message to the queue), lets
the running chunk finish within a grace period, and hands its videos back too if it does not.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from tubesum.errors import KVCacheTooSmall, OutOfMemory, WorkerStopping
from tubesum.models import Batch
from tubesum.models.base import utcnow
from tubesum.workers.db_outage import OUTAGE_MAX_WAIT_S, wait_out
from tubesum.workers.gpu import records
from tubesum.workers.gpu.params import Generation, SamplingParams
from tubesum.workers.gpu.scheduler import (
    ChunkSizer,
    Pending,
    halves,
    plan_chunk,
    plan_token_chunk,
    seconds_until_ready,
)
from tubesum.workers.summarise.plan import SummaryPlan
from tubesum.workers.summarise.prompt import PromptBuilder
from tubesum.workers.summarise.store import VideoInput, VideoOutcome

if TYPE_CHECKING:  # the engine imports torch; the batcher itself does not
    from tubesum.workers.gpu.engine import Engine

log = logging.getLogger(__name__)

# Rolling chunks: a chunk may need this many times the KV cache. As many of its prompts as fit
# decode together; rows that end early (an end token) hand their slot and KV region to the
# chunk's next prompts, so the decode step stays full (H100, varied lengths: 1.20-1.22x static
# chunks, against 1.14-1.15x for only dropping finished rows; docs/benchmarks.md).
ROLLING_WAVES = 2
# How long `stop()` waits for the GPU thread to finish its current chunk, seconds.
STOP_TIMEOUT_S = 600.0
# Finished chunks waiting for the store thread before the GPU thread waits for it (back-pressure
# when the database is slower than the GPU).
STORES_IN_FLIGHT = 2
# While handing back: how often the grace period checks for the end of the running chunk, seconds.
HAND_BACK_POLL_S = 0.1

Sink = Callable[[Batch, Sequence[VideoOutcome]], None]


def rolling_waves(engine: Engine, rolling: bool) -> int:
    """How many times the KV cache a chunk may need: ROLLING_WAVES with rolling chunks, which
    need memory planned in tokens (the fast engine), else 1."""
    return ROLLING_WAVES if rolling and engine.token_capacity is not None else 1


Heartbeat = Callable[[list[int]], None]  # video pks this worker holds → renew their leases
Progress = Callable[[int, str], None]  # video pk, where its map-reduce stands → noted for `status`


@dataclass(eq=False)
class _Work:
    """One video in flight: its plan, the tasks waiting for it, the outputs of its current step."""

    video: VideoInput
    plan: SummaryPlan
    futures: list[Future] = field(default_factory=list)
    outputs: dict[int, Generation] = field(default_factory=dict)
    first_started_at: datetime | None = None
    finished: bool = False


@dataclass(eq=False)
class _Prompt:
    work: _Work
    index: int  # position within its video's current step
    ids: list[int]
    pending: Pending


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        sink: Sink,
        chunk_size: int,
        chunk_wait_s: float,
        max_new_tokens: int,
        instruction: str,
        clock: Callable[[], float] = time.monotonic,
        worker_host: str | None = None,
        heartbeat: Heartbeat | None = None,
        heartbeat_s: float = 60.0,
        rolling: bool = False,
        fold: bool = False,
        store_wait_s: float = OUTAGE_MAX_WAIT_S,
        progress: Progress | None = None,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> None:
        self.engine = engine
        self.store_wait_s = store_wait_s
        self.progress = progress
        self.waves = rolling_waves(engine, rolling)
        self.fold = fold and self.waves > 1  # folded prefill needs rolling chunks
        self.sink = sink
        self.chunk_wait_s = chunk_wait_s
        self.params = SamplingParams(
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            repetition_penalty=repetition_penalty,
        )
        self.sizer = ChunkSizer(chunk_size)
        self.prompts = PromptBuilder(
            engine.tokenizer,
            instruction=instruction,
            max_context=engine.max_context,
            max_new_tokens=max_new_tokens,
            stop_ids=engine.stop_ids,
        )
        self.clock = clock
        self.worker_host = worker_host or engine.host  # written on every batch row
        self._pending: list[_Prompt] = []
        self._chunks_run = 0  # numbers the per-chunk log line
        self._in_flight: dict[int, _Work] = {}  # by video pk: a redelivered message joins its video
        self._running: set[_Work] = set()  # videos with a prompt in the chunk the GPU thread runs
        self._cond = threading.Condition()  # guards _pending, _in_flight, _running, _stopping, _handing_back
        self._stopping = False
        self._handing_back = False
        self._abandon = threading.Event()  # a second hand_back: do not wait for the running chunk
        self._handed_back = threading.Event()
        self._chunk_abandoned = False  # hand_back gave up videos of the running chunk
        self._thread = threading.Thread(target=self._loop, name="gpu-batcher", daemon=True)
        # Finished chunks are committed by their own thread, so the GPU starts the next chunk at
        # once instead of waiting for the database (~0.4 s a chunk of 256 measured on an H100,
        # 3% of the chunk). FIFO, one writer: batch rows and summaries land in chunk order.
        self._stores: queue.Queue[tuple[Batch, list[VideoOutcome]] | None] = queue.Queue(STORES_IN_FLIGHT)
        self._store_thread = threading.Thread(target=self._store_loop, name="gpu-store", daemon=True)
        # While a chunk runs for minutes, this thread renews the leases of the videos this worker
        # holds, so the reconcile pass tells them from the videos of a dead worker.
        self.heartbeat, self.heartbeat_s = heartbeat, heartbeat_s
        self._beat_stop = threading.Event()
        self._beat_thread = threading.Thread(target=self._beat, name="gpu-heartbeat", daemon=True)

    # ------------------------------------------------------------------ task threads
    def start(self) -> Batcher:
        self._thread.start()
        self._store_thread.start()
        if self.heartbeat is not None:
            self._beat_thread.start()
        return self

    def _beat(self) -> None:
        while not self._beat_stop.wait(self.heartbeat_s):
            with self._cond:
                pks = list(self._in_flight)
            try:
                self.heartbeat(pks)  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - a missed beat is retried next time
                log.warning("heartbeat of %d videos failed", len(pks), exc_info=True)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Finish the chunk in progress, then fail whatever is still waiting with WorkerStopping.
        After ``hand_back`` nothing is waited for: its grace period already ran."""
        with self._cond:
            self._stopping = True
            handed_back = self._handing_back
            self._cond.notify_all()
        self._beat_stop.set()
        if self._thread.is_alive() and not handed_back:
            self._thread.join(timeout)
        self._flush_stores(timeout)
        with self._cond:
            works = list(self._in_flight.values())
            self._in_flight.clear()
            self._pending.clear()
        for work in works:
            for future in work.futures:
                if not future.done():
                    future.set_exception(WorkerStopping("worker stopped before this video was summarised"))

    def hand_back(self, grace_s: float) -> None:
        """Stop taking videos and give back every one not in the running chunk now (its task
        requeues its message); give the running chunk ``grace_s`` seconds to finish and be stored,
        then give its videos back too. A second call gives everything back at once."""
        with self._cond:
            again = self._handing_back
            self._stopping = self._handing_back = True
            waiting = [w for w in self._in_flight.values() if again or w not in self._running]
            running = len(self._running)
            self._chunk_abandoned |= again and running > 0
            self._cond.notify_all()
        log.warning(
            "shutting down: handing back %d videos now, %s",
            len(waiting),
            "and the running chunk too"
            if again
            else f"the {running} of the running chunk unless it finishes within {grace_s:.0f}s",
        )
        self._give_back(waiting)
        if again:
            self._abandon.set()
        else:
            threading.Thread(target=self._give_back_after, args=(grace_s,), name="gpu-hand-back", daemon=True).start()

    def abandoned(self) -> bool:
        """The running chunk was handed back unfinished (grace over, or a second hand_back)."""
        return self._chunk_abandoned

    def wait_handed_back(self, timeout: float | None = None) -> bool:
        """True once ``hand_back`` has stored or given back every video this worker held."""
        return self._handed_back.wait(timeout)

    def _give_back_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while self._busy() and not self._abandon.is_set() and time.monotonic() < deadline:
            time.sleep(HAND_BACK_POLL_S)
        with self._cond:
            rest = list(self._in_flight.values())
            running = bool(self._running)
        if rest:
            log.warning("handing back the %d videos of the unfinished chunk", len(rest))
            # Abandoned only if a generation is still on the GPU: the exit code says so.
            self._chunk_abandoned |= running
        self._give_back(rest)
        self._handed_back.set()

    def _give_back(self, works: list[_Work]) -> None:
        self._fail_tasks(set(works), WorkerStopping("the worker is shutting down; message handed back"))

    def drain(self) -> None:
        """Hand back every video not in the running chunk at once and let that chunk finish and be
        stored (no grace limit): a warm shutdown then waits for one chunk, not for every message in
        hand, and a Ctrl-C of `tubesum run` takes seconds."""
        self.hand_back(grace_s=STOP_TIMEOUT_S)

    def submit(self, video: VideoInput) -> Future:
        """Queue a video; the Future resolves to its VideoOutcome once that is committed."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise WorkerStopping("worker is stopping")
            work = self._in_flight.get(video.video_pk)
            if work is not None:
                work.futures.append(future)
                return future
        plan = SummaryPlan(video.transcript, self.prompts)  # tokenizing: outside the queue's lock
        with self._cond:
            # A hand-back that began while this video was being tokenized has given back what it
            # found: this one must go back too, not wait in a queue no chunk will take.
            if self._stopping:
                raise WorkerStopping("worker is stopping")
            work = self._in_flight.get(video.video_pk)
            if work is not None:  # another delivery of the same video got in meanwhile
                work.futures.append(future)
                return future
            work = _Work(video=video, plan=plan, futures=[future])
            self._in_flight[video.video_pk] = work
            self._enqueue(work, continuation=False)
        if plan.pieces > 1:
            log.info("video %s: long transcript cut into %d pieces", video.video_pk, plan.pieces)
            self._note(work)
        return future

    def _note(self, work: _Work) -> None:
        """Say where a long video's map-reduce stands (``status`` lists such videos)."""
        if self.progress is None:
            return
        plan = work.plan
        where = "map" if plan.levels == 0 else f"reduce level {plan.levels}"
        try:
            self.progress(work.video.video_pk, f"{plan.pieces} pieces, {where}: {len(plan.step)} prompts")
        except Exception:  # noqa: BLE001 - only a progress note: the summary goes on
            log.warning("video %s: could not note its map-reduce progress", work.video.video_pk, exc_info=True)

    def _enqueue(self, work: _Work, *, continuation: bool) -> None:
        # Caller holds self._cond.
        if self._stopping and continuation:  # no chunk will run it: let its message go back now
            work.finished = True
            self._in_flight.pop(work.video.video_pk, None)
            for future in work.futures:
                if not future.done():
                    future.set_exception(WorkerStopping("worker stopped between the steps of a long video"))
            return
        now = self.clock()
        work.outputs = {}
        for index, ids in enumerate(work.plan.step):
            self._pending.append(
                _Prompt(work, index, ids, Pending(now, len(ids), continuation, video=work.video.video_pk))
            )
        self._cond.notify_all()

    # ------------------------------------------------------------------ the GPU thread
    def _loop(self) -> None:
        while (chunk := self._next_chunk()) is not None:
            try:
                self._run(chunk, oom_split=False)
            except Exception as exc:  # outermost: a bug fails this chunk's videos, the worker goes on
                log.exception("chunk of %d prompts failed", len(chunk))
                self._fail_tasks({p.work for p in chunk}, exc)
            finally:
                with self._cond:
                    self._running.clear()
        while self._handing_back and self._stores.unfinished_tasks and not self._abandon.is_set():
            time.sleep(HAND_BACK_POLL_S)  # finished chunks are committed, not handed back
        with self._cond:  # handing back: a long video's next step will not run here
            rest = list(self._in_flight.values()) if self._handing_back else []
        self._give_back(rest)

    def _next_chunk(self) -> list[_Prompt] | None:
        """Block until a chunk is due (full, or its oldest prompt waited chunk_wait_s)."""
        with self._cond:
            while not self._stopping:
                limit = self.sizer.limit
                chosen = self._plan()
                # A chunk is full at the prompt cap, or when the token budget left prompts over.
                full = bool(self._pending) and (len(chosen) >= limit or len(chosen) < len(self._pending))
                wait = (
                    0.0
                    if full
                    else seconds_until_ready(
                        pending=len(self._pending),
                        limit=limit,
                        now=self.clock(),
                        wait_s=self.chunk_wait_s,
                        oldest_arrival=min((p.pending.arrived for p in self._pending), default=0.0),
                    )
                )
                if wait <= 0:
                    chosen = set(chosen)
                    chunk = [p for i, p in enumerate(self._pending) if i in chosen]
                    self._pending = [p for i, p in enumerate(self._pending) if i not in chosen]
                    self._running = {p.work for p in chunk}
                    return chunk
                self._cond.wait(None if wait == float("inf") else wait)
            return None

    def _plan(self) -> list[int]:
        """Indices into _pending of the next chunk (caller holds self._cond)."""
        pending = [p.pending for p in self._pending]
        capacity = self.engine.token_capacity
        if capacity is None:  # plain generate(): memory not planned in tokens
            return plan_chunk(pending, self.sizer.limit)
        return plan_token_chunk(
            pending,
            max_new_tokens=self.params.max_new_tokens,
            token_capacity=capacity * self.waves,
            max_prompts=self.sizer.limit,
        )

    def _run(self, chunk: list[_Prompt], *, oom_split: bool, lone_retry: bool = False) -> None:
        started, t0 = utcnow(), time.perf_counter()
        oom: OutOfMemory | None = None
        try:
            generations, timings = self.engine.generate(
                [p.ids for p in chunk], self.params, rolling=self.waves > 1, fold=self.fold
            )
        except OutOfMemory as exc:
            oom = exc  # handled below, outside this block: the halves run with no live traceback
        if oom is not None:
            self._on_oom(
                chunk, oom, started=started, wall_s=time.perf_counter() - t0, oom_split=oom_split, lone_retry=lone_retry
            )
            return
        self.sizer.on_success(len(chunk))
        self._chunks_run += 1
        log.info(
            records.chunk_line(
                self._chunks_run,
                videos=len({id(p.work) for p in chunk}),
                prompt_tokens=timings.prompt_tokens,
                generated_tokens=timings.generated_tokens,
                prefill_s=timings.prefill_s,
                decode_s=timings.decode_s,
                wall_s=timings.wall_s,
                peak_memory_bytes=timings.peak_memory_bytes,
            )
        )
        finished: list[_Work] = []
        for prompt, gen in zip(chunk, generations, strict=True):
            work = prompt.work
            if work.finished:
                continue
            work.first_started_at = work.first_started_at or timings.started_at
            work.outputs[prompt.index] = gen
            if len(work.outputs) < len(work.plan.step):
                continue  # other prompts of this step are still to run
            work.plan.feed([work.outputs[i] for i in range(len(work.plan.step))])
            if work.plan.done:
                finished.append(work)
            else:
                with self._cond:
                    self._enqueue(work, continuation=True)
                self._note(work)
        record = records.batch_record(self._facts(), timings, oom_split=oom_split)
        self._stores.put((record, [self._outcome(w, record) for w in finished]))  # committed by the store thread

    def _on_oom(
        self,
        chunk: list[_Prompt],
        exc: OutOfMemory,
        *,
        started: datetime,
        wall_s: float,
        oom_split: bool,
        lone_retry: bool,
    ) -> None:
        self.sizer.on_oom(len(chunk))
        failed: list[VideoOutcome] = []
        retry_alone = len(chunk) == 1 and not lone_retry and not isinstance(exc, KVCacheTooSmall)
        if len(chunk) == 1 and not retry_alone:
            (prompt,) = chunk
            # Alone, on a card the engine has just emptied (or beyond the whole KV cache): it
            # cannot fit. The numbers say why.
            reason = (
                f"out of memory on a single prompt of {len(prompt.ids)} tokens + "
                f"{self.params.max_new_tokens} new (KV cache of {self.engine.token_capacity} "
                f"tokens): {exc}"
            )
            log.warning("video %s failed: %s", prompt.work.video.video_pk, reason)
            failed.append(self._failure(prompt.work, reason))
        elif retry_alone:
            log.warning("a single prompt ran out of memory; retrying it once on the emptied card")
        else:
            log.warning(
                "chunk of %d prompts ran out of memory; retrying it in halves (later chunks capped at %d)",
                len(chunk),
                self.sizer.limit,
            )
        record = records.oom_record(
            self._facts(),
            batch_size=len(chunk),
            prompt_tokens=sum(len(p.ids) for p in chunk),
            error=str(exc),
            started=started,
            wall_s=wall_s,
            oom_split=oom_split,
        )
        self._stores.put((record, failed))  # in chunk order with the others
        if retry_alone:
            self._run(chunk, oom_split=True, lone_retry=True)
        elif len(chunk) > 1:
            for half in halves(chunk):
                alive = [p for p in half if not p.work.finished]  # a video may have failed meanwhile
                if alive:
                    self._run(alive, oom_split=True)

    # ------------------------------------------------------------------ outcomes
    def _outcome(self, work: _Work, record: Batch) -> VideoOutcome:
        work.finished = True
        plan = work.plan
        if plan.error is not None:
            return self._failure(work, plan.error)
        return VideoOutcome(
            video_pk=work.video.video_pk,
            status="done",
            text=plan.text or "",
            token_ids=plan.token_ids,
            finish_reason=plan.finish_reason,
            truncated=plan.truncated,
            prompt_tokens=plan.prompt_tokens,
            generated_tokens=plan.generated_tokens,
            pieces=plan.pieces,
            first_batch_started_at=work.first_started_at,
            batch_id=record.id,
            batch_size=record.batch_size,
            generate_s=record.wall_s,
        )

    def _failure(self, work: _Work, reason: str) -> VideoOutcome:
        work.finished = True
        with self._cond:  # its other prompts (pieces of a long transcript) will not run
            self._pending = [p for p in self._pending if p.work is not work]
        return VideoOutcome(
            video_pk=work.video.video_pk,
            status="failed",
            error=reason,
            pieces=work.plan.pieces,
            first_batch_started_at=work.first_started_at,
        )

    def _store_loop(self) -> None:
        while (item := self._stores.get()) is not None:
            try:
                self._commit(*item)
            except Exception:  # outermost: _commit already failed the tasks; the thread goes on
                log.exception("committing a chunk failed")
            finally:
                self._stores.task_done()
        self._stores.task_done()

    def _busy(self) -> bool:
        """A chunk is on the GPU or waiting to be committed."""
        return self._thread.is_alive() or self._stores.unfinished_tasks > 0

    def _flush_stores(self, timeout: float) -> None:
        """Commit every finished chunk, then end the store thread (the GPU thread has ended)."""
        if not self._store_thread.is_alive():
            return
        self._stores.put(None)
        self._store_thread.join(timeout)

    def _commit(self, record: Batch, outcomes: list[VideoOutcome]) -> None:
        """Store the batch and its finished videos, then wake their tasks (which ack their messages)."""
        try:
            self._store(record, outcomes)
        except Exception as exc:  # noqa: BLE001 - the tasks decide (retry); the worker goes on
            log.exception("storing batch %s failed", record.id)
            with self._cond:
                works = {self._in_flight[o.video_pk] for o in outcomes if o.video_pk in self._in_flight}
            self._fail_tasks(works, exc)
            return
        for outcome in outcomes:
            with self._cond:
                work = self._in_flight.pop(outcome.video_pk, None)
            for future in work.futures if work else []:
                future.set_result(outcome)

    def _store(self, record: Batch, outcomes: list[VideoOutcome]) -> None:
        """Commit, waiting out a database outage (workers/db_outage.py): a chunk is minutes of GPU
        time, not to be thrown away for a reconnect; meanwhile the GPU thread stops after
        STORES_IN_FLIGHT chunks (back-pressure). Past ``store_wait_s`` the tasks retry."""
        wait_out(lambda: self.sink(record, outcomes), limit_s=self.store_wait_s)

    def _fail_tasks(self, works: set[_Work], exc: BaseException) -> None:
        with self._cond:
            for work in works:
                work.finished = True
                self._in_flight.pop(work.video.video_pk, None)
            self._pending = [p for p in self._pending if p.work not in works]
        for work in works:
            for future in work.futures:
                if not future.done():
                    future.set_exception(exc)

    def _facts(self) -> records.EngineFacts:
        return records.engine_facts(self.engine, worker_host=self.worker_host, sizer=self.sizer)
