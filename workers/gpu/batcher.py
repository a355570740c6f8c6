"""The in-process chunk collector of the GPU worker.

Celery runs the summarise tasks in N threads (N = chunk size). Each task thread hands its video to
the process-wide ``Batcher`` and blocks on a Future. The Batcher's single GPU thread collects up to
N prompts, or whatever arrived within ``chunk_wait_s`` of the first one, runs ONE
``engine.generate()`` over the whole chunk, commits every finished summary together with the batch
row, and only then resolves the futures: a task returns (and Celery acks its message) only once
its summary is in the database. Only this thread touches the model.

A long transcript becomes several map prompts in the chunk(s) of its video, and its reduce
prompts are queued first for the next chunk (see ``workers.summarise.SummaryPlan``).
Out of memory: the batch row is recorded as ``oom``, the chunk is split in halves and each half
retried; ``ChunkSizer`` caps later chunks at the largest size that worked.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from tubesum.models.base import utcnow
from tubesum.db import is_transient_db_error
from tubesum.errors import OutOfMemory, TubesumError
from tubesum.settings import Settings
from tubesum.workers.gpu.batching import ChunkSizer, Pending, halves, plan_chunk, seconds_until_ready
from tubesum.workers.gpu.engine import BatchTimings, Engine, Generation, SamplingParams, load_engine
from tubesum.workers.summarise import (
    BatchRecord,
    PromptBuilder,
    SummaryPlan,
    VideoInput,
    VideoOutcome,
    store_batch,
    touch_videos,
)

log = logging.getLogger(__name__)

# How long `stop()` waits for the GPU thread to finish its current chunk, seconds.
STOP_TIMEOUT_S = 600.0
# Tries of storing a finished chunk when the database connection drops, and the pause between
# them, seconds: a chunk is minutes of GPU time, not to be thrown away for a reconnect.
STORE_ATTEMPTS = 4
STORE_RETRY_S = 2.0
# Task threads (and so unacknowledged messages) per chunk slot. With two, the next chunk's messages
# are received and claimed while the current chunk generates, so the GPU never waits for the queue
# or the database; the price is twice the messages to redeliver when the worker dies.
CHUNKS_IN_HAND = 2
# Prompt length `--chunk-size auto` plans the KV cache for, tokens (a 20-minute talk is ~4k;
# longer chunks than that are caught by the out-of-memory split).
AUTO_CHUNK_PROMPT_TOKENS = 4096

Sink = Callable[[BatchRecord, Sequence[VideoOutcome]], None]
Heartbeat = Callable[[list[int]], None]  # video pks this worker holds → refresh their updated_at


class BatcherStopped(TubesumError):
    """The worker is shutting down; the video's message is redelivered to another worker."""


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
    def __init__(self, engine: Engine, *, sink: Sink, chunk_size: int, chunk_wait_s: float,
                 max_new_tokens: int, instruction: str, clock: Callable[[], float] = time.monotonic,
                 worker_host: str | None = None, heartbeat: Heartbeat | None = None,
                 heartbeat_s: float = 60.0) -> None:
        self.engine = engine
        self.sink = sink
        self.chunk_wait_s = chunk_wait_s
        self.params = SamplingParams(max_new_tokens=max_new_tokens)
        self.sizer = ChunkSizer(chunk_size)
        self.prompts = PromptBuilder(engine.tokenizer, instruction=instruction, max_context=engine.max_context,
                                     max_new_tokens=max_new_tokens, stop_ids=engine.stop_ids)
        self.clock = clock
        self.worker_host = worker_host or engine.host  # written on every batch row
        self._pending: list[_Prompt] = []
        self._in_flight: dict[int, _Work] = {}  # by video pk: a redelivered message joins its video
        self._cond = threading.Condition()  # guards _pending, _in_flight, _stopping
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpu-batcher", daemon=True)
        # While a chunk runs for minutes, this thread keeps its videos' updated_at fresh, so
        # `tubesum reconcile` tells them from the videos of a dead worker.
        self.heartbeat, self.heartbeat_s = heartbeat, heartbeat_s
        self._beat_stop = threading.Event()
        self._beat_thread = threading.Thread(target=self._beat, name="gpu-heartbeat", daemon=True)

    # ------------------------------------------------------------------ task threads
    def start(self) -> Batcher:
        self._thread.start()
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
        """Finish the chunk in progress, then fail whatever is still waiting with BatcherStopped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._beat_stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            works = list(self._in_flight.values())
            self._in_flight.clear()
            self._pending.clear()
        for work in works:
            for future in work.futures:
                if not future.done():
                    future.set_exception(BatcherStopped("worker stopped before this video was summarised"))

    def submit(self, video: VideoInput) -> Future:
        """Queue a video; the Future resolves to its VideoOutcome once that is committed."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise BatcherStopped("worker is stopping")
            work = self._in_flight.get(video.video_pk)
            if work is not None:
                work.futures.append(future)
                return future
        plan = SummaryPlan(video.transcript, self.prompts)  # tokenizing: outside the queue's lock
        with self._cond:
            work = self._in_flight.get(video.video_pk)
            if work is not None:  # another delivery of the same video got in meanwhile
                work.futures.append(future)
                return future
            work = _Work(video=video, plan=plan, futures=[future])
            self._in_flight[video.video_pk] = work
            self._enqueue(work, continuation=False)
        if plan.pieces > 1:
            log.info("video %s: long transcript cut into %d pieces", video.video_pk, plan.pieces)
        return future

    def _enqueue(self, work: _Work, *, continuation: bool) -> None:
        # Caller holds self._cond.
        now = self.clock()
        work.outputs = {}
        for index, ids in enumerate(work.plan.step):
            self._pending.append(_Prompt(work, index, ids, Pending(now, len(ids), continuation)))
        self._cond.notify_all()

    # ------------------------------------------------------------------ the GPU thread
    def _loop(self) -> None:
        while (chunk := self._next_chunk()) is not None:
            try:
                self._run(chunk, oom_split=False)
            except Exception as exc:  # outermost: a bug fails this chunk's videos, the worker goes on
                log.exception("chunk of %d prompts failed", len(chunk))
                self._fail_tasks({p.work for p in chunk}, exc)

    def _next_chunk(self) -> list[_Prompt] | None:
        """Block until a chunk is due (full, or its oldest prompt waited chunk_wait_s)."""
        with self._cond:
            while not self._stopping:
                limit = self.sizer.limit
                wait = seconds_until_ready(
                    pending=len(self._pending), limit=limit, now=self.clock(), wait_s=self.chunk_wait_s,
                    oldest_arrival=min((p.pending.arrived for p in self._pending), default=0.0))
                if wait <= 0:
                    chosen = set(plan_chunk([p.pending for p in self._pending], limit))
                    chunk = [p for i, p in enumerate(self._pending) if i in chosen]
                    self._pending = [p for i, p in enumerate(self._pending) if i not in chosen]
                    return chunk
                self._cond.wait(None if wait == float("inf") else wait)
            return None

    def _run(self, chunk: list[_Prompt], *, oom_split: bool) -> None:
        started, t0 = utcnow(), time.perf_counter()
        try:
            generations, timings = self.engine.generate([p.ids for p in chunk], self.params)
        except OutOfMemory as exc:
            self._on_oom(chunk, exc, started=started, wall_s=time.perf_counter() - t0, oom_split=oom_split)
            return
        self.sizer.on_success(len(chunk))
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
        self._commit(self._record(chunk, timings, oom_split=oom_split), [self._outcome(w) for w in finished])

    def _on_oom(self, chunk: list[_Prompt], exc: OutOfMemory, *, started: datetime, wall_s: float,
                oom_split: bool) -> None:
        self.sizer.on_oom(len(chunk))
        failed: list[VideoOutcome] = []
        if len(chunk) == 1:
            (prompt,) = chunk
            reason = f"out of memory on a single prompt of {len(prompt.ids)} tokens: {exc}"
            log.warning("video %s failed: %s", prompt.work.video.video_pk, reason)
            failed.append(self._failure(prompt.work, reason))
        else:
            log.warning("chunk of %d prompts ran out of memory; retrying it in halves (later chunks "
                        "capped at %d)", len(chunk), self.sizer.limit)
        record = self._oom_record(chunk, str(exc), started=started, wall_s=wall_s, oom_split=oom_split)
        self._commit(record, failed)
        if len(chunk) > 1:
            for half in halves(chunk):
                alive = [p for p in half if not p.work.finished]  # a video may have failed meanwhile
                if alive:
                    self._run(alive, oom_split=True)

    # ------------------------------------------------------------------ outcomes
    def _outcome(self, work: _Work) -> VideoOutcome:
        work.finished = True
        plan = work.plan
        if plan.error is not None:
            return self._failure(work, plan.error)
        return VideoOutcome(
            video_pk=work.video.video_pk, status="done", text=plan.text or "", token_ids=plan.token_ids,
            finish_reason=plan.finish_reason, prompt_tokens=plan.prompt_tokens,
            generated_tokens=plan.generated_tokens, pieces=plan.pieces, first_batch_started_at=work.first_started_at,
        )  # fmt: skip

    def _failure(self, work: _Work, reason: str) -> VideoOutcome:
        work.finished = True
        with self._cond:  # its other prompts (pieces of a long transcript) will not run
            self._pending = [p for p in self._pending if p.work is not work]
        return VideoOutcome(video_pk=work.video.video_pk, status="failed", error=reason,
                            pieces=work.plan.pieces, first_batch_started_at=work.first_started_at)

    def _commit(self, record: BatchRecord, outcomes: list[VideoOutcome]) -> None:
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

    def _store(self, record: BatchRecord, outcomes: list[VideoOutcome]) -> None:
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                return self.sink(record, outcomes)
            except Exception as exc:
                if attempt == STORE_ATTEMPTS or not is_transient_db_error(exc):
                    raise
                log.warning("storing batch %s failed (%s); try %d of %d in %.0fs", record.id, exc,
                            attempt + 1, STORE_ATTEMPTS, STORE_RETRY_S)
                time.sleep(STORE_RETRY_S)

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

    # ------------------------------------------------------------------ batch rows
    def _facts(self) -> dict:
        e = self.engine
        note = None
        if self.sizer.limit < self.sizer.configured:
            note = f"chunks capped at {self.sizer.limit} after running out of memory"
        return dict(id=uuid.uuid4().hex, worker_host=self.worker_host, devices=e.devices, model=e.model_name,
                    dtype=e.dtype, attn_implementation=e.attn_implementation, engine=e.backend,
                    chunk_size=self.sizer.configured, note=note)

    def _record(self, chunk: list[_Prompt], t: BatchTimings, *, oom_split: bool) -> BatchRecord:
        return BatchRecord(
            **self._facts(), batch_size=t.batch_size, prompt_tokens=t.prompt_tokens,
            padded_prompt_tokens=t.padded_prompt_tokens, generated_tokens=t.generated_tokens,
            prefill_s=t.prefill_s, decode_s=t.decode_s, wall_s=t.wall_s,
            generated_tokens_per_s=t.generated_tokens_per_s, peak_memory_bytes=t.peak_memory_bytes,
            oom_split=oom_split, status="ok", started_at=t.started_at, ended_at=t.ended_at,
        )  # fmt: skip

    def _oom_record(self, chunk: list[_Prompt], error: str, *, started: datetime, wall_s: float,
                    oom_split: bool) -> BatchRecord:
        facts = self._facts()
        facts["note"] = f"out of memory, split in halves: {error}"
        return BatchRecord(
            **facts, batch_size=len(chunk), prompt_tokens=sum(len(p.ids) for p in chunk),
            padded_prompt_tokens=0, generated_tokens=0, prefill_s=None, decode_s=None, wall_s=wall_s,
            generated_tokens_per_s=0.0, peak_memory_bytes=None, oom_split=oom_split, status="oom",
            started_at=started, ended_at=utcnow(),
        )  # fmt: skip


# ---------------------------------------------------------------------- the worker process


def resolve_chunk_size(engine: Engine, settings: Settings) -> int:
    if settings.chunk_size != "auto":
        return int(settings.chunk_size)
    prompt_tokens = min(AUTO_CHUNK_PROMPT_TOKENS, engine.max_context - settings.max_new_tokens)
    size = engine.auto_chunk_size(prompt_tokens=prompt_tokens, new_tokens=settings.max_new_tokens)
    log.info("--chunk-size auto: %d prompts (KV cache for %d + %d tokens each)", size, prompt_tokens,
             settings.max_new_tokens)
    return size


def build_batcher(settings: Settings, *, backend: str = "auto") -> Batcher:
    """Load the model once and make the Batcher that stores into settings.database_url."""
    engine = load_engine(settings.model, device_map=settings.device_map, dtype=settings.dtype,
                         attn=settings.attn, backend=backend,  # type: ignore[arg-type]
                         tensor_parallel=settings.tensor_parallel)
    log.info("engine warm-up (kernel compilation) took %.1fs", engine.warmup())
    return Batcher(engine, sink=partial(store_batch, database_url=settings.database_url),
                   chunk_size=resolve_chunk_size(engine, settings), chunk_wait_s=settings.chunk_wait_s,
                   max_new_tokens=settings.max_new_tokens, instruction=settings.prompt,
                   worker_host=settings.worker_host,
                   heartbeat=partial(touch_videos, database_url=settings.database_url),
                   heartbeat_s=settings.heartbeat_s)


def run_summarise_worker(settings: Settings, *, name: str = "gpu@%h", loglevel: str = "INFO",
                         backend: str = "auto") -> None:
    """`tubesum worker summarise`: load the model, then consume the summarise queue with
    CHUNKS_IN_HAND task threads per chunk slot, in this process (CUDA does not survive a fork)."""
    from tubesum.celery_app import SUMMARISE_QUEUE, app
    from tubesum.workers import summarise_tasks

    batcher = build_batcher(settings, backend=backend)
    summarise_tasks.install_batcher(batcher)
    batcher.start()
    concurrency = batcher.sizer.configured * CHUNKS_IN_HAND
    log.info("summarise worker %s: chunks of up to %d, waiting up to %.1fs for a full chunk",
             name, batcher.sizer.configured, settings.chunk_wait_s)
    try:
        app.worker_main(["worker", "-Q", SUMMARISE_QUEUE, "-P", "threads", f"--concurrency={concurrency}",
                         "-n", name, "-E", "--prefetch-multiplier=1",
                         # Like the fetch worker: no start-up sync with peers (it only delays
                         # start and leaves stale files on the filesystem broker).
                         "--without-mingle", "--without-gossip", f"--loglevel={loglevel}"])
    finally:
        batcher.stop()
        summarise_tasks.install_batcher(None)
        batcher.engine.close()  # tensor parallel: stop the rank processes
