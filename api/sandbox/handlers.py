"""Sandbox execute API handlers: sync, async + status, batch, languages, session cleanup.

Thin views over :mod:`bridge.executions`: parse the body, call the core, render its answer.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from bridge import languages, testcases
from bridge.errors import NotFound, UnknownLanguage
from bridge.executions import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, Execution, ExecutionRequest

from ..base import BaseHandler
from ..dialect import MalformedBody
from ..openapi import Operation
from .errors import SANDBOX
from .models import (
    BatchRequest,
    BatchResponse,
    ExecuteRequest,
    ExecuteResponse,
    ExecutionStatus,
    Language,
    LanguageInfo,
    LanguageList,
    Message,
)

PREFIX = r"/api/v1/execute"


class SandboxHandler(BaseHandler):
    dialect = SANDBOX

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if self.dialect.lookup((kwargs.get("exc_info") or (None, None))[1], status_code)[0] \
                == 401:
            self.set_header("WWW-Authenticate", "ApiKey")  # as Nadoo (FastAPI APIKeyHeader)
        super().write_error(status_code, **kwargs)

    def request_for(self, body: ExecuteRequest) -> ExecutionRequest:
        """The core's request. Raises UnknownLanguage."""
        cases = None if body.test_cases is None else tuple(
            testcases.TestCase(c.stdin, c.expected_output, c.timeout, c.memory_mb)
            for c in body.test_cases)
        return ExecutionRequest(code=body.code, language=languages.resolve(body.language),
                                stdin=body.stdin, environment=body.environment or {},
                                timeout=body.timeout, session_id=body.session_id,
                                test_cases=cases)


def render_status(ex: Execution) -> dict[str, Any]:
    return ExecutionStatus(
        execution_id=ex.id, status=ex.status.value, created_at=ex.created_at,
        started_at=ex.started_at, completed_at=ex.completed_at,
        result=ExecuteResponse(**asdict(ex.result)) if ex.result is not None else None,
        error=ex.error).model_dump()


class ExecuteHandler(SandboxHandler):
    admits = True

    async def post(self) -> None:
        """Run code and answer with its result. 400, 401, 403, 422, 429."""
        req = self.request_for(self.parse(ExecuteRequest))
        if req.session_id is not None:  # its kernel may be another replica's
            await self.forward_if_elsewhere("sandbox_session", req.session_id)
        result = await self.bridge.executions.run(self.keypair.access_key, req)
        self.send(asdict(result))


class AsyncExecuteHandler(SandboxHandler):
    admits = True

    async def post(self) -> None:
        """Accept code to run in the background: ``status: pending``. 400, 401, 403, 422, 429."""
        req = self.request_for(self.parse(ExecuteRequest))
        if req.session_id is not None:  # its kernel may be another replica's
            await self.forward_if_elsewhere("sandbox_session", req.session_id)
        ex = await self.bridge.executions.submit(self.keypair.access_key, req)
        self.send(render_status(ex))


class StatusHandler(SandboxHandler):
    owner_of = "execution"

    async def get(self, execution_id: str) -> None:
        """An execution's status and, once ended, its result. 401, 403, 404."""
        ex = await self.bridge.executions.get(self.keypair.access_key, execution_id)
        self.send(render_status(ex))


class BatchHandler(SandboxHandler):
    admits = True

    async def post(self) -> None:
        """Up to 10 executions in order; per-item failures are exit code -1.

        400 (more than 10, an unsupported language anywhere), 401, 403, 422, 429.
        """
        data = self.json_object(allow_empty=False)
        if not isinstance(data, list):
            raise MalformedBody("body: Input should be a valid list")
        items = self.parse(BatchRequest, data).root
        reqs = [self.request_for(item) for item in items]
        results = await self.bridge.executions.batch(self.keypair.access_key, reqs)
        self.send([asdict(r) for r in results])


class LanguagesHandler(SandboxHandler):
    async def get(self) -> None:
        """The languages this server can run now (their toolchains are installed), Piston-style:
        name, toolchain version (measured at start), aliases. 401, 403."""
        versions = await self.bridge.language_versions if self.bridge.language_versions else {}
        self.send([Language(language=lang.name, version=versions.get(lang.name, "unknown"),
                            aliases=list(lang.aliases)).model_dump()
                   for lang in languages.available()])


class LanguageInfoHandler(SandboxHandler):
    async def get(self, name: str) -> None:
        """One language's limits and whether it is available here. 401, 403, 404."""
        try:
            lang = languages.resolve(name)
        except UnknownLanguage:
            raise NotFound(f"Language {name} not supported") from None
        settings = self.bridge.settings
        versions = await self.bridge.language_versions if self.bridge.language_versions else {}
        self.send(LanguageInfo(
            language=lang.name, available=lang.available,
            version=versions.get(lang.name, "unknown"), aliases=list(lang.aliases),
            toolchain=list(lang.toolchain),
            kernelspec=lang.kernelspec, file_extension=lang.suffix, docker_image=None,
            default_execution_time=DEFAULT_TIMEOUT_S, max_execution_time=MAX_TIMEOUT_S,
            max_memory=f"{settings.default_mem_kib // 1024}m" if settings.default_mem_kib
            else "unlimited").model_dump())


class SessionHandler(SandboxHandler):
    owner_of = "sandbox_session"

    async def delete(self, session_id: str) -> None:
        """End the named session: its kernel, state and files. 401, 403, 404."""
        await self.bridge.executions.close_session(self.keypair.access_key, session_id)
        self.send({"message": f"Session {session_id} cleaned up"})


_E = (400, 401, 403, 422, 429)
OPERATIONS = [
    Operation("POST", PREFIX, "Execute code and wait for the result", "sandbox", ExecuteRequest,
              ExecuteResponse, 200, _E),
    Operation("POST", PREFIX + "/async", "Submit code to run in the background", "sandbox",
              ExecuteRequest, ExecutionStatus, 200, _E),
    Operation("GET", PREFIX + "/status/{execution_id}", "Poll an execution", "sandbox",
              response=ExecutionStatus, errors=(401, 403, 404)),
    Operation("POST", PREFIX + "/batch", "Up to 10 executions, in order", "sandbox",
              BatchRequest, BatchResponse, 200, _E),
    Operation("GET", PREFIX + "/languages", "Languages available on this server, with versions "
              "and aliases", "sandbox", response=LanguageList, errors=(401, 403)),
    Operation("GET", PREFIX + "/language/{language}/info", "A language's limits", "sandbox",
              response=LanguageInfo, errors=(401, 403, 404)),
    Operation("DELETE", PREFIX + "/session/{session_id}", "End a named session", "sandbox",
              response=Message, errors=(401, 403, 404)),
]


def routes() -> list[tuple[str, type[BaseHandler]]]:
    return [
        (PREFIX + r"/?", ExecuteHandler),  # Nadoo's real route is "/api/v1/execute/"
        (PREFIX + r"/async", AsyncExecuteHandler),
        (PREFIX + r"/status/([^/]+)", StatusHandler),
        (PREFIX + r"/batch", BatchHandler),
        (PREFIX + r"/languages", LanguagesHandler),
        (PREFIX + r"/language/([^/]+)/info", LanguageInfoHandler),
        (PREFIX + r"/session/([^/]+)", SessionHandler),
    ]
