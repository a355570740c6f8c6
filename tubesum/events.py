"""Monitoring events (what Flower shows) are published by one thread: the worker's event loop.

Why: Celery's worker registers its event connection with the event loop, so the main thread reads
that socket whenever it is readable (to consume broker heartbeats). Stock Celery also lets any
thread publish task events: a task thread whose send fills the buffer (24 events) publishes the
whole buffer itself. On RabbitMQ that publish reads the same socket (the publisher confirm, and
py-amqp's ``connection.blocked`` check before every publish), so two threads read one socket: the
main thread takes the task thread's frame and the task thread waits for a frame that never comes,
holding the dispatcher's lock; the main thread then blocks on that lock and the worker stops
(issue 18: 64 messages held, no ``inspect ping`` answer until RabbitMQ dropped the connection).

Here a task thread only appends to the buffer and asks the event loop to flush it (the waker of
kombu's hub makes that immediate), so the socket has one reader and one writer: the loop's thread.
"""

from __future__ import annotations

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

# Buffered events a sending thread may hold before it publishes them itself: never, when the
# event loop flushes for it (any number; events wait at most one loop turn).
NEVER_FLUSH_INLINE = 2**62


class LoopFlushedEventDispatcher(EventDispatcher):
    """Celery's dispatcher, except that buffered (task) events are only published by the event
    loop's flush (``on_send_buffered``), never by the thread that sent them."""

    def __init__(self, *args, on_send_buffered=None, buffer_limit: int = 24, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if on_send_buffered is not None:
            buffer_limit = NEVER_FLUSH_INLINE
        super().__init__(*args, on_send_buffered=on_send_buffered, buffer_limit=buffer_limit, **kwargs)


class LoopFlushedEvents(Events):
    """``app.events`` whose Dispatcher is LoopFlushedEventDispatcher (Celery(events=...))."""

    dispatcher_cls = "tubesum.events:LoopFlushedEventDispatcher"
