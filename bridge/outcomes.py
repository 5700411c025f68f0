"""How a run ends, decided once for every kind of run: its terminal state, its exit code, why it
ended (``reason``), and the text that explains a failure.

A run's exit code follows its kind's rule (:class:`ExitRule`) when its program ran to its end:

    query    a Backend.AI query: 0 whatever the code raised (seed 002); a process kernel
             reports its program's code, which counts
    program  one-shot executions, jobs, batch steps, the test-case runner: the program's code,
             as a shell would see it (``sys.exit(n)`` → n, an uncaught exception → 1)

A run that did not finish has no program exit code. Backend.AI shows ``finished`` with
:data:`KILLED_EXIT_CODE` (the kernel died, the session ended first) or :data:`NOT_STARTED_EXIT_CODE`
(its program could not start), or ``exec-timeout``; Sandbox results and jobs show
:data:`FAILED_EXIT_CODE` and say why on stderr (:func:`failure`).

Why a run ended, in the words every Sandbox result uses (``reason``, ``signal``):

    completed      the program ran to its end and exited 0
    runtime_error  it exited non-zero, or a signal of its own making ended it (SIGSEGV, SIGABRT…)
    compile_error  the build failed; nothing ran
    timeout        the execution's deadline passed
    memory_limit   the memory cap's OOM killer ended it (the program or its whole kernel)
    killed         ended from outside: SIGKILL/SIGTERM/SIGINT/SIGHUP, a dead kernel, a closed
                   session

This module imports no other part of the core at run time: the run state machine
(:mod:`bridge.runs`) takes its states and codes from here.
"""

from __future__ import annotations

import enum
import signal as signals
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runs import Run
    from .session import Session


class RunState(enum.Enum):
    """Where a run stands; the transitions are :class:`bridge.runs.Run`'s."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING_INPUT = "waiting-input"
    FINISHED = "finished"  # its program ended: its exit code follows its kind's rule
    TIMED_OUT = "exec-timeout"  # its deadline passed
    FAILED = "failed"  # its kernel died, could not be reached or could not start
    CANCELLED = "cancelled"  # its session ended before it started (or while it ran)

    @property
    def terminal(self) -> bool:
        return self in (RunState.FINISHED, RunState.TIMED_OUT, RunState.FAILED,
                        RunState.CANCELLED)


class ExitRule(enum.Enum):
    """How a finished run's exit code is read from its kernel's reply (see the module doc)."""

    QUERY = "query"
    PROGRAM = "program"


KILLED_EXIT_CODE = 130  # Backend.AI's code for a run whose kernel died or whose session ended
NOT_STARTED_EXIT_CODE = 1  # Backend.AI's code for a run whose program could not start
BUILD_FAILED_EXIT_CODE = 127  # "command not found": a batch exec after a failed build (seed 002)
FAILED_EXIT_CODE = -1  # the Sandbox dialect's (and jobs') code for a run that failed or timed out
UNCAUGHT_EXIT_CODE = 1  # a program that raised, as `python prog.py` exits

KERNEL_DIED = "The kernel died while running this code (killed, out of memory, or exited)."
SESSION_ENDED_FIRST = "The session ended before this execution ran."
RUNNER_STOPPED = "The test-case runner stopped before it finished."

COMPLETED = "completed"
RUNTIME_ERROR = "runtime_error"
COMPILE_ERROR = "compile_error"
TIMEOUT = "timeout"
MEMORY_LIMIT = "memory_limit"
KILLED = "killed"
REASONS = (COMPLETED, RUNTIME_ERROR, COMPILE_ERROR, TIMEOUT, MEMORY_LIMIT, KILLED)

# Signals that come from outside the program: someone (or the OOM killer) stopped it.
_FROM_OUTSIDE = frozenset({signals.SIGKILL, signals.SIGTERM, signals.SIGINT, signals.SIGHUP})


@dataclass
class StepOutcome:
    """How one execute_request ended: what its reply said."""

    status: str = "ok"  # the reply's status: ok, error, aborted
    kernel_exit_code: int | None = None  # a process kernel's exit_code reply field
    ename: str = ""
    evalue: str = ""
    signal: int | None = None  # a process kernel's: the signal that ended the program
    stage: str = ""  # a compiled-language kernel's: "compile" or "run"
    compile_stdout: str | None = None  # a compiled-language kernel's compiler output
    compile_stderr: str | None = None

    @classmethod
    def from_reply(cls, content: dict[str, Any]) -> StepOutcome:
        """From an ``execute_reply``'s content (fields of the wrong type are left out)."""
        def text(name: str) -> str | None:
            value = content.get(name)
            return value if isinstance(value, str) else None

        def number(name: str) -> int | None:
            value = content.get(name)
            return value if isinstance(value, int) else None

        return cls(status=str(content.get("status", "ok")), ename=str(content.get("ename", "")),
                   evalue=str(content.get("evalue", "")),
                   kernel_exit_code=number("exit_code"), signal=number("signal"),
                   stage=str(content.get("stage", "")), compile_stdout=text("compile_stdout"),
                   compile_stderr=text("compile_stderr"))

    @property
    def program_exit_code(self) -> int:
        """The exit code a program would have: sys.exit(n) → n, an uncaught exception → 1."""
        if self.kernel_exit_code is not None:
            return self.kernel_exit_code
        if self.ename == "SystemExit":
            if self.evalue in ("", "None"):
                return 0
            try:
                return int(self.evalue)
            except ValueError:
                return UNCAUGHT_EXIT_CODE
        return UNCAUGHT_EXIT_CODE if self.status != "ok" else 0

    def exit_code(self, rule: ExitRule) -> int:
        """The run's exit code under its kind's rule."""
        if rule is ExitRule.QUERY:
            return self.kernel_exit_code or 0
        return self.program_exit_code


def timed_out(seconds: float) -> str:
    return f"Execution timed out after {seconds:g} s."


def timed_out_waiting(seconds: float, queued: float, why: str) -> str:
    """A one-shot whose wait for a kernel (a place under the quotas) outlasted its timeout."""
    return (f"Execution timed out after {seconds:g} s waiting for a kernel ({queued:.1f} s "
            f"queued): {why}")


def exit_code(run: Run) -> int:
    """A Sandbox result's (or a job's) exit code: the program's, or -1 when the run failed."""
    if run.state is RunState.FINISHED and run.exit_code is not None:
        return run.exit_code
    return FAILED_EXIT_CODE


def failure(run: Run, timeout: float) -> str:
    """Why a run that did not finish failed, in one sentence (a Sandbox result's ``error``).
    ``timeout``: the seconds the caller gave it."""
    if run.state is RunState.TIMED_OUT:
        return timed_out(timeout)
    if run.state is RunState.CANCELLED:
        return SESSION_ENDED_FIRST
    if run.state is RunState.FINISHED:  # its program ended, but not as it should (the judge)
        return RUNNER_STOPPED
    return KERNEL_DIED


def failed_stderr(run: Run, timeout: float) -> str:
    """The stderr of a failed Sandbox result or job: the program's own, then why it failed
    (unless the run already said so itself)."""
    why = failure(run, timeout)
    said = run.error is not None and run.error.rstrip("\n") == why
    return run.text("stderr") + ("" if said else f"{why}\n")


@dataclass(frozen=True)
class Ending:
    reason: str
    signal: int | None = None


def oom_kills(session: Session) -> int:
    """How many processes the memory cap of the session's kernel has killed so far."""
    kernel = session.main_kernel
    cgroup = kernel.cgroup if kernel is not None else None
    return cgroup.oom_kills() if cgroup is not None else 0


def ending(run: Run, ooms: int = 0) -> Ending:
    """The reason and signal of a run that has ended; ``ooms`` are the OOM kills of its
    kernel's cgroup while it ran."""
    if run.state is RunState.TIMED_OUT:
        return Ending(TIMEOUT)
    if run.state is RunState.CANCELLED:
        return Ending(KILLED)
    if run.state is RunState.FAILED:  # the kernel itself died
        return Ending(MEMORY_LIMIT, signals.SIGKILL) if ooms else Ending(KILLED)
    outcome = run.outcome
    sig = outcome.signal if outcome is not None else None
    if outcome is not None and outcome.stage == "compile" and run.exit_code:
        return Ending(COMPILE_ERROR, sig)
    if sig == signals.SIGKILL and ooms:
        return Ending(MEMORY_LIMIT, sig)
    if sig is not None:
        return Ending(KILLED if sig in _FROM_OUTSIDE else RUNTIME_ERROR, sig)
    return Ending(RUNTIME_ERROR if run.exit_code else COMPLETED)


def run_stderr(run: Run) -> str:
    """The run's stderr without the compiler's output, which a compiled-language kernel
    shows first on stderr and also reports apart (``compile_stdout``/``compile_stderr``)."""
    text = run.text("stderr")
    outcome = run.outcome
    if outcome is None or outcome.compile_stdout is None:
        return text
    return text[len(outcome.compile_stdout) + len(outcome.compile_stderr or ""):]
