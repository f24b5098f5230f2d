"""The embedded broker: kombu's filesystem transport, safe with producers and consumers at once.

kombu's own transport creates a message's file in the queue folder and only then writes it, while
a consumer takes any message file it sees: a consumer that comes in between reads an empty
message, cannot decode it, and Celery stops the worker (the job stays queued). Here a message is
written whole under a name consumers ignore and renamed into the queue; a consumer claims one by
renaming it into the processed folder, on the same filesystem, so exactly one consumer gets it;
and a file that still cannot be decoded (written by something else, or cut short by a crash) is
set aside with a log line instead of stopping the worker.

The queues' bindings (which exchange routes to which queue; a publish reads them) live in the
control folder. kombu rewrites that file in place, so a publish can read it empty; and it writes a
binding only the first time its process-wide record sees it, so a thread whose binding another
thread has recorded but not yet written, or a process reaching a second broker folder (another
home), publishes to no queue, and the message is dropped. Here the file is replaced whole,
writers take turns on a lock file, and every bind makes sure its binding is in the file.

Message names and folders are kombu's (`<time>_<uuid>.<queue>.msg`), so its `_size` and
`_purge` keep working unchanged.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from time import monotonic_ns

from kombu.transport import filesystem, virtual
from kombu.transport.filesystem import LOCK_EX, exchange_queue_t, lock, unlock
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".part"  # a message being written; consumers match `.msg` names only
UNREADABLE_SUFFIX = ".unreadable"  # a message set aside in the processed folder


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict, **kwargs) -> None:
        # Nanoseconds, so that one producer's messages sort (and are taken) in the order sent.
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        final = Path(self.data_folder_out) / name
        try:
            _write_whole(final, dumps(payload).encode())
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add {name!r} to {final.parent}") from exc

    def _get(self, queue: str) -> dict:
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != f"{queue}.msg":
                continue
            claimed = self._claim(name)
            if claimed is None:
                continue  # another consumer took it
            message = self._read(claimed)
            if message is not None:
                return message
        raise virtual.Empty()

    def _claim(self, name: str) -> Path | None:
        """Move the message into the processed folder; None when another consumer was first."""
        folder = Path(self.processed_folder)
        folder.mkdir(parents=True, exist_ok=True)
        claimed = folder / name
        try:
            os.rename(Path(self.data_folder_in) / name, claimed)
        except FileNotFoundError:
            return None
        return claimed

    def _read(self, claimed: Path) -> dict | None:
        """The claimed message, removed unless kept; None (and set aside) when undecodable."""
        try:
            message = loads(claimed.read_bytes().decode())
        except ValueError as exc:  # not UTF-8, or not JSON
            aside = claimed.with_name(claimed.name + UNREADABLE_SUFFIX)
            os.replace(claimed, aside)
            logger.error("skipped an undecodable broker message, kept as %s: %s", aside, exc)
            return None
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot read {claimed}") from exc
        if not self.store_processed:
            claimed.unlink(missing_ok=True)
        return message

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs) -> None:
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        # kombu returns early when its process-wide record has the binding, which another
        # thread may have recorded and not yet written, or which belongs to another broker
        # folder: make sure it is in this folder's file (only a read when it is).
        exchange = exchange or "amq.direct"  # as kombu names an unnamed one
        meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *meta)

    def _queue_bind(self, exchange, routing_key, pattern, queue) -> None:
        binding = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._update_table(exchange, lambda table: table if binding in table else [binding, *table])

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs) -> None:
        # Past kombu's filesystem `_delete`, which rewrites the bindings file in place.
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        binding = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._update_table(exchange, lambda table: [b for b in table if b != binding])

    def _update_table(self, exchange: str, change: Callable[[list], list]) -> None:
        """Replace the exchange's bindings file with `change(bindings)`, one writer at a time."""
        file = self._exchange_file(exchange)
        try:
            self.control_folder.mkdir(parents=True, exist_ok=True)
            with open(file.with_name(file.name + ".lock"), "a") as turn:
                lock(turn, LOCK_EX)
                try:
                    table = self.get_table(exchange)
                    changed = change(table)
                    if changed != table:
                        _write_whole(file, dumps(changed).encode())
                finally:
                    unlock(turn)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot update {file}") from exc


def _write_whole(path: Path, data: bytes) -> None:
    """Write `path` so that a reader finds the whole of `data` or no new file at all."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # a rename must never publish an unwritten file
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


class Transport(filesystem.Transport):
    """kombu's filesystem transport with `Channel` above; same URL and transport options."""

    Channel = Channel
