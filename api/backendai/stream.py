"""Streaming execute: ``GET /stream/{kernel|session}/{id}/execute`` as a WebSocket, the loop the
Backend.AI CLI (``backend.ai run``) drives (backendai.md §3.6).

The client's first text frame is ``{"code", "mode", "options"}``; the server answers with one
``{"status", "console", "exitCode", "options", "files"}`` frame per step of the run, flushing
every 0.2 s, reads the next text frame as the input when the run waits for it, and closes after
the run's terminal result. Errors are ``{"status": "error", "msg"}`` frames.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from tornado.websocket import WebSocketClosedError

from bridge.errors import BridgeError
from bridge.runs import Run
from bridge.session import Session
from bridge.tasks import spawn

from ..dialect import check_encodable
from ..fields import describe_validation
from ..forward import UpstreamSocket
from .handlers import BackendAIHandler
from .models import Execute

log = logging.getLogger("kernel_bridge.api.backendai")

STREAM_FLUSH = 0.2  # seconds, as the real agent flushes a streaming run
TERMINAL = ("finished", "exec-timeout")


class StreamExecuteHandler(UpstreamSocket, BackendAIHandler):
    owner_of = "session"
    target: Session
    run: Run | None = None

    async def prepare(self) -> None:
        # Auth and the session are checked before the upgrade: a plain 401/404 problem body.
        await super().prepare()
        if self.upstream is not None:
            return  # another replica owns the session: frames are piped there
        self.target = self.session(self.path_args[0])

    def check_origin(self, origin: str) -> bool:
        return True  # every connection carries its own credentials; no cookies to ride on

    def open(self, *args: Any, **kwargs: Any) -> None:
        if self.upstream is not None:
            self.pipe_open(self.upstream)
            return
        self.set_nodelay(True)  # small frames must not wait for Nagle (DESIGN.md)

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            await self.pipe_message(self.upstream, message)
            return
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        try:
            if self.run is None:
                await self._start(text)
            else:
                self.run.feed_input(text)
        except BridgeError as exc:
            await self._send({"status": "error", "msg": exc.message})
        except (ValueError, ValidationError) as exc:
            msg = describe_validation(exc) if isinstance(exc, ValidationError) else str(exc)
            await self._send({"status": "error", "msg": f"Bad first frame: {msg}"})

    async def _start(self, text: str) -> None:
        body = Execute.model_validate({"runId": None, **check_encodable(json.loads(text))})
        if body.mode not in ("query", "batch"):
            raise ValueError("mode must be 'query' or 'batch'")
        sessions = self.bridge.sessions
        if body.mode == "query":
            run = sessions.query(self.target, body.code or "")
        else:
            run = self.bridge.batch_run(self.target, body.options or {}, None)
        await sessions.submit(self.target, run)
        self.run = run
        # Tornado delivers no further frame until on_message returns, and the input frames
        # must arrive while the run streams: the stream is a task of its own.
        self._stream = spawn(self._forward(run))

    async def _forward(self, run: Run) -> None:
        while self.ws_connection is not None:
            result = await run.next_result(STREAM_FLUSH)
            if result.status == "continued" and not result.console:
                continue  # nothing new: no empty frame every 0.2 s
            frame = {"status": result.status, "console": result.console,
                     "exitCode": result.exit_code, "options": result.options, "files": []}
            if not await self._send(frame):
                return
            if result.status in TERMINAL:
                self.close(1000, "run finished")
                return

    async def _send(self, frame: dict[str, Any]) -> bool:
        try:
            await self.write_message(json.dumps(frame))
            return True
        except WebSocketClosedError:
            return False

    def on_close(self) -> None:
        if self.upstream is not None:
            self.pipe_close(self.upstream)
            return
        # The run goes on to its end in the session, as a REST run would if its client left.
        log.info("stream of session %s closed", self.target.id)


def routes() -> list[tuple[str, type[UpstreamSocket]]]:
    return [(r"/stream/(?:kernel|session)/([^/]+)/execute", StreamExecuteHandler)]
