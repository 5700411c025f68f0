"""Why a run ended, in the words every Sandbox result uses (``reason``, ``signal``).

    completed      the program ran to its end and exited 0
    runtime_error  it exited non-zero, or a signal of its own making ended it (SIGSEGV, SIGABRT…)
    compile_error  the build failed; nothing ran
    timeout        the execution's deadline passed
    memory_limit   the memory cap's OOM killer ended it (the program or its whole kernel)
    killed         ended from outside: SIGKILL/SIGTERM/SIGINT/SIGHUP, a dead kernel, a closed
                   session

One place decides, from the run's state, the kernel's reply (``exit_code``, ``signal``,
``stage``) and whether the session's memory cgroup killed something during the run.
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass

from .runs import Run, RunState
from .session import Session

COMPLETED = "completed"
RUNTIME_ERROR = "runtime_error"
COMPILE_ERROR = "compile_error"
TIMEOUT = "timeout"
MEMORY_LIMIT = "memory_limit"
KILLED = "killed"
REASONS = (COMPLETED, RUNTIME_ERROR, COMPILE_ERROR, TIMEOUT, MEMORY_LIMIT, KILLED)

# Signals that come from outside the program: someone (or the OOM killer) stopped it.
_FROM_OUTSIDE = frozenset({signals.SIGKILL, signals.SIGTERM, signals.SIGINT, signals.SIGHUP})


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
