"""Event streams: an execution's, job's or run's output as numbered events, kept in SQLite.

Each stream is a sequence of events with ids 1, 2, 3, …: ``stdout`` / ``stderr`` (``{"text"}``),
``status`` (``{"status", …}``) and, last, ``end``. A writer (:class:`Stream`) numbers events as
they happen and persists them in batches (every ``FLUSH_S``, and at once at the end); a reader
(:meth:`EventLog.read`) pages through the rows after the id it was given, at its own pace, and
waits for more while the stream is open. Readers never share an in-memory queue with the writer,
so a slow reader holds back nobody and loses nothing: what it has not read yet is in the table.

The table is bounded per stream (``MAX_EVENTS`` events, ``MAX_BYTES`` of data): past the bound
the oldest events are deleted, and a reader that asks for one of them gets a ``gap`` event
(``{"from", "to", "missed"}``) with the id of the last event it stands for, then what follows.
Adjacent output of one stream is merged into one event while it waits to be written, so a chatty
program does not become one row per write.

A stream that was open when the server stopped is ended on the next start (``end`` with
``status: failed``); streams are deleted ``RETENTION`` after they began.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .runs import Run
from .session import now_iso
from .store import Row, Store

log = logging.getLogger(__name__)

MAX_EVENTS = 10_000
MAX_BYTES = 2 * 1024 * 1024
FLUSH_S = 0.05  # writer batching: at most this late in the table
MERGE_LIMIT = 64 * 1024  # characters of output in one event (merged up to, split beyond)
PAGE = 256  # rows a reader fetches at a time
POLL_S = 1.0  # a waiting reader looks again at least this often (writers in other processes)
RETENTION = timedelta(days=1)
PRUNE_EVERY_S = 600.0
RESTART_END = {"status": "failed", "error": "The server restarted before this ended."}


@dataclass(frozen=True)
class Event:
    id: int
    event: str
    data: dict[str, Any]


def execution_key(execution_id: str) -> str:
    return f"execution:{execution_id}"


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def run_key(session_id: str, run_id: str) -> str:
    return f"run:{session_id}:{run_id}"


class Stream:
    """The writer of one stream. ``add`` never blocks; a task of its own writes the rows."""

    def __init__(self, log_: EventLog, key: str, row: tuple[Any, ...]) -> None:
        self.log = log_
        self.key = key
        self._row = row
        self._next = 1
        self._pending: list[list[Any]] = []  # [id, event, data] not yet written
        self._bytes = 0  # data bytes in the table
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # set by the end
        self.ended = False
        self.replaced = False  # a new stream took the key: what is pending is dropped
        self._created = False  # its row is in the table
        self._task = asyncio.create_task(self._write_forever())

    def add(self, event: str, data: dict[str, Any]) -> None:
        if self.ended:
            return
        if event in ("stdout", "stderr"):
            self._add_output(event, data["text"])
        else:
            self._pending.append([self._next, event, data])
            self._next += 1
        if event == "end":
            self.ended = True
            self._urgent.set()  # at once: a reader (or the caller of end()) waits for it
            self._wake.set()
        elif len(self._pending) == 1:
            self._wake.set()

    def _add_output(self, event: str, text: str) -> None:
        # Into the last pending event of the same stream while it has room, then into new
        # events of at most MERGE_LIMIT characters each.
        last = self._pending[-1] if self._pending else None
        if last is not None and last[1] == event and len(last[2]["text"]) < MERGE_LIMIT:
            room = MERGE_LIMIT - len(last[2]["text"])
            last[2] = {"text": last[2]["text"] + text[:room]}
            text = text[room:]
        for start in range(0, len(text), MERGE_LIMIT):
            self._pending.append([self._next, event, {"text": text[start:start + MERGE_LIMIT]}])
            self._next += 1

    def observe(self, event: str, data: dict[str, Any]) -> None:
        """A :data:`bridge.runs.Observer` that ends the stream when the run ends."""
        self.add(event, data)

    def observe_output(self, event: str, data: dict[str, Any]) -> None:
        """An observer for a run whose owner writes the ``end`` itself."""
        if event != "end":
            self.add(event, data)

    async def closed(self) -> None:
        """Wait until everything added, the end included, is in the table."""
        await asyncio.shield(self._task)

    async def _write_forever(self) -> None:
        # The stream's row is written with its first events, in one transaction (a short run
        # costs one trip to the store); until then a reader waits as for a stream not begun.
        while True:
            await self._wake.wait()
            if not self.ended:
                # Let a burst gather into one transaction; the end cuts the wait short (a
                # synchronous caller is answered once its end is in the table).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_S):
                        await self._urgent.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch and not self.replaced:
                try:
                    await self._write(batch)
                except Exception:
                    log.exception("events of %s not written", self.key)
                self.log.changed(self.key)
            if self.ended and not self._pending:
                self.log.forget(self)
                return

    async def _write(self, batch: list[list[Any]]) -> None:
        rows = [(self.key, i, ev, json.dumps(data, separators=(",", ":")))
                for i, ev, data in batch]
        self._bytes += sum(len(r[3]) for r in rows)
        last = batch[-1][0]
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO events (key, id, event, data) VALUES (?, ?, ?, ?)", r) for r in rows]
        statements.append(("UPDATE event_streams SET last_id=?, ended=? WHERE key=?",
                           (last, int(self.ended), self.key)))
        if not self._created:
            statements[:0] = [
                ("DELETE FROM events WHERE key=?", (self.key,)),
                ("INSERT INTO event_streams (key, access_key, owner, name, run_id, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                 " access_key=excluded.access_key, owner=excluded.owner, name=excluded.name,"
                 " run_id=excluded.run_id, created_at=excluded.created_at, first_id=1,"
                 " last_id=0, ended=0", self._row)]
            self._created = True
        await self.log.store.transaction(statements)
        if last > self.log.max_events or self._bytes > self.log.max_bytes:
            await self._trim(last)

    async def _trim(self, last: int) -> None:
        # Keep the newest events within both bounds (the end, being last, is always kept).
        row = await self.log.store.fetchone(
            "SELECT MIN(id) AS first, SUM(LENGTH(data)) AS kept FROM (SELECT id, data,"
            " SUM(LENGTH(data)) OVER (ORDER BY id DESC) AS tail FROM events WHERE key=?) AS t"
            " WHERE tail <= ? AND id > ?",
            (self.key, self.log.max_bytes, last - self.log.max_events))
        first = int(row["first"]) if row and row["first"] is not None else last
        await self.log.store.transaction([
            ("DELETE FROM events WHERE key=? AND id < ?", (self.key, first)),
            ("UPDATE event_streams SET first_id=? WHERE key=?", (first, self.key)),
        ])
        self._bytes = int(row["kept"]) if row and row["kept"] is not None else 0


class EventLog:
    """Every stream's writer and reader. Raises nothing a caller must handle."""

    def __init__(self, store: Store, *, max_events: int = MAX_EVENTS,
                 max_bytes: int = MAX_BYTES) -> None:
        self.store = store
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._open: dict[str, Stream] = {}
        self._signals: dict[str, asyncio.Event] = {}
        self._pruner: asyncio.Task[None] | None = None
        # Whether this server prunes this round (replicas: one of them, bridge/replicas.py).
        self.turn: Callable[[str, float], Awaitable[bool]] = _always

    async def start(self, end_open: bool = True) -> None:
        # Streams left open by the last server will never get their end: give it to them.
        # (Replicas share the table: they end only the streams of what has ended, end_orphans.)
        if end_open:
            await self._end(await self.store.fetchall(
                "SELECT key, last_id FROM event_streams WHERE ended=0"))
        self._pruner = asyncio.create_task(self._prune_forever())

    async def end_orphans(self) -> None:
        """End the open streams whose session, execution or job is over and that no live
        writer here holds: a replica that died left them open."""
        rows = await self.store.fetchall(
            "SELECT key, last_id FROM event_streams es WHERE ended=0"
            " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = es.owner"
            " AND s.state != 'TERMINATED')"
            " AND NOT EXISTS (SELECT 1 FROM executions x WHERE x.id = es.owner"
            " AND x.status IN ('pending', 'running'))"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = es.owner"
            " AND j.status IN ('queued', 'running'))")
        await self._end([r for r in rows if r["key"] not in self._open])

    async def _end(self, rows: list[Row]) -> None:
        data = json.dumps(RESTART_END)
        await self.store.transaction(
            [s for r in rows for s in (
                ("INSERT INTO events (key, id, event, data) VALUES (?, ?, 'end', ?)"
                 " ON CONFLICT DO NOTHING",
                 (r["key"], r["last_id"] + 1, data)),
                ("UPDATE event_streams SET last_id=?, ended=1 WHERE key=?",
                 (r["last_id"] + 1, r["key"])))])

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
        streams = list(self._open.values())
        for stream in streams:
            stream.add("end", {"status": "failed",
                               "error": "The server stopped before this ended."})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(s.closed() for s in streams), return_exceptions=True), 10)

    # -- writing --------------------------------------------------------------------------------

    def open(self, key: str, access_key: str, *, owner: str, name: str | None = None,
             run_id: str | None = None) -> Stream:
        """A new stream under ``key`` (one of the same key before it is replaced)."""
        old = self._open.get(key)
        if old is not None:
            old.replaced = True
            old.add("end", {"status": "replaced"})
        stream = Stream(self, key, (key, access_key, owner, name, run_id, now_iso()))
        self._open[key] = stream
        return stream

    def follow(self, run: Run, key: str, access_key: str, *, owner: str,
               name: str | None = None, ends_with_run: bool = True) -> Stream:
        """Record ``run``'s events under ``key``; its end ends the stream unless the owner
        writes the end itself (``ends_with_run=False``: :meth:`end`)."""
        stream = self.open(key, access_key, owner=owner, name=name, run_id=run.run_id)
        run.observers.append(stream.observe if ends_with_run else stream.observe_output)
        return stream

    async def end(self, key: str, access_key: str, data: dict[str, Any], *,
                  owner: str = "") -> None:
        """End the stream ``key`` with ``data`` (opening it first if it never was), and wait
        until it is in the table. A stream that already ended is left as it is."""
        stream = self._open.get(key)
        if stream is None:
            row = await self.store.fetchone("SELECT ended FROM event_streams WHERE key=?",
                                            (key,))
            if row is not None:
                return
            stream = self.open(key, access_key, owner=owner)
        stream.add("end", data)
        await stream.closed()

    def forget(self, stream: Stream) -> None:
        if self._open.get(stream.key) is stream:
            del self._open[stream.key]

    def changed(self, key: str) -> None:
        signal = self._signals.pop(key, None)
        if signal is not None:
            signal.set()

    # -- reading --------------------------------------------------------------------------------

    async def find_run(self, access_key: str, session: str, run_id: str) -> str | None:
        """The key of a Backend.AI run's stream, the session named by its name or id."""
        row = await self.store.fetchone(
            "SELECT key FROM event_streams WHERE access_key=? AND run_id=? AND key LIKE 'run:%'"
            " AND (owner=? OR name=?) ORDER BY created_at DESC LIMIT 1",
            (access_key, run_id, session, session))
        return str(row["key"]) if row is not None else None

    async def exists(self, key: str, access_key: str) -> bool:
        row = await self.store.fetchone(
            "SELECT 1 FROM event_streams WHERE key=? AND access_key=?", (key, access_key))
        return row is not None

    async def read(self, key: str, after: int = 0) -> AsyncIterator[Event]:
        """The events after id ``after``, waiting for more until the end; a ``gap`` stands
        for events no longer kept. The caller has checked that the reader owns the stream."""
        last = max(after, 0)
        while True:
            signal = self._signals.setdefault(key, asyncio.Event())  # before the query
            rows = await self.store.fetchall(
                "SELECT id, event, data FROM events WHERE key=? AND id > ? ORDER BY id LIMIT ?",
                (key, last, PAGE))
            if rows and rows[0]["id"] > last + 1:
                yield _gap(last, rows[0]["id"])
            elif not rows:
                head = await self.store.fetchone(
                    "SELECT first_id, last_id, ended FROM event_streams WHERE key=?", (key,))
                if head is not None and head["ended"] and last >= head["last_id"]:
                    return  # resumed after the end: there is nothing more
                if head is not None and head["first_id"] > last + 1 and head["last_id"] > last:
                    yield _gap(last, head["first_id"])
                    last = head["first_id"] - 1
                    continue
            for r in rows:
                last = r["id"]
                yield Event(last, r["event"], json.loads(r["data"]))
                if r["event"] == "end":
                    return
            if len(rows) < PAGE:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await signal.wait()

    async def _prune_forever(self) -> None:
        while True:
            cutoff = (datetime.now(UTC) - RETENTION).isoformat()
            with contextlib.suppress(Exception):
                if await self.turn("prune-events", PRUNE_EVERY_S):
                    await self.store.transaction([
                        ("DELETE FROM events WHERE key IN (SELECT key FROM event_streams"
                         " WHERE created_at < ?)", (cutoff,)),
                        ("DELETE FROM event_streams WHERE created_at < ?", (cutoff,)),
                    ])
            await asyncio.sleep(PRUNE_EVERY_S)


async def _always(name: str, every: float) -> bool:
    return True


def _gap(last: int, next_id: int) -> Event:
    return Event(next_id - 1, "gap", {"from": last + 1, "to": next_id - 1,
                                      "missed": next_id - 1 - last})
