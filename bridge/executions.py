"""One-shot executions: code in, stdout/stderr/exit code out (the Sandbox dialect's core).

An execution without a session id runs on a fresh kernel (the warm pool's, when the request fits)
in a session made for it alone and destroyed right after, so no globals and no files carry over.
With a session id it runs in the keypair's session of that name, created on first use, kept until
it is deleted or idles out. Either way it is a run of :mod:`bridge.sessions` with one deadline.

Every execution is recorded in SQLite before its caller hears of it: a synchronous one when it
ends, an asynchronous one when it is accepted (``pending``), again when it starts and when it
ends. Records are kept for ``RETENTION`` (at least an hour, as promised to pollers); one that a
server stop or crash cut off reads ``failed`` with the reason, never vanishes.

    pending → running → completed   (the program ran to its end; any exit code)
                      → failed      (timed out, kernel died or failed to start, server stopped)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from . import metrics, outcomes, testcases
from .admission import Ticket
from .batch import StartKernel, bash_kernel
from .errors import (
    BridgeError,
    ExecutionNotFound,
    InvalidRequest,
    KernelError,
    QuotaExceeded,
    RateLimited,
)
from .events import EventLog, execution_key
from .execution_scripts import execution_scripts
from .languages import Language, require_available, resolve
from .outcomes import ExitRule, RunState
from .replicas import owned_by
from .runs import Liveness, Run, code_program
from .session import Session, now_iso
from .sessions import Sessions
from .settings import Settings
from .store import Store, dumps

log = logging.getLogger(__name__)

MAX_BATCH = 10
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
RETENTION = timedelta(days=1)
RATE_WINDOW_S = 60.0


class ExecStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class ExecutionRequest:
    code: str
    language: Language
    stdin: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT_S
    session_id: str | None = None
    test_cases: tuple[testcases.TestCase, ...] | None = None  # judge mode (bridge.testcases)


@dataclass(frozen=True)
class ExecutionResult:
    execution_id: str
    stdout: str
    stderr: str
    exit_code: int
    execution_time: float  # seconds the code ran (kernel round trips included)
    language: str
    session_id: str | None
    truncated: bool = False  # output passed KB_OUTPUT_LIMIT: cut, and the run interrupted
    reason: str = outcomes.COMPLETED  # why it ended (bridge.outcomes)
    signal: int | None = None
    compile_stdout: str | None = None  # compiled languages only
    compile_stderr: str | None = None
    test_results: list[dict[str, Any]] | None = None  # one per test case, in order


@dataclass
class Execution:
    """The record a poller sees."""

    id: str
    access_key: str
    language: str
    session_id: str | None
    status: ExecStatus = ExecStatus.PENDING
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    completed_at: str | None = None
    result: ExecutionResult | None = None
    error: str | None = None

    def failed(self, reason: str, stdout: str = "", elapsed: float = 0.0,
               why: str = outcomes.KILLED) -> ExecutionResult:
        """End as ``failed``: exit code -1, the reason on stderr and in ``error``."""
        self.status, self.error, self.completed_at = ExecStatus.FAILED, reason, now_iso()
        self.result = ExecutionResult(self.id, stdout, f"{reason}\n", outcomes.FAILED_EXIT_CODE,
                                      round(elapsed, 4), self.language, self.session_id,
                                      reason=why)
        return self.result


def end_event(ex: Execution) -> dict[str, Any]:
    """The ``end`` event of an execution's stream: how the record ended."""
    r = ex.result
    return {"status": ex.status.value, "exit_code": r.exit_code if r else None,
            "reason": r.reason if r else None, "signal": r.signal if r else None,
            "error": ex.error}


class RateLimiter:
    """At most ``limit`` executions per keypair in any sliding minute."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    def acquire(self, key: str, n: int = 1) -> None:
        """Count ``n`` executions, or none of them. Raises RateLimited."""
        now = time.monotonic()
        seen = self._seen[key]
        while seen and now - seen[0] >= RATE_WINDOW_S:
            seen.popleft()
        if len(seen) + n > self.limit:
            raise RateLimited(self.limit)
        seen.extend([now] * n)


class Executions:
    """Runs executions and keeps their records. Raises the core's errors, never HTTP ones."""

    def __init__(self, settings: Settings, store: Store, sessions: Sessions, *,
                 events: EventLog | None = None, start_kernel: StartKernel | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.events = events  # each execution's event stream (bridge.events)
        self.owner: str | None = None  # this replica's id when replicas share the store
        self.shared_rate: Callable[[str, int, int], Awaitable[None]] | None = None
        # Whether this server prunes this round (replicas: one of them, bridge/replicas.py).
        self.turn: Callable[[str, float], Awaitable[bool]] | None = None
        self._start_kernel = start_kernel  # a named session's batch kernel runs test cases
        self.limiter = RateLimiter(settings.rate_limit)
        self._live: dict[str, Execution] = {}  # async executions not yet ended
        self._tasks: set[asyncio.Task[Any]] = set()  # async executions
        self._disposals: set[asyncio.Task[Any]] = set()  # one-shot sessions being destroyed
        self._killed: dict[str, Session] = {}  # execution id → its killed one-shot session
        self._naming: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pruner: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.adopt()
        self._pruner = asyncio.create_task(self._prune_forever())

    async def adopt(self) -> None:
        """Fail the unfinished executions recorded as this server's that it does not run: at
        start, the previous process's; with replicas, those just claimed from a dead one."""
        reason = "The server restarted before this execution ended."
        mine, params = owned_by(self.owner)
        rows = await self.store.fetchall(
            "SELECT id, language, session_id, started_at FROM executions"
            f" WHERE status IN ('pending', 'running'){mine}", params)
        for row in rows:
            if row["id"] in self._live:
                continue
            ex = Execution(row["id"], "", row["language"], row["session_id"],
                           started_at=row["started_at"])
            ex.failed(reason)
            await self._write(ex, insert=False)

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Let destroys finish (a half-destroyed session would leak its kernel).
        if self._disposals:
            await asyncio.wait(list(self._disposals), timeout=10)
        for ex in list(self._live.values()):
            # One that ended, its end shown to clients but cut short on its way to the store
            # (more likely with a remote database), is written as it ended.
            if ex.status not in (ExecStatus.COMPLETED, ExecStatus.FAILED):
                ex.failed("The server stopped before this execution ended.")
            with contextlib.suppress(Exception):
                await self._write(ex, insert=False)
        self._live.clear()

    async def _prune_forever(self) -> None:
        while True:
            cutoff = (datetime.now(UTC) - RETENTION).isoformat()
            with contextlib.suppress(Exception):
                if self.turn is None or await self.turn("prune-executions", 600):
                    await self.store.execute("DELETE FROM executions WHERE created_at < ?",
                                             (cutoff,))
            await asyncio.sleep(600)

    # -- the three ways in ------------------------------------------------------------------------

    async def run(self, access_key: str, req: ExecutionRequest,
                  observe: Callable[[Run], None] | None = None) -> ExecutionResult:
        """Run one execution to its end. Raises InvalidRequest, RateLimited, QuotaExceeded.

        ``observe`` is handed the run as it is queued (the web console streams its output)."""
        await self.admit(access_key, [req])
        ex = self._new(access_key, req)
        try:
            result = await self._execute(ex, req, observe=observe)
            await self._write(ex, insert=True)
        finally:
            self._answered(ex)
        return result

    async def submit(self, access_key: str, req: ExecutionRequest) -> Execution:
        """Accept an execution to run in the background; recorded as pending before return."""
        await self.admit(access_key, [req])
        ex = self._new(access_key, req)
        # Queued for a place now, so a full queue is a 429 before anything is recorded.
        ticket = self._reserve(ex, req)
        with self._released_on_error(ticket):
            await self._write(ex, insert=True)
        self._live[ex.id] = ex
        task = asyncio.create_task(self._background(ex, req, ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ex

    async def batch(self, access_key: str,
                    reqs: list[ExecutionRequest]) -> list[ExecutionResult]:
        """Run up to ten executions in order; one that fails gives exit code -1, the rest go on.

        Raises InvalidRequest (too many, or a language that cannot run) and RateLimited before
        any of them runs.
        """
        if len(reqs) > MAX_BATCH:
            raise InvalidRequest(f"Maximum {MAX_BATCH} executions allowed in a batch")
        await self.admit(access_key, reqs)
        results = []
        for req in reqs:
            ex = self._new(access_key, req)
            try:
                results.append(await self._execute(ex, req))
            except BridgeError as exc:
                results.append(ex.failed(exc.message))
            try:
                await self._write(ex, insert=True)
            finally:
                self._answered(ex)
        return results

    async def get(self, access_key: str, execution_id: str) -> Execution:
        """The record of one execution of this keypair. Raises ExecutionNotFound."""
        ex = self._live.get(execution_id)
        if ex is not None and ex.access_key == access_key:
            if ex.status in (ExecStatus.COMPLETED, ExecStatus.FAILED):
                # Ended but not yet in the store: it reads as running until it is (what a client
                # was told must survive a crash of the server).
                return replace(ex, status=ExecStatus.RUNNING, result=None, completed_at=None,
                               error=None)
            return ex
        row = await self.store.fetchone(
            "SELECT * FROM executions WHERE id=? AND access_key=?", (execution_id, access_key))
        if row is None:
            raise ExecutionNotFound(execution_id)
        result = ExecutionResult(**json.loads(row["result"])) if row["result"] else None
        return Execution(row["id"], access_key, row["language"], row["session_id"],
                         ExecStatus(row["status"]), row["created_at"], row["started_at"],
                         row["completed_at"], result, row["error"])

    async def close_session(self, access_key: str, session_id: str) -> None:
        """End the keypair's session of that name (its kernel and files). Raises
        SessionNotFound."""
        await self.sessions.destroy(self.sessions.get(access_key, session_id))

    # -- checks -----------------------------------------------------------------------------------

    async def admit(self, access_key: str, reqs: Iterable[ExecutionRequest]) -> None:
        """Refuse the whole request, counting nothing, unless every item can run.

        Raises InvalidRequest, RateLimited.
        """
        reqs = list(reqs)
        for req in reqs:
            lang = req.language
            require_available(lang)
            if not 0 < req.timeout <= MAX_TIMEOUT_S:
                raise InvalidRequest(f"timeout must be more than 0 and at most "
                                     f"{MAX_TIMEOUT_S:g} seconds.")
            if req.test_cases is not None:
                # The runner gives the cases their environment and stdin itself.
                testcases.check(list(req.test_cases), self.settings.default_mem_kib // 1024)
                execution_scripts(lang, req.environment, None)  # the names, still
                continue
            scripts = execution_scripts(lang, req.environment, req.stdin)
            if scripts is None and req.session_id is not None:
                raise InvalidRequest(
                    f"{lang.name} kernels take environment variables only when they start: "
                    "send 'environment' without 'session_id' for this language.")
        self.limiter.acquire(access_key, len(reqs))
        if self.shared_rate is not None:  # replicas: the limit is the cluster's
            await self.shared_rate(access_key, len(reqs), self.limiter.limit)

    # -- running ----------------------------------------------------------------------------------

    @staticmethod
    def _new(access_key: str, req: ExecutionRequest) -> Execution:
        return Execution(str(uuid.uuid4()), access_key, req.language.name, req.session_id)

    async def _background(self, ex: Execution, req: ExecutionRequest,
                          ticket: Ticket | None) -> None:
        try:
            await self._execute(ex, req, ticket=ticket, record_start=True)
        except BridgeError as exc:
            ex.failed(exc.message)
        except asyncio.CancelledError:
            return  # stop() records it as cut off by the server stopping
        except Exception as exc:
            log.exception("execution %s failed", ex.id)
            ex.failed(f"Internal error: {type(exc).__name__}")
        try:
            await self._write(ex, insert=False)
        finally:
            self._answered(ex)
        self._live.pop(ex.id, None)

    def _answered(self, ex: Execution) -> None:
        """The execution's end is stored (what a client is answered, or reads when it polls):
        the place of its one-shot kernel, killed already, goes back now. Not before: a keypair
        of concurrency N never shows more than N executions running."""
        session = self._killed.pop(ex.id, None)
        if session is not None:
            self.sessions.free_place(session)

    def _reserve(self, ex: Execution, req: ExecutionRequest) -> Ticket | None:
        """A one-shot's place (granted or queued); None for a named session's execution.
        Raises QuotaExceeded (the keypair's queue is full), LimitExceeded."""
        if req.session_id is not None:
            return None
        return self.sessions.reserve(ex.access_key, (ex.id, ex.id, "execution"), wait=True)

    @contextlib.contextmanager
    def _released_on_error(self, ticket: Ticket | None) -> Iterator[None]:
        """A place this execution holds goes back if what follows fails."""
        try:
            yield
        except BaseException:
            if ticket is not None:
                self.sessions.admission.release(ticket)
            raise

    async def _execute(self, ex: Execution, req: ExecutionRequest, *,
                       ticket: Ticket | None = None,
                       record_start: bool = False,
                       observe: Callable[[Run], None] | None = None) -> ExecutionResult:
        """Run ``req`` and fill in ``ex``. Kernel failures and a wait for a place that outlasts
        the timeout become a failed result; request-level problems (language mismatch, a full
        queue) raise. ``observe`` is handed the run as it is queued."""
        lang = req.language
        loop = asyncio.get_running_loop()
        # The timeout covers the wait for a place and the run (not the kernel's start, which a
        # cold compiled-language kernel may take seconds for, as before admission existed).
        accepted = loop.time()
        deadline = accepted + req.timeout
        if ticket is None:
            ticket = self._reserve(ex, req)
        if ticket is not None:
            waited = time.monotonic()
            try:
                await self.sessions.admission.wait(ticket, deadline)
            except QuotaExceeded as exc:
                ex.started_at = now_iso()
                return ex.failed(outcomes.timed_out_waiting(
                    req.timeout, time.monotonic() - waited, exc.message), elapsed=0.0)
        run_timeout = max(req.timeout - (loop.time() - accepted), 0.001)
        ex.status, ex.started_at = ExecStatus.RUNNING, now_iso()
        if record_start:
            with self._released_on_error(ticket):
                await self.store.execute(
                    "UPDATE executions SET status=?, started_at=? WHERE id=?",
                    (ex.status.value, ex.started_at, ex.id))
        judged = testcases.Judged() if req.test_cases is not None else None
        scripts = execution_scripts(lang, req.environment, req.stdin) if judged is None \
            else ("", "")
        try:
            if req.session_id is not None:
                session = await self._named_session(ex.access_key, req.session_id, lang)
            else:
                # A kernel that cannot take variables per execution is started with them.
                # Test cases need no kernel of the language: a bash kernel hosts the runner.
                session = await self.sessions.create(
                    ex.access_key, lang if judged is None else resolve("bash"),
                    origin="sandbox", on_timeout="destroy", ticket=ticket,
                    environ=dict(req.environment) if scripts is None else None)
        except KernelError as exc:
            return ex.failed(exc.message)
        try:
            run = self._new_run(session, ex, req, scripts, judged, run_timeout)
            ooms = outcomes.oom_kills(session)
            await self.sessions.submit(session, run)
            if observe is not None:
                observe(run)
            await run.wait()
            ooms = outcomes.oom_kills(session) - ooms
        finally:
            if req.session_id is None:
                # Killed now, so its place can be given back with the answer (_answered)
                # rather than after the clean-up, which is off the response path.
                if self.sessions.kill_now(session):
                    self._killed[ex.id] = session
                task = asyncio.create_task(self._dispose(session))
                self._disposals.add(task)
                task.add_done_callback(self._disposals.discard)
        return self._finish(ex, run, req, ooms, judged)

    def _new_run(self, session: Session, ex: Execution, req: ExecutionRequest,
                 scripts: tuple[str, str] | None, judged: testcases.Judged | None,
                 timeout: float) -> Run:
        """``timeout``: what is left of the execution's after its wait for a place."""
        if judged is None or req.test_cases is None:
            before, after = scripts or ("", "")
            program = code_program(session.liveness, ExitRule.PROGRAM, before, after)
            run = self.sessions.new_run(session, "query", req.code, program,
                                        # no stdin given: programs read end-of-file
                                        timeout=timeout,
                                        stdin=req.stdin if req.stdin is not None else "")
        else:
            cases = list(req.test_cases)
            line, tag = testcases.plan(req.language, req.code, cases, dict(req.environment),
                                       self.settings.output_limit)
            start_kernel = self._start_kernel

            async def target() -> Liveness:
                if req.session_id is None:
                    return session.liveness()  # the bash session made for this execution
                if start_kernel is None:
                    raise InvalidRequest("This server cannot run test cases in a session.")
                return await bash_kernel(session, start_kernel)

            run = self.sessions.new_run(session, "query", req.code,
                                        testcases.program(target, tag, judged),
                                        timeout=testcases.deadline(req.timeout, cases),
                                        stdin=line)
        if self.events is not None:
            self.events.follow(run, execution_key(ex.id), ex.access_key, owner=ex.id,
                               ends_with_run=False)
        return run

    def _finish(self, ex: Execution, run: Run, req: ExecutionRequest, ooms: int = 0,
                judged: testcases.Judged | None = None) -> ExecutionResult:
        elapsed = (run.finished_at or time.time()) - (run.started_at or time.time())
        end = outcomes.ending(run, ooms)
        if judged is not None and run.state is RunState.FINISHED and judged.compiles is not None:
            build = judged.build or {}
            compiled = judged.build is not None
            ex.status, ex.completed_at = ExecStatus.COMPLETED, now_iso()
            ex.result = ExecutionResult(
                ex.id, build.get("stdout", ""), build.get("stderr", ""),
                int(build.get("exit_code", 0)), round(elapsed, 4), ex.language, ex.session_id,
                run.truncated,
                reason=outcomes.COMPILE_ERROR if build.get("exit_code") else outcomes.COMPLETED,
                signal=build.get("signal"),
                compile_stdout=build.get("stdout", "") if compiled else None,
                compile_stderr=build.get("stderr", "") if compiled else None,
                test_results=judged.results)
            return ex.result
        stdout = run.text("stdout")
        outcome = run.outcome
        if run.state is RunState.FINISHED and run.exit_code is not None and judged is None:
            ex.status, ex.completed_at = ExecStatus.COMPLETED, now_iso()
            ex.result = ExecutionResult(
                ex.id, stdout, outcomes.run_stderr(run), run.exit_code, round(elapsed, 4),
                ex.language, ex.session_id, run.truncated, reason=end.reason, signal=end.signal,
                compile_stdout=outcome.compile_stdout if outcome else None,
                compile_stderr=outcome.compile_stderr if outcome else None)
            return ex.result
        # A judged run's deadline covers every case; otherwise the run has what the wait for
        # a place left of the request's timeout, and the request's is what the client gave.
        limit = run.timeout if judged is not None and run.timeout else req.timeout
        reason = outcomes.failure(run, limit)
        result = ex.failed(reason, stdout, elapsed, end.reason)
        ex.result = result = ExecutionResult(**{
            **asdict(result), "stderr": outcomes.failed_stderr(run, limit),
            "signal": end.signal, "truncated": run.truncated,
            "test_results": judged.fill(len(req.test_cases or ()), reason) if judged else None})
        return result

    async def _named_session(self, access_key: str, name: str, lang: Language) -> Session:
        # One lock per name: two first uses at once must not create two sessions.
        async with self._naming[(access_key, name)]:
            session = self.sessions.find(access_key, name)
            if session is None:
                return await self.sessions.create(access_key, lang, name=name, origin="sandbox",
                                                  on_timeout="restart")
        if session.language.name != lang.name:
            raise InvalidRequest(f"Session {name!r} runs {session.language.name}, "
                                 f"not {lang.name}.")
        if await session.kernel_dead():
            await self.sessions.restart(session)  # its kernel died in an earlier execution
        return session

    async def _dispose(self, session: Session) -> None:
        # Killed, not asked to exit: nothing in it is kept, and its place is wanted.
        await self.sessions.discard(session, "one-shot-finished", now=True)

    async def _write(self, ex: Execution, *, insert: bool) -> None:
        if ex.status in (ExecStatus.COMPLETED, ExecStatus.FAILED):
            metrics.EXECUTIONS.labels(ex.language, ex.status.value).inc()
        result = dumps(asdict(ex.result)) if ex.result is not None else None
        if insert:
            await self.store.execute(
                "INSERT INTO executions (id, access_key, language, session_id, status, error,"
                " result, created_at, started_at, completed_at, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ex.id, ex.access_key, ex.language, ex.session_id, ex.status.value, ex.error,
                 result, ex.created_at, ex.started_at, ex.completed_at, self.owner))
        else:
            await self.store.execute(
                "UPDATE executions SET status=?, error=?, result=?, started_at=?,"
                " completed_at=? WHERE id=?",
                (ex.status.value, ex.error, result, ex.started_at, ex.completed_at, ex.id))
        # The stream's end after the record: a client that saw it can read the result back.
        if self.events is not None and ex.status in (ExecStatus.COMPLETED, ExecStatus.FAILED):
            await self.events.end(execution_key(ex.id), ex.access_key, end_event(ex),
                                  owner=ex.id)
