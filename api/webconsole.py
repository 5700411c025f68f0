"""The web console: ``GET /console`` (a static page, no build step at run time) and the small
JSON API it signs in to with a key (``/console/api/…``, always authenticated).

The page (api/console/) lists the keypair's sessions of every dialect with their usage, destroys
them, and runs code in a playground whose output streams back as NDJSON lines
(``{"stdout": …}`` / ``{"stderr": …}`` then ``{"exit_code": …}``), over the Sandbox dialect's
executions; job sessions it reads from the jobs API itself.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, StaticFileHandler

from bridge import languages, outcomes, overview
from bridge.errors import SessionNotFound
from bridge.runs import Run

from .backendai.errors import BACKENDAI
from .base import BaseHandler
from .dialect import Dialect
from .logs import REQUEST_ID_HEADER, request_id
from .sandbox.handlers import SandboxHandler
from .sandbox.models import ExecuteRequest

STATIC = Path(__file__).resolve().parent / "console"
STREAM_FLUSH_S = 0.1
SERVED = {"index.html", "console.js", "console.css", "editor.js"}


def _render(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


CONSOLE = Dialect("console", BACKENDAI.table, _render)


class ConsoleHandler(BaseHandler):
    dialect = CONSOLE


class PageHandler(StaticFileHandler):
    """The page and its assets; no credentials (the page asks for a key)."""

    dialect = CONSOLE  # for the access log and the HTTP metrics

    def set_default_headers(self) -> None:
        if not hasattr(self, "request_id"):
            self.request_id = request_id(self.request.headers.get(REQUEST_ID_HEADER))
        self.set_header(REQUEST_ID_HEADER, self.request_id)
        # The key lives in sessionStorage: no framing by other sites, no inline script.
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "default-src 'self'; style-src 'self' "
                        "'unsafe-inline'; frame-ancestors 'none'")

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        # Only the page's own files: not node_modules/, package.json or the editor's source.
        path = Path(absolute_path)
        if path != STATIC and (path.parent != STATIC or path.name not in SERVED):
            raise HTTPError(404)
        return super().validate_absolute_path(root, absolute_path)

    def get_cache_time(self, path: str, modified: Any, mime_type: str) -> int:
        return 0  # an upgraded server serves its new page at once


class WhoamiHandler(ConsoleHandler):
    def get(self) -> None:
        """Sign-in check: the keypair and the languages this server can run."""
        self.send({"access_key": self.keypair.access_key,
                   "languages": [lang.name for lang in languages.available()]})


class SessionsHandler(ConsoleHandler):
    def get(self) -> None:
        self.send({"sessions": overview.sessions(self.bridge, self.keypair.access_key)})


class SessionHandler(ConsoleHandler):
    async def delete(self, session_id: str) -> None:
        session = self.bridge.sessions.find(self.keypair.access_key, session_id)
        if session is None:
            raise SessionNotFound(session_id)
        self.session_id = session.id
        await self.bridge.sessions.destroy(session, "destroyed-in-console")
        self.send(None, 204)


class ExecutionsHandler(ConsoleHandler):
    async def get(self) -> None:
        rows = await overview.recent_executions(self.bridge, self.keypair.access_key)
        self.send({"executions": rows})


class ExecuteHandler(SandboxHandler):
    """A Sandbox execution whose output streams while it runs (NDJSON)."""

    dialect = CONSOLE

    async def post(self) -> None:
        req = self.request_for(self.parse(ExecuteRequest))
        started: asyncio.Future[Run] = asyncio.get_running_loop().create_future()

        def observe(run: Run) -> None:
            if not started.done():
                started.set_result(run)

        task = asyncio.ensure_future(
            self.bridge.executions.run(self.keypair.access_key, req, observe=observe))
        waiting: list[asyncio.Future[Any]] = [task, started]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        streamed = {"stdout": "", "stderr": ""}
        if started.done():  # else it was refused (or its kernel did not start): below
            self.set_header("Content-Type", "application/x-ndjson")
            self.set_header("Cache-Control", "no-store")
            run = started.result()
            while not run.exhausted:
                result = await run.next_result(STREAM_FLUSH_S)
                for kind, text in result.console:
                    if kind in streamed and isinstance(text, str) and text:
                        streamed[kind] += text
                        self.write(json.dumps({kind: text}) + "\n")
                try:
                    await self.flush()
                except StreamClosedError:
                    return  # the page went away; the execution ends and is recorded anyway
        try:
            done = await task
        except Exception:
            if not started.done():
                raise  # nothing sent yet: the dialect's error body
            self.write(json.dumps({"error": "internal",
                                   "exit_code": outcomes.FAILED_EXIT_CODE}) + "\n")
            self.finish()
            return
        if not started.done():
            self.set_header("Content-Type", "application/x-ndjson")
        for kind in ("stdout", "stderr"):  # e.g. the reason a failed execution ended
            rest = asdict(done)[kind][len(streamed[kind]):]
            if rest:
                self.write(json.dumps({kind: rest}) + "\n")
        self.session_id = done.session_id
        self.finish(json.dumps({"exit_code": done.exit_code, "execution_id": done.execution_id,
                                "execution_time": done.execution_time}) + "\n")


class ConsoleRedirect(BaseHandler):
    dialect = CONSOLE
    auth_required = False

    def get(self) -> None:
        self.redirect("/console/", permanent=False)


def routes() -> list[tuple[str, type[Any], dict[str, Any]]]:
    return [
        (r"/console", ConsoleRedirect, {}),
        (r"/console/api/whoami", WhoamiHandler, {}),
        (r"/console/api/sessions", SessionsHandler, {}),
        (r"/console/api/sessions/([^/]+)", SessionHandler, {}),
        (r"/console/api/executions", ExecutionsHandler, {}),
        (r"/console/api/execute", ExecuteHandler, {}),
        (r"/console/(.*)", PageHandler, {"path": str(STATIC), "default_filename": "index.html"}),
    ]
