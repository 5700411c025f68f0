"""The judge runner: build a program once, run it once per test case, report each case.

Runs inside the session's sandbox (the server starts it from a bash kernel as
``python3 -m kernelspecs.judge``); it reads one JSON line, the plan, from
stdin::

    {"language", "code", "tag", "output_kept", "env",
     "cases": [{"stdin", "expected_output" | null, "timeout" (s), "memory_mb"}]}

and writes records, one JSON object per line prefixed ``KBJ <tag> ``, on
stdout (nothing else is written there):

* ``build``: ``{"exit_code", "signal", "stdout", "stderr", "cached", "ms"}``,
  once; compiled languages only;
* ``case``: one per case, in order, the fields of a test result;
* ``done``: ``{"compiles"}``: how many times the compiler ran (0 or 1).

Each case is a fresh process (its own process group) with its stdin,
stdout and stderr on pipes.  Limits, per case:

* time: the CPU time (user + system) of the case's process tree.  A watchdog
  samples ``/proc`` every few ms and SIGKILLs the group past the limit;
  RLIMIT_CPU is a backstop for a starved watchdog; a wall-clock guard ends a
  case that sleeps or blocks.  The time reported is from ``wait4``'s rusage
  (the process plus the children it reaped), not from the samples.
* memory: the peak resident size (``VmHWM``, summed over the tree), sampled
  the same way; past the limit the group is killed.  The peak reported is that,
  or ``ru_maxrss`` where it is larger: ``ru_maxrss`` catches the last spike
  before exit, but it also counts the runner's own memory the child had
  before its exec, so below that floor it says nothing and is not used.
  Address-space limits are not used: JVMs, Go and V8 reserve far more address
  space than they touch, and would fail to start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._stdin import blocked_on_stdin, pipe_identity
from .buildcache import build_key, default_cache
from .toolchains import JVM_FAST, TOOLCHAINS

TICK_S: Final = 0.004  # watchdog period: the overshoot of a limit is about one tick's worth
BUSY_S: Final = 0.02  # sampled without pause this long after the start
COMPARE_KEPT: Final = 16 * 1024 * 1024  # output kept per case for the comparison
COMPILE_KEPT: Final = 256 * 1024
DRAIN_S: Final = 0.2  # after the leader exits, time for the pipes to reach end-of-file
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_HZ: Final = os.sysconf("SC_CLK_TCK")

# How to run a built (or interpreted) program: argv from the build dir and the source name.
INTERPRETERS: Final = {
    "python": ("main.py", ["python3", "{dir}/main.py"]),
    "javascript": ("main.js", ["node", "{dir}/main.js"]),
    "ruby": ("main.rb", ["ruby", "{dir}/main.rb"]),
    "bash": ("main.sh", ["bash", "{dir}/main.sh"]),
}
COMPILED_ARGV: Final = {
    "c": ["{dir}/main"],
    "cpp": ["{dir}/main"],
    "go": ["{dir}/main"],
    "rust": ["{dir}/main"],
    "java": ["java", *JVM_FAST.split(), "-cp", "{dir}", "{name}"],
}


@dataclass
class Case:
    stdin: str
    expected_output: str | None
    timeout: float
    memory_mb: int


@dataclass
class Sample:
    """What the watchdog has seen of one case's process tree."""

    peak_rss: int = 0
    cpu_s: float = 0.0
    verdict: str = ""  # time_limit_exceeded / memory_limit_exceeded when the watchdog killed


@dataclass
class Outcome:
    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    time_ms: int
    memory_kb: int
    extra: dict[str, Any] = field(default_factory=dict)


def normalized(text: str) -> str:
    """Trailing whitespace of every line, and trailing empty lines, do not count."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            pids.append(int(entry))
    return pids


def _status_kb(pid: int | str, field_name: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _usage(pid: int) -> tuple[int, float]:
    """The peak resident bytes (VmHWM) and CPU seconds (its own and its reaped children's)
    of one live process; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0, 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    cpu = sum(int(x) for x in fields[11:15]) / _HZ  # utime, stime, cutime, cstime
    return _status_kb(pid, b"VmHWM:") * 1024, cpu


def _tree_usage(pgid: int, whole: bool) -> tuple[int, float]:
    """Summed over the group (``whole``), or the leader alone (cheap: no walk of /proc)."""
    peak, cpu = 0, 0.0
    for pid in _group(pgid) if whole else [pgid]:
        p, c = _usage(pid)
        peak, cpu = peak + p, cpu + c
    return peak, cpu


def _limit(pid: int, timeout: float) -> None:
    # Set from outside rather than in a preexec_fn, so the child can be spawned with vfork
    # (a forked copy of this runner would also inflate the child's ru_maxrss). The child
    # may run a few instructions unlimited first; the watchdog covers those.
    cpu = math.ceil(timeout) + 1
    try:
        resource.prlimit(pid, resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def run_case(argv: list[str], case: Case, env: dict[str, str]) -> Outcome:
    """One fresh process for one case, under the case's limits."""
    # ru_maxrss also counts the memory the child had before exec (this runner's: it is
    # spawned from us), so it says something only above that floor.
    floor_kb = _status_kb("self", b"VmHWM:")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    _limit(proc.pid, case.timeout)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    stdin_id = pipe_identity(in_fd)
    pending = memoryview(case.stdin.encode())
    # Generous: on a loaded machine a busy program gets a fraction of a core.
    wall_limit = case.timeout * 3 + 1.0
    mem_limit = case.memory_mb * 1024 * 1024
    seen = Sample()
    out: dict[int, bytearray] = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in (out_fd, err_fd, in_fd):
        os.set_blocking(fd, False)
    for fd in (out_fd, err_fd):
        sel.register(fd, selectors.EVENT_READ)
    feeding = False
    status_word, rusage, exited_at = 0, None, None
    while True:
        # The first moments are watched closely: a short program's whole life is a few ms.
        # Its input is held back until it waits for it (or BUSY_S passed), so at least one
        # sample sees it loaded before it can run to its end.
        busy = time.monotonic() - started < BUSY_S
        if rusage is None:
            peak, cpu = _tree_usage(proc.pid, whole=not busy)
            seen.peak_rss = max(seen.peak_rss, peak)
            seen.cpu_s = max(seen.cpu_s, cpu)
            if not seen.verdict:
                if seen.cpu_s > case.timeout or time.monotonic() - started > wall_limit:
                    seen.verdict = "time_limit_exceeded"
                elif seen.peak_rss > mem_limit:
                    seen.verdict = "memory_limit_exceeded"
                if seen.verdict:
                    _kill(proc.pid)
        if not feeding and (not busy or rusage is not None
                            or blocked_on_stdin(proc.pid, stdin_id)):
            feeding = True
            if pending:
                sel.register(in_fd, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        if sel.get_map():
            for key, _ in sel.select(0.0 if busy else TICK_S):
                fd = int(key.fd)
                if fd == in_fd:
                    pending = _feed(in_fd, pending)
                    if not pending:
                        sel.unregister(in_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                elif len(out[fd]) < COMPARE_KEPT:
                    out[fd] += chunk
        else:
            time.sleep(TICK_S)  # pipes closed, the program may still run: keep watching
        if rusage is None:
            pid, status_word, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rusage, exited_at = usage, time.monotonic()
                _kill(proc.pid)  # what the leader left behind goes with it
        if exited_at is not None and (not _reading(sel, in_fd)
                                      or time.monotonic() - exited_at > DRAIN_S):
            break
    sel.close()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()
    return _judge(case, seen, status_word, rusage, floor_kb, bytes(out[out_fd]),
                  bytes(out[err_fd]))


def _reading(sel: selectors.BaseSelector, in_fd: int) -> bool:
    return any(fd != in_fd for fd in sel.get_map())


def _feed(fd: int, pending: memoryview) -> memoryview:
    try:
        return pending[os.write(fd, pending[:65536]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        return pending[:0]  # the program closed its stdin: the rest is moot


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _judge(case: Case, seen: Sample, status_word: int, rusage: Any, floor_kb: int,
           stdout: bytes, stderr: bytes) -> Outcome:
    sig = os.WTERMSIG(status_word) if os.WIFSIGNALED(status_word) else None
    exit_code = os.WEXITSTATUS(status_word) if os.WIFEXITED(status_word) else 128 + (sig or 0)
    cpu_s = rusage.ru_utime + rusage.ru_stime
    peak_kb = seen.peak_rss // 1024
    if rusage.ru_maxrss > floor_kb:
        peak_kb = max(peak_kb, rusage.ru_maxrss)
    text, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    if seen.verdict:
        status = seen.verdict
    elif sig in (signal.SIGXCPU, signal.SIGKILL) and cpu_s >= case.timeout:
        status = "time_limit_exceeded"  # the RLIMIT_CPU backstop ended it
    elif peak_kb * 1024 > case.memory_mb * 1024 * 1024:
        status = "memory_limit_exceeded"  # a spike the watchdog did not catch in time
    elif sig is not None or exit_code != 0:
        status = "runtime_error"
    elif case.expected_output is None:
        status = "ok"
    elif normalized(text) == normalized(case.expected_output):
        status = "accepted"
    else:
        status = "wrong_answer"
    return Outcome(status, text, err, exit_code, sig, round(cpu_s * 1000), peak_kb)


class Judge:
    """Builds once, then runs each case; every record goes to ``emit``."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.language: str = plan["language"]
        self.code: str = plan["code"]
        self.tag: str = plan.get("tag", "")
        self.kept: int = int(plan.get("output_kept", 64 * 1024))
        self.cases = [Case(c.get("stdin") or "", c.get("expected_output"), float(c["timeout"]),
                           int(c["memory_mb"])) for c in plan["cases"]]
        self.env = {**os.environ, **(plan.get("env") or {})}

    def emit(self, kind: str, record: dict[str, Any]) -> None:
        sys.stdout.write(f"KBJ {self.tag} {json.dumps({'type': kind, **record})}\n")
        sys.stdout.flush()

    def build(self) -> tuple[list[str] | None, int]:
        """The argv to run each case with (None: the build failed), and compiles run."""
        if self.language in INTERPRETERS:
            name, argv = INTERPRETERS[self.language]
            where = Path(tempfile.mkdtemp(prefix="kb-judge-"))
            (where / name).write_text(self.code)
            return [a.format(dir=where) for a in argv], 0
        chain = TOOLCHAINS[self.language]
        self.env.update(chain.env())
        src = chain.source(self.code)
        cache = default_cache()
        key = build_key(chain.language, chain.compile, src, self.code)
        # {dir} stays a placeholder until the build dir is known
        argv = [a.format(dir="{dir}", name=Path(src).stem) for a in COMPILED_ARGV[self.language]]
        found = cache.lookup(key)
        if found is not None:
            self.emit("build", {"exit_code": 0, "signal": None, "stdout": "", "stderr": "",
                                "cached": True, "ms": 0})
            return [a.format(dir=found) for a in argv], 0
        scratch = cache.scratch()
        (scratch / src).write_text(self.code)
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", chain.compile.format(src=src)], cwd=scratch,
                              env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                              check=False)
        sig = -proc.returncode if proc.returncode < 0 else None
        self.emit("build", {
            "exit_code": 128 + sig if sig else proc.returncode, "signal": sig,
            "stdout": proc.stdout[:COMPILE_KEPT].decode(errors="replace"),
            "stderr": proc.stderr[:COMPILE_KEPT].decode(errors="replace"),
            "cached": False, "ms": round((time.monotonic() - started) * 1000)})
        if proc.returncode != 0:
            cache.discard(scratch)
            return None, 1
        where = cache.publish(key, scratch)
        return [a.format(dir=where) for a in argv], 1

    def run(self) -> None:
        argv, compiles = self.build()
        for index, case in enumerate(self.cases):
            if argv is None:
                self.emit("case", {"index": index, "status": "compile_error", "stdout": "",
                                   "stderr": "", "exit_code": None, "signal": None,
                                   "time_ms": 0, "memory_kb": 0})
                continue
            got = run_case(argv, case, self.env)
            self.emit("case", {"index": index, "status": got.status,
                               "stdout": got.stdout[: self.kept],
                               "stderr": got.stderr[: self.kept], "exit_code": got.exit_code,
                               "signal": got.signal, "time_ms": got.time_ms,
                               "memory_kb": got.memory_kb})
        self.emit("done", {"compiles": compiles})


def main() -> None:
    plan = json.loads(sys.stdin.readline())
    Judge(plan).run()


if __name__ == "__main__":
    main()
