"""The Redis broker: kombu's Redis transport, where an undecodable message is skipped, not fatal.

kombu decodes a message right after popping it from its list; when that fails (something other
than detox pushed to the queue, or a message was cut short) the error reaches Celery's consumer,
which treats it as unrecoverable and stops the worker. The message is already off the list, so
here it is logged (its first bytes) and the poll goes on as if the queue were empty.
"""

from __future__ import annotations

import json
import logging

from kombu.transport import redis, virtual

logger = logging.getLogger(__name__)

_UNDECODABLE = (json.JSONDecodeError, UnicodeDecodeError)


class Channel(redis.Channel):
    def _brpop_read(self, **options):  # the worker's blocking read
        try:
            return super()._brpop_read(**options)
        except _UNDECODABLE as exc:
            _skipped(exc)
            raise virtual.Empty() from exc

    def _get(self, queue):  # a single read (basic_get)
        try:
            return super()._get(queue)
        except _UNDECODABLE as exc:
            _skipped(exc)
            raise virtual.Empty() from exc


def _skipped(exc: ValueError) -> None:
    start = exc.doc[:200] if isinstance(exc, json.JSONDecodeError) else exc.object[:200]
    logger.error("skipped an undecodable broker message (%s), starting %r", exc, start)


class Transport(redis.Transport):
    """kombu's Redis transport with `Channel` above; same URLs and transport options."""

    Channel = Channel
