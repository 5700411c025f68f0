"""Server-Sent Events of an execution, a job or a Backend.AI run (bridge/events.py).

``GET /api/v1/execute/{id}/events``, ``GET /api/v1/jobs/{id}/events`` and
``GET /session/{id}/runs/{runId}/events`` answer ``text/event-stream``: one ``id:`` /
``event:`` / ``data:`` block per event, ending after ``end``. ``Last-Event-ID`` (the header an
EventSource sends on reconnect, or the ``last_event_id`` query parameter for clients that
cannot set headers) resumes after that id. Each dialect checks that the caller owns the record,
so another keypair's id is a 404 in that dialect's error shape.

Backpressure: every event is flushed to the socket before the next one is read from the table,
so a slow reader holds only its own place in the stream; nothing queues in memory for it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.iostream import StreamClosedError

from bridge.errors import InvalidRequest, RunNotFound
from bridge.events import execution_key, job_key, run_key

from .backendai.handlers import PREFIX as BACKENDAI_PREFIX
from .backendai.handlers import BackendAIHandler
from .base import BaseHandler
from .jobs.handlers import PREFIX as JOBS_PREFIX
from .jobs.handlers import JobsHandler
from .openapi import Operation
from .sandbox.handlers import PREFIX as SANDBOX_PREFIX
from .sandbox.handlers import SandboxHandler

EVENT_NAMES = ("stdout", "stderr", "status", "end", "gap")


class EventStream(BaseHandler):
    """Writes one stream; subclasses say which (after checking its owner)."""

    _task: asyncio.Task[Any] | None = None

    def last_event_id(self) -> int:
        """Raises InvalidRequest for an id that is not a non-negative integer."""
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "last_event_id", "")
        if not raw:
            return 0
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequest(f"Last-Event-ID must be an integer, got {raw!r}.") from None
        if value < 0:
            raise InvalidRequest("Last-Event-ID must not be negative.")
        return value

    async def stream(self, key: str) -> None:
        after = self.last_event_id()
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # a proxy must not hold events back
        self._task = asyncio.current_task()
        try:
            async for ev in self.bridge.events.read(key, after):
                data = json.dumps(ev.data, ensure_ascii=False)
                self.write(f"id: {ev.id}\nevent: {ev.event}\ndata: {data}\n\n")
                await self.flush()  # resolves once the socket took it: the backpressure
        except (StreamClosedError, asyncio.CancelledError):
            return  # the client went away; it resumes with Last-Event-ID
        finally:
            self._task = None
        self.finish()

    def on_connection_close(self) -> None:
        # A reader waiting for the next event would not notice the client left until then.
        if self._task is not None:
            self._task.cancel()


class ExecutionEventsHandler(EventStream, SandboxHandler):
    owner_of = "execution"

    async def get(self, execution_id: str) -> None:
        """An execution's events. 400 (bad Last-Event-ID), 401, 403, 404."""
        await self.bridge.executions.get(self.keypair.access_key, execution_id)
        await self.stream(execution_key(execution_id))


class JobEventsHandler(EventStream, JobsHandler):
    owner_of = "job"

    async def get(self, job_id: str) -> None:
        """A job's events. 400, 401, 404."""
        await self.bridge.jobs.get_job(self.keypair.access_key, job_id)
        await self.stream(job_key(job_id))


class RunEventsHandler(EventStream, BackendAIHandler):
    owner_of = "session"

    async def get(self, ident: str, run_id: str) -> None:
        """A Backend.AI run's events (also of an ended session, also after a restart).
        400, 401, 404."""
        access_key = self.keypair.access_key
        live = self.bridge.sessions.find(access_key, ident)
        if live is not None and live.has_run(run_id):
            key: str | None = run_key(live.id, run_id)
        else:
            key = await self.bridge.events.find_run(access_key, ident, run_id)
        if key is None:
            raise RunNotFound(run_id)
        await self.stream(key)


_SSE = {"description": "the event stream", "content": {"text/event-stream": {"schema": {
    "type": "string", "description": "Server-Sent Events: id (integer, +1 per event), event "
    f"({', '.join(EVENT_NAMES)}), data (JSON; {{\"text\"}} for output). A gap event "
    "({\"from\", \"to\", \"missed\"}) stands for events no longer kept; the stream ends "
    "after end."}}}}
_ERRORS = {"400": {"description": "Bad Last-Event-ID"}, "401": {"description": "Missing or "
           "invalid credentials"}, "404": {"description": "Not found (or another keypair's)"}}


_PATH_PARAMS = {"execution_id": "The execution's id.", "job_id": "The job's id.",
                "id": "The session's name or UUID (ended sessions too).",
                "runId": "The run's id (runId of the execute call)."}


def _operation(path: str, summary: str, tag: str) -> Operation:
    params = [{"name": p.strip("{}"), "in": "path", "required": True,
               "schema": {"type": "string"}, "description": _PATH_PARAMS[p.strip("{}")]}
              for p in path.split("/") if p.startswith("{")]
    params += [{"name": "Last-Event-ID", "in": "header", "required": False,
                "schema": {"type": "integer"}, "description": "resume after this event id"},
               {"name": "last_event_id", "in": "query", "required": False,
                "schema": {"type": "integer"}, "description": "the same, for clients that "
                "cannot set headers"}]
    return Operation("GET", path, summary, tag, extra={
        "parameters": params, "responses": {"200": _SSE, **_ERRORS}})


OPERATIONS = [
    _operation("/api/v1/execute/{execution_id}/events",
               "An execution's output as Server-Sent Events", "sandbox"),
    _operation("/api/v1/jobs/{job_id}/events", "A job's output as Server-Sent Events", "jobs"),
    _operation("/session/{id}/runs/{runId}/events", "A run's output as Server-Sent Events",
               "backendai"),
]


def routes() -> list[tuple[str, type[BaseHandler]]]:
    return [
        (SANDBOX_PREFIX + r"/([^/]+)/events", ExecutionEventsHandler),
        (JOBS_PREFIX + r"/jobs/([^/]+)/events", JobEventsHandler),
        (BACKENDAI_PREFIX + r"/([^/]+)/runs/([^/]+)/events", RunEventsHandler),
    ]
