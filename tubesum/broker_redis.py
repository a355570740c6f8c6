"""kombu's Redis transport, except that an entry on a queue that is not a kombu message is set
aside instead of killing the worker.

Why: kombu pops an entry (BRPOP) and parses it in the worker's event loop; ``redis-cli LPUSH
summarise 'not json'`` raised JSONDecodeError there and the worker stopped ("Unrecoverable error")
with nothing done about the entry. Here it is logged once (queue, length, its first characters)
and moved to ``<queue>.malformed`` (a Redis list, newest first, at most MALFORMED_KEEP entries) for
an operator to read; the worker goes on. The entry was already popped, so nothing else is lost.
"""

from __future__ import annotations

import json
import logging

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

# Malformed entries kept per queue for inspection, newest first (older ones are dropped).
MALFORMED_KEEP = 1000
# Characters of a malformed entry shown in the log line.
MALFORMED_SHOWN_CHARS = 120
# What the set-aside list of a queue is called.
MALFORMED_SUFFIX = ".malformed"


def is_kombu_message(payload: object) -> bool:
    """The envelope kombu's Redis transport writes: a dict with a body and properties that carry a
    delivery tag (what kombu reads before any task code sees the message)."""
    if not isinstance(payload, dict) or "body" not in payload:
        return False
    properties = payload.get("properties")
    return isinstance(properties, dict) and "delivery_tag" in properties


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):  # type: ignore[no-untyped-def]
        # kombu's own read, with the parse checked: an entry that is not a kombu message is set
        # aside instead of raising in the event loop.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            raw = bytes_to_str(item)
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
            if not is_kombu_message(payload):
                self._set_aside(dest, raw)
                return True  # the entry is handled: poll again
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _set_aside(self, queue: str, raw: str) -> None:
        log.error(
            "queue %s: dropped an entry that is not a Celery message (%d chars: %r); kept in Redis list %s",
            queue,
            len(raw),
            raw[:MALFORMED_SHOWN_CHARS],
            queue + MALFORMED_SUFFIX,
        )
        try:
            with self.conn_or_acquire() as client:
                client.pipeline().lpush(queue + MALFORMED_SUFFIX, raw).ltrim(
                    queue + MALFORMED_SUFFIX, 0, MALFORMED_KEEP - 1
                ).execute()
        except self.connection_errors:
            log.warning("queue %s: could not keep the malformed entry", queue)


class Transport(kombu_redis.Transport):
    Channel = Channel
