"""Backend.AI kernel API handlers: create, info, restart, destroy, execute, interrupt, complete.

Routes exist under ``/v2/kernel``, ``/kernel`` and ``/session`` (API.md); ``{id}`` is a session's
name or UUID.
"""

from __future__ import annotations

import re
import time
from typing import Any

from bridge import __version__
from bridge.errors import InvalidRequest, RunNotFound
from bridge.languages import require_available, resolve
from bridge.runs import Result
from bridge.session import Limits, Session

from ..base import BaseHandler
from ..openapi import Operation
from .errors import BACKENDAI
from .models import (
    Complete,
    CreateResponse,
    CreateSession,
    DestroyResponse,
    Execute,
    ExecuteResponse,
    SessionInfo,
)

API_VERSION = "v5.20191215"
_VERSION = re.compile(r"^v(\d+)\.(\d{8})$")
PREFIX = r"(?:/v\d+)?/(?:kernel|session)"


class BackendAIHandler(BaseHandler):
    dialect = BACKENDAI

    async def prepare(self) -> None:
        version = self.request.headers.get("X-BackendAI-Version")
        if version is not None:
            m = _VERSION.match(version)
            if m is None or not 2 <= int(m.group(1)) <= 7:
                raise InvalidRequest(f"Unsupported API version {version!r} (v2 to v7 accepted).")
        await super().prepare()

    def session(self, ident: str) -> Session:
        s = self.bridge.sessions.get(self.keypair.access_key, ident)
        self.session_id = s.id
        return s


class HelloHandler(BackendAIHandler):
    auth_required = False

    def get(self) -> None:
        self.send({"version": API_VERSION, "manager": f"kernel-bridge {__version__}"})


class CreateHandler(BackendAIHandler):
    admits = True

    async def post(self) -> None:
        """Create (or reuse) a session. 201 created, 200 reused; 400/406/412."""
        body = self.parse(CreateSession)
        if not body.language:
            raise InvalidRequest("Either 'lang' or 'image' is required.")
        language = require_available(resolve(body.language))
        sessions = self.bridge.sessions
        name = body.session_name
        if name is not None:
            # A session of this name on another replica: that replica reuses (or refuses) it.
            await self.forward_if_elsewhere("session", name)
            existing = sessions.find(self.keypair.access_key, name)
            if existing is not None:
                if not body.reuseIfExists:
                    raise InvalidRequest(f"A session named {name!r} already exists.")
                self.send(self._created(existing, created=False), 200)
                return
        defaults = sessions.default_limits()
        limits = defaults
        if body.limits is not None:
            exec_ms = body.limits.execTimeout or body.limits.timeout
            limits = Limits(
                # 0 is "no limit" to Backend.AI; here the server's default deadline holds.
                query_timeout_ms=exec_ms or defaults.query_timeout_ms,
                max_cpu_credit_ms=exec_ms if exec_ms is not None else defaults.max_cpu_credit_ms,
                mem_kib=body.limits.maxMem or defaults.mem_kib,
                idle_timeout_s=defaults.idle_timeout_s,
            )
        mounts = await self.bridge.mounts_for(self.keypair.access_key, body.all_mounts)
        environ = body.config.environ if body.config and body.config.environ else {}
        session = await sessions.create(self.keypair.access_key, language, name=name,
                                        limits=limits, mounts=mounts, environ=environ,
                                        network=bool(body.config and body.config.network))
        self.send(self._created(session, created=True), 201)

    @staticmethod
    def _created(s: Session, *, created: bool) -> dict[str, Any]:
        return {"kernelId": s.name, "sessionId": s.id, "sessionName": s.name,
                "status": "RUNNING", "servicePorts": [], "created": created}


class SessionHandler(BackendAIHandler):
    owner_of = "session"

    def get(self, ident: str) -> None:
        """Session info with measured usage (seed 001). 404."""
        s = self.session(ident)
        usage = s.usage()
        now = time.monotonic()
        self.send({
            "lang": s.language.name,
            "image": s.language.name,
            "status": s.state.value,
            "age": int((now - s.started) * 1000),
            "idle": int(s.idle_for(now) * 1000),
            "queryTimeout": s.limits.query_timeout_ms,
            "idleTimeout": int(s.limits.idle_timeout_s * 1000),
            "maxCpuCredit": s.limits.max_cpu_credit_ms,
            "numQueriesExecuted": s.num_queries,
            "memoryLimit": s.limits.mem_kib,
            "memoryUsed": usage.mem_bytes // 1024,
            "cpuCreditUsed": usage.cpu_ms,
        })

    async def patch(self, ident: str) -> None:
        """Restart the kernel: 204. 404."""
        await self.bridge.sessions.restart(self.session(ident))
        self.send(None, 204)

    async def delete(self, ident: str) -> None:
        """Destroy: 200 with container stats. 404."""
        usage = await self.bridge.sessions.destroy(self.session(ident))
        self.send({"stats": {
            "cpu_used": usage.cpu_ms, "mem_max_bytes": usage.mem_max_bytes,
            "mem_cur_bytes": usage.mem_bytes,
            # The sandbox has no network, so nothing crossed one.
            "net_rx_bytes": 0, "net_tx_bytes": 0,
            "io_read_bytes": usage.io_read_bytes, "io_write_bytes": usage.io_write_bytes,
            "io_max_scratch_size": 0, "io_cur_scratch_size": 0,
        }})

    async def post(self, ident: str) -> None:
        """Execute (query, batch, continue, input). Always 200 with a result; 400/404."""
        body = self.parse(Execute)
        s = self.session(ident)
        sessions = self.bridge.sessions
        code = body.code or ""
        if body.mode == "complete":  # the legacy form of /complete
            completions = await sessions.complete(s, code, len(code))
            self.send({"result": {"status": "finished", "completions": completions}})
            return
        if body.mode in ("continue", "input"):
            if not body.runId:
                raise InvalidRequest(f"mode {body.mode!r} requires the runId of its run.")
            run = s.get_run(body.runId)
            if body.mode == "input":
                run.feed_input(code)
            elif run.exhausted:
                raise RunNotFound(body.runId)
        else:
            s.reuse_run_id(body.runId)
            if body.mode == "query":
                run = sessions.query(s, code, body.runId)
            else:
                run = self.bridge.batch_run(s, body.options or {}, body.runId)
            await sessions.submit(s, run)
        self.send({"result": self.render_result(await run.next_result(
            self.bridge.settings.flush_interval))})

    @staticmethod
    def render_result(r: Result) -> dict[str, Any]:
        return {"runId": r.run_id, "status": r.status, "exitCode": r.exit_code,
                "options": r.options, "files": [], "console": r.console}


class InterruptHandler(BackendAIHandler):
    owner_of = "session"

    async def post(self, ident: str) -> None:
        """Interrupt the running code: 204. 404."""
        await self.bridge.sessions.interrupt(self.session(ident))
        self.send(None, 204)


class CompleteHandler(BackendAIHandler):
    owner_of = "session"

    async def post(self, ident: str) -> None:
        """Completions at the cursor: {"result": {"status", "completions"}}. 404."""
        body = self.parse(Complete)
        s = self.session(ident)
        code, pos = body.code, len(body.code)
        if body.options is not None and body.options.line is not None:
            code = body.options.line
            pos = body.options.col if body.options.col is not None else len(code)
        completions = await self.bridge.sessions.complete(s, code, min(pos, len(code)))
        self.send({"result": {"status": "finished", "completions": completions}})


_P = "/session"
OPERATIONS = [
    Operation("GET", "/", "Server version (no auth)", "backendai", auth=False),
    Operation("POST", _P, "Create or reuse a session (also /kernel, /kernel/create, "
              "/v2/kernel/create, /session/_/create)", "backendai", CreateSession,
              CreateResponse, 201, (400, 401, 406, 412)),
    Operation("GET", _P + "/{id}", "Session information (seed 001 fields)", "backendai",
              response=SessionInfo, errors=(401, 404)),
    Operation("PATCH", _P + "/{id}", "Restart the session's kernel", "backendai", status=204,
              errors=(401, 404)),
    Operation("DELETE", _P + "/{id}", "Destroy the session", "backendai",
              response=DestroyResponse, errors=(401, 404)),
    Operation("POST", _P + "/{id}", "Execute: query, batch, continue, input", "backendai",
              Execute, ExecuteResponse, 200, (400, 401, 404, 409)),
    Operation("POST", _P + "/{id}/interrupt", "Interrupt the running code", "backendai",
              status=204, errors=(401, 404)),
    Operation("POST", _P + "/{id}/complete", "Completions at the cursor", "backendai",
              Complete, errors=(400, 401, 404)),
]


def routes() -> list[tuple[str, type[BaseHandler]]]:
    return [
        (r"/?", HelloHandler),
        (PREFIX + r"/create", CreateHandler),
        (r"/session/_/create", CreateHandler),
        (PREFIX, CreateHandler),
        (PREFIX + r"/([^/]+)/interrupt", InterruptHandler),
        (PREFIX + r"/([^/]+)/complete", CompleteHandler),
        (PREFIX + r"/([^/]+)", SessionHandler),
    ]

