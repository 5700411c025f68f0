"""Batch runs: clean → build → exec through the session's bash kernel (seed 002, backendai.md §6).

The bash kernel (``kb-bash``) starts on a session's first batch run, in the same sandbox and
working dir as its language kernel, and stays for later runs. Each command runs in a subshell so
one step's ``cd`` or variables do not leak into the next. What the client sees, in order:

* ``clean-finished`` with the clean command's exit code, only when ``clean`` was given
  (``"*"``: the language's clean, which by default does nothing);
* ``build-finished`` with the build's exit code (0 when there was nothing to build);
* ``finished`` with the exec command's exit code, or 127 when the build failed, as the
  Backend.AI runner does; with no ``exec`` only the build runs.

Build output is always shown (the real runner pipes it whatever ``buildLog`` says); clean and
build cannot read stdin (they read end-of-file), exec can: a blocked read becomes
``waiting-input``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .kernels import Kernel
from .languages import BATCH_KERNELSPEC, Language
from .outcomes import BUILD_FAILED_EXIT_CODE, ExitRule
from .runs import Liveness, Program, Run
from .sandbox import Confinement
from .session import BATCH, Attached, Session

StartKernel = Callable[[str, Confinement], Awaitable[Kernel]]



@dataclass(frozen=True)
class BatchOptions:
    clean: str = ""
    build: str = ""
    exec: str = ""
    clean_requested: bool = False  # clean given ("*" included): clean-finished is reported

    @classmethod
    def parse(cls, options: dict[str, Any], language: Language) -> BatchOptions:
        """Validate a Batch Execution Query Object; ``"*"`` becomes the language's default.

        Raises InvalidRequest.
        """
        cmds: dict[str, str] = {}
        for key in ("clean", "build", "exec"):
            value = options.get(key)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InvalidRequest(f"options.{key} must be a string or null, got "
                                     f"{type(value).__name__}.")
            if value.strip() == "*":
                value = getattr(language, key)
            cmds[key] = value.strip()
        raw_clean = options.get("clean")
        return cls(**cmds, clean_requested=isinstance(raw_clean, str) and bool(raw_clean.strip()))


def in_subshell(command: str) -> str:
    # Newlines around the command: a trailing comment in it cannot swallow the ')'.
    return f"(\n{command}\n)"


async def bash_kernel(session: Session, start_kernel: StartKernel) -> Liveness:
    """The session's batch kernel, started on first use. Raises KernelStartFailed."""
    found = session.kernels.get(BATCH)
    if found is None:
        found = Attached.start(await start_kernel(BATCH_KERNELSPEC, session.confinement()))
        if not session.alive:  # destroyed while the kernel started: do not leak it
            await found.stop()
            raise InvalidRequest("The session ended while its batch kernel was starting.")
        session.kernels[BATCH] = found
    return found.liveness()


def program(session: Session, options: BatchOptions, start_kernel: StartKernel) -> Program:
    """The batch steps as a run program."""

    async def run_batch(run: Run) -> None:
        target = await bash_kernel(session, start_kernel)

        async def command(cmd: str, allow_stdin: bool = False) -> int:
            if not cmd:
                return 0  # nothing to do succeeds
            outcome = await run.step(target, in_subshell(cmd), allow_stdin=allow_stdin)
            return outcome.exit_code(ExitRule.PROGRAM)

        if options.clean_requested:
            run.mark("clean-finished", await command(options.clean))
        build_code = await command(options.build)
        run.mark("build-finished", build_code)
        if build_code != 0:
            run.finish(BUILD_FAILED_EXIT_CODE)
            return
        run.finish(await command(options.exec, allow_stdin=True))

    return run_batch
