"""Task events on RabbitMQ never hang a worker (issue 18, item 1).

A real RabbitMQ connection wired as Celery's worker wires its event dispatcher (celery/worker/
consumer/events.py): publisher confirms on (tubesum's transport options), the connection
registered with a kombu Hub whose loop runs in one thread and reads it, task events buffered and
flushed through ``hub.call_soon``, and many task threads sending events at once, as the GPU
worker's threads pool does. With Celery's stock dispatcher a task thread that fills the buffer
publishes it itself and waits for the confirm on a socket the loop also reads: measured, every
run stalled within 3 s in a harness whose loop never flushed; with the loop flushing, as here, a
stall is rare (1 worker in 6 in the issue), so the test checks its cause: which threads publish.
tubesum's app publishes from the loop's thread only.
"""

from __future__ import annotations

import threading
import time

from kombu.asynchronous import Hub

from tubesum.celery_app import create_app
from tubesum.settings import Settings

SENDER_THREADS = 16  # task threads sending events at once
RUN_S = 6.0  # how long the threads send
STALL_S = 3.0
# The worker's loop thread also receives messages and acks them: each turn takes a while, so
# task threads fill the event buffer between flushes. Seconds.
LOOP_TURN_WORK_S = 0.005  # no thread's send may take longer than this
BROKER_HEARTBEAT_S = 30  # the worker's broker heartbeat (celery_app: broker_heartbeat)


def test_task_threads_sending_events_never_stall_the_event_connection(rabbitmq_url, db_url):
    app = create_app(Settings(broker_url=rabbitmq_url, database_url=db_url))
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    conn = app.connection_for_write(heartbeat=BROKER_HEARTBEAT_S)
    conn.ensure_connection()
    hub = Hub()
    dispatcher = app.events.Dispatcher(
        conn, hostname="soak@test", buffer_group=["task"], on_send_buffered=lambda: hub.call_soon(dispatcher.flush)
    )
    dispatcher.send("worker-online")  # the worker's first event, from the main thread
    publishers: set[str] = set()  # the threads that wrote events to the connection
    real_publish = dispatcher._publish

    def publish(*args, **kwargs):  # type: ignore[no-untyped-def]
        publishers.add(threading.current_thread().name)
        return real_publish(*args, **kwargs)

    dispatcher._publish = publish
    conn.transport.register_with_event_loop(conn.connection, hub)
    stop = threading.Event()
    last_sent: dict[int, float] = {}
    sent = [0]

    def loop() -> None:
        turns = hub.create_loop()
        while not stop.is_set():
            next(turns)
            time.sleep(LOOP_TURN_WORK_S)

    def sender(i: int) -> None:
        while not stop.is_set():
            dispatcher.send("task-started", uuid=f"task-{i}")
            last_sent[i] = time.monotonic()
            sent[0] += 1

    threads = [threading.Thread(target=loop, name="loop", daemon=True)]
    threads += [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(SENDER_THREADS)]
    for thread in threads:
        thread.start()
    longest_gap = 0.0
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < RUN_S:
            time.sleep(0.2)
            now = time.monotonic()
            gap = now - max(last_sent.values(), default=t0)
            longest_gap = max(longest_gap, gap)
            assert gap < STALL_S, f"no task event sent for {gap:.1f}s (after {sent[0]} events): the connection hung"
    finally:
        stop.set()
        conn.close()  # wakes a thread blocked on the socket
    assert sent[0] > 1000
    # One reader and one writer of the socket: the event loop's thread.
    assert publishers == {"loop"}
    print(f"{sent[0]} events from {SENDER_THREADS} threads in {RUN_S:.0f}s, longest gap {longest_gap:.2f}s")
