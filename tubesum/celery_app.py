"""Builds the Celery app: broker, queues, routes, delivery guarantees. No task code lives here."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from tubesum.defaults import MAX_RESTORE_INTERVAL_S, PUBLISH_RETRY_POLICY, WORKER_LOST_RETRY_DELAY_S
from tubesum.errors import embedded_dir_unusable
from tubesum.events import LoopFlushedEvents
from tubesum.settings import Settings, get_settings

TRANSCRIPTS_QUEUE = "transcripts"
SUMMARISE_QUEUE = "summarise"
FETCH_TASK = "tubesum.fetch_transcript"
SUMMARISE_TASK = "tubesum.summarise"

# Modules every worker imports: the tasks, and the reconcile pass each worker runs in a thread.
TASK_MODULES = ["tubesum.workers.fetch_tasks", "tubesum.workers.summarise.tasks", "tubesum.workers.reconcile"]


# Set by `tubesum flower` in Flower's environment: its app keeps kombu's plain Redis transport.
FLOWER_PROCESS_ENV = "TUBESUM_FLOWER_PROCESS"


def declared_queue(name: str, arguments: dict | None = None) -> Queue:
    """A queue bound to its own direct exchange under its own name. Without this Celery binds every
    queue to the default exchange ("transcripts") with the default key, which the worker banner
    shows as the summarise queue on the transcripts exchange. (Tasks are published to the queue by
    name either way, so routing is the same; the banner and a raw publish now tell the truth.)"""
    return Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments=arguments)


def make_embedded_dirs(settings: Settings, *subdirs: str) -> Path:
    """The folders ``subdirs`` of TUBESUM_EMBEDDED_DIR, made if missing; returns the (absolute)
    embedded directory. BadInput naming the variable if one cannot be made (a read-only place)."""
    root = Path(settings.embedded_dir).resolve()
    for sub in subdirs:
        try:
            (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise embedded_dir_unusable(settings.embedded_dir, exc) from None
    return root


def embedded_broker_options(settings: Settings) -> dict:
    """The filesystem transport: one folder shared by every process on this machine."""
    root = make_embedded_dirs(settings, "broker/queue", "broker/processed", "broker/control") / "broker"
    return {
        "data_folder_in": str(root / "queue"),
        "data_folder_out": str(root / "queue"),
        "processed_folder": str(root / "processed"),
        "store_processed": False,
        "control_folder": str(root / "control"),
    }


def is_amqp(broker_url: str | None) -> bool:
    return (broker_url or "").startswith(("amqp://", "amqps://", "pyamqp://"))


def is_redis(broker_url: str | None) -> bool:
    return (broker_url or "").startswith("redis://")


def declared_queues(settings: Settings) -> list[Queue]:
    """One queue per role. On RabbitMQ, quorum queues: replicated, durable, and they hand a dead
    consumer's unacknowledged messages to another consumer as soon as its connection drops."""
    arguments = {"x-queue-type": "quorum"} if is_amqp(settings.broker_url) else None
    return [declared_queue(TRANSCRIPTS_QUEUE, arguments), declared_queue(SUMMARISE_QUEUE, arguments)]


def restore_interval_s(visibility_timeout_s: int) -> int:
    return max(1, min(MAX_RESTORE_INTERVAL_S, visibility_timeout_s // 10))


def celery_config(settings: Settings) -> dict:
    transport_options: dict = {
        # Redis redelivers an unacked message after this; it must outlast the longest chunk,
        # otherwise a running chunk is handed to a second worker. This is what brings back the
        # messages of a worker killed as a whole (SIGKILL, OOM killer, lost host).
        "visibility_timeout": settings.visibility_timeout_s,
        # Sweep for such messages often enough for a short test timeout; one sweep is one ZRANGE.
        "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
        "unacked_restore_throttle": 1,
    }
    if settings.embedded_broker:
        transport_options = embedded_broker_options(settings)
    elif is_amqp(settings.broker_url):
        # Publisher confirms: a send returns only once RabbitMQ has the message (a send that a
        # broker restart ate raises, and is retried, instead of vanishing).
        transport_options = {"confirm_publish": True}
    config: dict = {}
    # Flower consumes nothing, and reads queue lengths only through kombu's own Redis transport.
    if not settings.embedded_broker and is_redis(settings.broker_url) and not os.environ.get(FLOWER_PROCESS_ENV):
        # kombu's Redis transport, except that a queue entry that is not a Celery message is set
        # aside instead of stopping the worker (tubesum/broker_redis.py).
        config["broker_transport"] = "tubesum.broker_redis:Transport"
    return config | {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # reconnect forever after a broker restart
        "task_queues": declared_queues(settings),
        "task_create_missing_queues": False,
        "task_default_queue": TRANSCRIPTS_QUEUE,
        "task_routes": {
            FETCH_TASK: {"queue": TRANSCRIPTS_QUEUE},
            SUMMARISE_TASK: {"queue": SUMMARISE_QUEUE},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Progress lives in the database; results are only shown in Flower through events.
        "task_ignore_result": True,
        # At-least-once: ack after the work is committed; a killed worker's task is redelivered.
        "task_acks_late": True,
        # A prefork child that dies mid-task (WorkerLostError) is retried like Task.retry(), up to
        # the task's max_retries, then the task fails (and its video with it: workers/fetch_tasks.py).
        # reject_on_worker_lost is only the fallback if sending that retry fails.
        "task_retry_on_worker_lost": True,
        "task_reject_on_worker_lost": True,
        "task_annotations": {
            FETCH_TASK: {
                "max_retries": settings.fetch_max_retries + settings.max_worker_lost_retries,
                "default_retry_delay": WORKER_LOST_RETRY_DELAY_S,
            },
        },
        "worker_prefetch_multiplier": 1,
        # Sending a message (submit, fetch → summarise) waits out a broker restart instead of
        # failing after a second; past this the send fails and `tubesum reconcile` resends it.
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        # Flower sees every task from sent to done.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        "broker_heartbeat": 30,
    }


def create_app(settings: Settings | None = None) -> Celery:
    """The app, configured lazily: settings are read (and the embedded broker's folders made) when
    a worker, a producer or a test first uses it, never by importing this module."""
    # events: task events are published by the worker's event loop only (tubesum/events.py: a
    # worker on RabbitMQ hung when two threads read the event connection).
    app = Celery("tubesum", include=TASK_MODULES, events=LoopFlushedEvents)
    app.add_defaults(lambda: celery_config(settings or get_settings()))
    return app


app = create_app()
