"""Judge-style test cases: build a program once, run it once per case, each under its limits.

The work happens inside the session's sandbox, in the judge runner (``kernelspecs/judge.py``),
started from a bash kernel of the session as ``python3 -m kernelspecs.judge``: the one-shot
session's own kernel (a bash session made for the execution), or a named session's batch kernel,
which shares the session's working dir. The plan goes to the runner as one line of stdin (the
run's preset input), so nothing is written into the session dir from outside; the runner's
stdout carries only its records (``KBJ <tag> {json}``), which this module turns into the
result: the build (compiled languages), then one test result per case. Each record also reaches
the run's observers as it comes (event streams): the build output as ``stdout``/``stderr``, and
a ``status`` event per finished case.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidRequest
from .languages import Language
from .outcomes import ExitRule
from .runs import Liveness, Program, Run

MAX_CASES = 100
DEFAULT_CASE_TIMEOUT_S = 5.0
MAX_CASE_TIMEOUT_S = 60.0
DEFAULT_MEMORY_MB = 256
MIN_MEMORY_MB = 8
MIN_KEPT = 4096  # output characters kept per case and stream, however many cases
RUNNER = "python3 -m kernelspecs.judge"
STATUSES = ("accepted", "wrong_answer", "time_limit_exceeded", "memory_limit_exceeded",
            "runtime_error", "compile_error", "ok")


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest class, whatever its name

    stdin: str = ""
    expected_output: str | None = None
    timeout: float = DEFAULT_CASE_TIMEOUT_S  # seconds of CPU time
    memory_mb: int = DEFAULT_MEMORY_MB  # peak resident memory


@dataclass
class Judged:
    """What the runner reported, filled in as its records arrive."""

    build: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    compiles: int | None = None  # set by the runner's last record: it ran to its end

    def fill(self, n: int, why: str) -> list[dict[str, Any]]:
        """All ``n`` results; cases the runner never reached say why they did not run."""
        missing = [{"status": "runtime_error", "stdout": "", "stderr": f"Not run: {why}\n",
                    "exit_code": None, "signal": None, "time_ms": 0, "memory_kb": 0}
                   for _ in range(n - len(self.results))]
        return self.results + missing


def check(cases: list[TestCase], memory_cap_mb: int) -> None:
    """Raises InvalidRequest for a case list the runner could not honour."""
    if len(cases) > MAX_CASES:
        raise InvalidRequest(f"At most {MAX_CASES} test cases are allowed in one execution.")
    for i, case in enumerate(cases):
        if not 0 < case.timeout <= MAX_CASE_TIMEOUT_S:
            raise InvalidRequest(f"test_cases[{i}].timeout must be more than 0 and at most "
                                 f"{MAX_CASE_TIMEOUT_S:g} seconds.")
        top = memory_cap_mb or 1 << 20
        if not MIN_MEMORY_MB <= case.memory_mb <= top:
            raise InvalidRequest(f"test_cases[{i}].memory_mb must be between {MIN_MEMORY_MB} "
                                 f"and {top} (the session's memory cap).")


def deadline(build_timeout: float, cases: list[TestCase]) -> float:
    """The run's one deadline: the build's timeout plus every case's wall-clock guard."""
    return build_timeout + sum(c.timeout * 3 + 1.5 for c in cases)


def plan(language: Language, code: str, cases: list[TestCase], env: dict[str, str],
         output_limit: int) -> tuple[str, str]:
    """The runner's input line and the tag its records carry."""
    tag = secrets.token_hex(8)
    kept = max(MIN_KEPT, output_limit // (2 * max(len(cases), 1)))
    body = {"language": language.name, "code": code, "tag": tag, "output_kept": kept,
            "env": env, "cases": [asdict(c) for c in cases]}
    return json.dumps(body, ensure_ascii=False), tag


def program(target: Callable[[], Awaitable[Liveness]], tag: str, judged: Judged) -> Program:
    """The run's program: start the runner on ``target`` and read its records."""
    prefix = f"KBJ {tag} "

    async def judge(run: Run) -> None:
        pending = ""

        def on_stream(name: str, text: str) -> None:
            nonlocal pending
            if name != "stdout":
                run.emit(["stderr", text])  # the runner's own trouble (a traceback)
                return
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.startswith(prefix):
                    _record(run, judged, json.loads(line[len(prefix):]))
                elif line:
                    run.emit(["stderr", line + "\n"])

        outcome = await run.step(await target(), RUNNER, allow_stdin=True, on_stream=on_stream)
        run.finish(outcome.exit_code(ExitRule.PROGRAM))

    return judge


def _record(run: Run, judged: Judged, rec: dict[str, Any]) -> None:
    kind = rec.pop("type", "")
    if kind == "build":
        judged.build = rec
        for stream in ("stdout", "stderr"):
            if rec.get(stream):
                run.emit([stream, rec[stream]])
        run.notify("status", {"status": "build-finished", "exit_code": rec.get("exit_code"),
                              "cached": rec.get("cached", False)})
    elif kind == "case":
        index = rec.pop("index", len(judged.results))
        judged.results.append(rec)
        run.notify("status", {"status": "case-finished", "case": index,
                              "result": rec.get("status"), "time_ms": rec.get("time_ms"),
                              "memory_kb": rec.get("memory_kb"),
                              "exit_code": rec.get("exit_code")})
    elif kind == "done":
        judged.compiles = int(rec.get("compiles", 0))
        run.notify("status", {"status": "judged", "compiles": judged.compiles})
