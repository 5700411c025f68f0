"""The core's exceptions. Each dialect maps them to its own error shape in one table.

    BridgeError
     ├── NotFound                  something named by the caller does not exist (for this keypair)
     │    ├── SessionNotFound
     │    ├── RunNotFound
     │    ├── ExecutionNotFound    a one-shot execution id unknown to this keypair
     │    ├── JobNotFound          a job id unknown to this keypair (job sessions)
     │    └── KeypairNotFound
     ├── InvalidRequest            the caller's input is wrong; nothing was changed
     │    ├── UnknownLanguage
     │    ├── LanguageUnavailable  a known language whose toolchain this server lacks
     │    ├── LimitExceeded        asks for more than the server's hard limits
     │    └── UnsafePath           a path that leaves the session's working dir
     ├── AuthFailed                missing, unknown, inactive or badly signed credentials
     ├── Forbidden                 the keypair may not do this to that target (a read-only
     │                             folder, a folder it does not own, a mounted folder's path)
     ├── QuotaExceeded             keypair concurrency reached (or its wait queue is full)
     │    └── HostBudgetExceeded   the host's memory budget for kernels is spent
     ├── RateLimited               too many executions in the window
     ├── DiskFull                  no space: the server's disk is low, or a quota'd dir is full
     ├── StoreUnavailable          the database cannot be reached now (a restart, a network cut):
     │                             every dialect's 503, "retry shortly"; nothing was acknowledged
     ├── Conflict                  the target's state forbids the call
     │    └── InvalidTransition    a run or session state machine refused a transition
     └── KernelError               the kernel misbehaved
          ├── KernelStartFailed
          └── KernelDied

    StartupRefused                 the server cannot start (data dir in use, port busy): one
                                   line for the operator, never a traceback
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the core raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StartupRefused(Exception):
    """Why ``serve`` will not start, in one line. Not a BridgeError: no request caused it."""


class NotFound(BridgeError):
    pass


class SessionNotFound(NotFound):
    def __init__(self, session: str) -> None:
        super().__init__(f"No session {session!r} for this keypair.")
        self.session = session


class RunNotFound(NotFound):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"No run {run_id!r} in this session.")
        self.run_id = run_id


class ExecutionNotFound(NotFound):
    def __init__(self, execution_id: str) -> None:
        super().__init__(f"Execution {execution_id} not found")
        self.execution_id = execution_id


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"No job {job_id!r} for this keypair.")
        self.job_id = job_id


class KeypairNotFound(NotFound):
    def __init__(self, access_key: str) -> None:
        super().__init__(f"No keypair with access key {access_key!r}.")


class InvalidRequest(BridgeError):
    pass


class UnknownLanguage(InvalidRequest):
    def __init__(self, language: str, known: list[str]) -> None:
        super().__init__(f"Unsupported language: {language}. Known: {', '.join(known)}.")
        self.language = language


class LanguageUnavailable(InvalidRequest):
    """A known language whose toolchain this server lacks (see languages.require_available)."""

    def __init__(self, language: str, missing: tuple[str, ...]) -> None:
        super().__init__(f"Language {language!r} is not available on this server "
                         f"(missing {', '.join(missing)}).")
        self.language = language


class LimitExceeded(InvalidRequest):
    def __init__(self, name: str, asked: int, allowed: int) -> None:
        super().__init__(f"{name}={asked} exceeds the server's hard limit of {allowed}.")


class UnsafePath(InvalidRequest):
    def __init__(self, path: str, why: str = "it leaves the session's working directory") -> None:
        super().__init__(f"Refused path {path!r}: {why}.")
        self.path = path


class AuthFailed(BridgeError):
    pass


class Forbidden(BridgeError):
    pass


# How a client frees a place held by a session of each origin (the dialect that made it).
_HOW_TO_FREE = {
    "backendai": "DELETE /session/{name}",
    "sandbox": "DELETE /api/v1/execute/session/{name}",
    "jobs": "DELETE /api/v1/sessions/{id}/close",
    "jupyter": "DELETE /api/kernels/{id}",
    "notebook": "ends with its notebook run",
    "execution": "ends with its execution",
    "job": "ends with its job",
}


class QuotaExceeded(BridgeError):
    """``holders``: (name, id, origin) of each kernel holder using one of the keypair's places
    (a session of a dialect, a one-shot execution, a batch job)."""

    def __init__(self, limit: int, holders: tuple[tuple[str, str, str], ...] = (),
                 why: str = "") -> None:
        message = (f"This keypair may run at most {limit} concurrent sessions (every kernel it "
                   "holds counts: sessions, executions, job and Jupyter kernels, notebook runs).")
        if holders:
            held = "; ".join(_holder(*h) for h in holders)
            message += (f" Held by: {held}. Free a place by closing one, or raise the limit: "
                        "kernel-bridge keys set-concurrency ACCESS_KEY N.")
        if why:
            message += f" {why}"
        super().__init__(message)
        self.limit = limit
        self.holders = holders


def _holder(name: str, sid: str, origin: str) -> str:
    free = _HOW_TO_FREE.get(origin, "close it").format(name=name, id=sid)
    return f"{name} ({origin}: {free})" if name == sid else f"{name} (id {sid}, {origin}: {free})"


class HostBudgetExceeded(QuotaExceeded):
    def __init__(self, asked: int, free: int, budget: int) -> None:
        mib = 1024 * 1024
        BridgeError.__init__(
            self, f"The server's memory budget for kernels is spent: this kernel's cap is "
                  f"{asked // mib} MiB, {free // mib} MiB of {budget // mib} MiB are free. "
                  "Retry when other kernels have ended.")
        self.limit = 0
        self.holders = ()


class RateLimited(BridgeError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Rate limit exceeded: at most {limit} executions per minute.")


class DiskFull(BridgeError):
    pass


class StoreUnavailable(BridgeError):
    """The database did not answer, and the call could not safely be retried. A write that
    raises this was not acknowledged: it either did not commit or its commit is unknown.
    The database's own error is logged, never sent (it names hosts and ports)."""

    def __init__(self) -> None:
        super().__init__("The server's database is unavailable right now; retry shortly.")


class Conflict(BridgeError):
    pass


class InvalidTransition(Conflict):
    def __init__(self, what: str, expected: str, got: str) -> None:
        super().__init__(f"{what}: expected state {expected}, got {got}.")


class KernelError(BridgeError):
    pass


class KernelStartFailed(KernelError):
    pass


class KernelDied(KernelError):
    pass


class KernelGone(KernelStartFailed):
    """A kernel a previous server process started cannot be taken over: it died while no server
    watched it, or it does not answer. The message says which, for a session's state_reason."""
