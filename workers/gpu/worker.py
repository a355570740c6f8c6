"""The GPU worker process: load the model, build the Batcher, consume the summarise queue.

`tubesum worker summarise` runs this. The model is loaded in this process (CUDA does not survive a
fork), the Celery pool is threads: CHUNKS_IN_HAND task threads per chunk slot, each handing its
video to the one Batcher and waiting for its summary to be committed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from functools import partial

from celery import platforms
from celery.apps.worker import safe_say
from celery.exceptions import WorkerTerminate
from celery.platforms import EX_FAILURE, EX_OK
from celery.signals import worker_ready
from celery.utils.nodenames import default_nodename, host_format
from celery.worker import state as worker_state
from kombu.common import ignore_errors

from tubesum.celery_app import SUMMARISE_QUEUE, app
from tubesum.settings import Settings
from tubesum.workers.exit_codes import EXIT_CHUNK_ABANDONED, exit_now, run_celery_worker
from tubesum.workers.gpu.batcher import Batcher, rolling_waves
from tubesum.workers.gpu.engine import Engine, load_engine
from tubesum.workers.summarise.store import store_batch, touch_videos
from tubesum.workers.summarise.tasks import attach_batcher
from tubesum.workers.video_state import note_map_reduce

log = logging.getLogger(__name__)

# Task threads (and so unacknowledged messages) per chunk slot. With two, the next chunk's messages
# are received and claimed while the current chunk generates, so the GPU never waits for the queue
# or the database; the price is twice the messages to redeliver when the worker dies.
CHUNKS_IN_HAND = 2
# After a hand-back: how long the task threads may take to ack or requeue their messages, seconds.
TASKS_SETTLE_S = 10.0
# How often that is checked, seconds.
HAND_BACK_POLL_S = 0.1


def resolve_chunk_size(engine: Engine, settings: Settings) -> int:
    """The prompt cap of every chunk. A number is taken as given (chunks are still cut by the
    token budget); `auto` holds enough prompts to fill the KV cache, which then decides each
    chunk's size from the prompts in hand."""
    if settings.chunk_size != "auto":
        return int(settings.chunk_size)
    waves = rolling_waves(engine, settings.rolling)
    size = engine.auto_chunk_cap(new_tokens=settings.max_new_tokens, waves=waves)
    log.info(
        "--chunk-size auto: up to %d prompts a chunk, enough to fill %d x %s KV-cache tokens",
        size,
        waves,
        engine.token_capacity,
    )
    return size


def load_warm_engine(settings: Settings, *, backend: str = "auto") -> Engine:
    """Load the model once and compile its kernels before the first chunk."""
    engine = load_engine(
        settings.model,
        device_map=settings.device_map,
        dtype=settings.dtype,
        attn=settings.attn,
        backend=backend,  # type: ignore[arg-type]
        tensor_parallel=settings.tensor_parallel,
        quantize=settings.quantize,
        kv_cache_dtype=settings.kv_cache_dtype,
    )
    log.info("engine warm-up (kernel compilation) took %.1fs", engine.warmup())
    return engine


def build_batcher(engine: Engine, settings: Settings, *, lease_owner: str | None = None) -> Batcher:
    """The Batcher over a loaded engine, storing into settings.database_url; its heartbeat renews
    the leases ``lease_owner`` (this worker's node name) holds, and its batch rows name it too
    (two workers of one host, `--name gpu0` and `--name gpu1`), unless TUBESUM_WORKER_HOST is set."""
    return Batcher(
        engine,
        sink=partial(store_batch, database_url=settings.database_url),
        chunk_size=resolve_chunk_size(engine, settings),
        chunk_wait_s=settings.chunk_wait_s,
        max_new_tokens=settings.max_new_tokens,
        instruction=settings.prompt,
        worker_host=settings.worker_host or lease_owner,
        heartbeat=partial(
            touch_videos, database_url=settings.database_url, owner=lease_owner, lease_s=settings.lease_s
        ),
        heartbeat_s=settings.heartbeat_s,
        rolling=settings.rolling,
        fold=settings.fold_prefill,
        progress=partial(note_map_reduce, owner=lease_owner, database_url=settings.database_url),
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=settings.repetition_penalty,
    )


def hand_back_then_stop(batcher: Batcher, grace_s: float) -> None:
    """The first SIGTERM's work, in a thread: hand back, wait until every task thread has acked or
    requeued its message, then let Celery's warm shutdown run (it closes the broker channel, which
    on Redis would requeue messages still unacknowledged: stored chunks included)."""
    batcher.hand_back(grace_s)
    batcher.wait_handed_back(grace_s + TASKS_SETTLE_S)
    deadline = time.monotonic() + TASKS_SETTLE_S
    while (worker_state.active_requests or worker_state.reserved_requests) and time.monotonic() < deadline:
        time.sleep(HAND_BACK_POLL_S)
    worker_state.should_stop = EX_OK  # the consumer loop sees it within a second


def install_hand_back(batcher: Batcher, grace_s: float):  # -> the connected receiver
    """Once the worker consumes: SIGTERM and SIGINT (a preemption notice, `docker stop`, Ctrl-C)
    stop consuming and hand back what the worker holds, instead of Celery's warm shutdown, which
    would run every held video to the end first. A second signal hands back the running chunk too;
    a third ends the process at once (what is unacknowledged then comes back as after a SIGKILL)."""

    def receiver(sender=None, **_kwargs: object) -> None:  # type: ignore[no-untyped-def]
        consumer, seen = sender, []

        def on_signal(signum: int, _frame: object) -> None:
            seen.append(signum)
            if len(seen) == 1:
                safe_say(
                    f"worker: handing back held messages (grace {grace_s:.0f}s), then warm shutdown", sys.__stdout__
                )
                # Stop taking messages, as Celery's own cold shutdown does from its signal handler.
                if consumer.task_consumer is not None:
                    ignore_errors(consumer, consumer.task_consumer.cancel)
                threading.Thread(
                    target=hand_back_then_stop, args=(batcher, grace_s), name="gpu-shutdown", daemon=True
                ).start()
            elif len(seen) == 2:
                safe_say("worker: handing back the running chunk too", sys.__stdout__)
                threading.Thread(target=batcher.hand_back, args=(grace_s,), daemon=True).start()
            else:  # a third: stop now, as Celery's own hard shutdown would
                raise WorkerTerminate(EX_FAILURE)

        for name in ("SIGTERM", "SIGINT"):
            platforms.signals[name] = on_signal

    worker_ready.connect(receiver, weak=False)
    return receiver


def run_summarise_worker(
    settings: Settings, *, name: str = "gpu@%h", loglevel: str = "INFO", backend: str = "auto"
) -> int:
    """`tubesum worker summarise`: load the model, then consume the summarise queue with
    CHUNKS_IN_HAND task threads per chunk slot, in this process (CUDA does not survive a fork).
    Returns the exit code (workers/exit_codes.py); a worker that abandoned its running chunk ends
    the process here with EXIT_CHUNK_ABANDONED instead of returning."""
    nodename = host_format(default_nodename(name))  # what the tasks see as request.hostname
    sys.setswitchinterval(settings.gil_switch_interval_s)  # kernel launches wait less for the GIL
    batcher = build_batcher(load_warm_engine(settings, backend=backend), settings, lease_owner=nodename)
    attach_batcher(app, batcher)
    receiver = install_hand_back(batcher, settings.handback_grace_s)
    batcher.start()
    concurrency = batcher.sizer.configured * CHUNKS_IN_HAND
    log.info(
        "summarise worker %s: chunks of up to %d, waiting up to %.1fs for a full chunk",
        host_format(name),
        batcher.sizer.configured,
        settings.chunk_wait_s,
    )
    try:
        code = run_celery_worker(
            app,
            [
                "worker",
                "-Q",
                SUMMARISE_QUEUE,
                "-P",
                "threads",
                f"--concurrency={concurrency}",
                "-n",
                name,
                "-E",
                "--prefetch-multiplier=1",
                # Like the fetch worker: no start-up sync with peers (it only delays
                # start and leaves stale files on the filesystem broker).
                "--without-mingle",
                "--without-gossip",
                f"--loglevel={loglevel}",
            ],
        )
    finally:
        worker_ready.disconnect(receiver)
        batcher.stop()
        attach_batcher(app, None)
        if batcher.abandoned():
            # The GPU thread is still inside the generation it gave up: leave without tearing
            # down torch's threads under it (no SIGABRT), its videos already handed back.
            log.warning("exiting with the abandoned chunk's generation still running (exit %d)", EXIT_CHUNK_ABANDONED)
            exit_now(EXIT_CHUNK_ABANDONED)
        batcher.engine.close()  # tensor parallel: stop the rank processes
    return code
