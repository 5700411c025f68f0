"""Compiled-language kernel (specs ``kb-c``, ``kb-cpp``, ``kb-go``, ``kb-rust``, ``kb-java``).

One module for all five; ``--language {c,cpp,go,rust,java}`` picks the
toolchain.  Each cell is a whole program: it is written to a private build
directory under ``$TMPDIR``, compiled there (compiler output goes to stderr and
a failure ends the cell with the compiler's exit status), then run with the
kernel's cwd as working directory, its stdout and stderr streamed apart.

Besides the common ``exit_code`` the ``execute_reply`` says which step ended
the cell: ``"stage": "compile" | "run"``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

from ._kernel import ProcessKernel, launch
from ._subproc import RunResult

# C stdio buffers stdout fully on a pipe, so a prompt printed before scanf
# without fflush would sit in the buffer while the program waits for input.
# stdbuf (coreutils) preloads a shim that makes stdout/stderr unbuffered; where
# it is missing the program still runs, its prompts merely show up late.
_UNBUFFERED: Final = "stdbuf -o0 -e0 " if shutil.which("stdbuf") else ""
# JVM start-up dominates a small program's run time; these halve it.
_JVM_FAST: Final = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto"

_JAVA_PUBLIC = re.compile(
    r"^\s*public\s+(?:(?:final|abstract|sealed|strictfp)\s+)*"
    r"(?:class|interface|enum|record)\s+([A-Za-z_$][\w$]*)",
    re.MULTILINE,
)
_JAVA_TYPE = re.compile(r"\b(?:class|interface|enum|record)\s+([A-Za-z_$][\w$]*)")
_JAVA_MAIN = re.compile(r"\bstatic\s+(?:final\s+)?void\s+main\s*\(")


def java_main_class(code: str) -> str:
    """The class to run: the public one, else the last declared before ``main``."""
    public = _JAVA_PUBLIC.search(code)
    if public:
        return public.group(1)
    main = _JAVA_MAIN.search(code)
    end = main.start() if main else len(code)
    declared = _JAVA_TYPE.findall(code[:end])
    return declared[-1] if declared else "Main"


@dataclass(frozen=True)
class Toolchain:
    """How to build and run one language; commands are bash with {placeholders}."""

    language: str
    binary: str  # must be on PATH for the kernel to work
    source: Callable[[str], str]  # cell code -> source file name
    compile: str  # runs in the build dir; {src} is the source file name
    run: str  # runs in the cwd; {dir} is the build dir, {name} the source stem
    language_info: dict[str, Any]
    env: Callable[[], dict[str, str]] = field(default=dict)


def _go_env() -> dict[str, str]:
    # No network, no module lookups: a cell is a stand-alone main package.
    env = {"GO111MODULE": "off", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GOFLAGS": ""}
    home = os.environ.get("HOME", "")
    if not (home and os.access(home, os.W_OK)):
        # `go build` refuses to run without a cache dir, and $HOME may be
        # read-only in a sandbox.
        base = Path(tempfile.gettempdir()) / f"kb-go-{os.getuid()}"
        for var, sub in (("GOCACHE", "cache"), ("GOPATH", "path")):
            if var not in os.environ:
                env[var] = str(base / sub)
    return env


TOOLCHAINS: Final[dict[str, Toolchain]] = {
    "c": Toolchain(
        language="c",
        binary="gcc",
        source=lambda _: "prog.c",
        compile="gcc -Wall -o main {src} -pthread -lm -lrt -ldl",
        run=f"exec {_UNBUFFERED}{{dir}}/main",
        language_info={
            "name": "c",
            "mimetype": "text/x-csrc",
            "file_extension": ".c",
            "codemirror_mode": "text/x-csrc",
            "pygments_lexer": "c",
        },
    ),
    "cpp": Toolchain(
        language="cpp",
        binary="g++",
        source=lambda _: "prog.cpp",
        compile="g++ -Wall -std=c++17 -o main {src} -pthread -lm -lrt -ldl",
        run=f"exec {_UNBUFFERED}{{dir}}/main",
        language_info={
            "name": "c++",
            "mimetype": "text/x-c++src",
            "file_extension": ".cpp",
            "codemirror_mode": "text/x-c++src",
            "pygments_lexer": "cpp",
        },
    ),
    "go": Toolchain(
        language="go",
        binary="go",
        source=lambda _: "main.go",
        compile="go build -o main {src}",
        run="exec {dir}/main",
        language_info={
            "name": "go",
            "mimetype": "text/x-go",
            "file_extension": ".go",
            "codemirror_mode": "go",
            "pygments_lexer": "go",
        },
        env=_go_env,
    ),
    "rust": Toolchain(
        language="rust",
        binary="rustc",
        source=lambda _: "main.rs",
        # Default optimisation: a cell should compile fast, not run fast.
        compile="rustc --edition 2021 -o main {src}",
        run="exec {dir}/main",
        language_info={
            "name": "rust",
            "mimetype": "text/x-rustsrc",
            "file_extension": ".rs",
            "codemirror_mode": "rust",
            "pygments_lexer": "rust",
        },
    ),
    "java": Toolchain(
        language="java",
        binary="javac",
        source=lambda code: java_main_class(code) + ".java",
        compile="javac " + " ".join(f"-J{flag}" for flag in _JVM_FAST.split()) + " -d . {src}",
        run=f"exec java {_JVM_FAST} -cp {{dir}} {{name}}",
        language_info={
            "name": "java",
            "mimetype": "text/x-java",
            "file_extension": ".java",
            "codemirror_mode": "text/x-java",
            "pygments_lexer": "java",
        },
    ),
}


class CompiledKernel(ProcessKernel):
    toolchain: ClassVar[Toolchain] = TOOLCHAINS["c"]  # set by main() before launch

    @property
    def language_info(self) -> dict[str, Any]:  # type: ignore[override]
        return self.toolchain.language_info

    @property
    def banner(self) -> str:  # type: ignore[override]
        return f"kernel-bridge {self.toolchain.language} kernel"

    async def run_cell(self, code: str) -> RunResult:
        chain = self.toolchain
        env = self.child_env(chain.env())
        src = chain.source(code)
        build_dir = Path(tempfile.mkdtemp(prefix=f"kb-{chain.language}-"))
        try:
            (build_dir / src).write_text(code)
            self.reply_extra["stage"] = "compile"
            # Compiler chatter belongs on stderr, whichever stream it used.
            compile_script = "exec 1>&2; " + chain.compile.format(src=shlex.quote(src))
            built = await self.run_command(compile_script, cwd=str(build_dir), env=env, stdin=False)
            if built.exit_code != 0 or built.interrupted:
                return built
            self.reply_extra["stage"] = "run"
            run_script = chain.run.format(
                dir=shlex.quote(str(build_dir)), name=shlex.quote(Path(src).stem)
            )
            return await self.run_command(run_script, cwd=os.getcwd(), env=env)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--language", choices=sorted(TOOLCHAINS), required=True)
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # A class attribute, not a traitlet: the kernel class is instantiated by
    # IPKernelApp, and the language is fixed for the life of the process.
    CompiledKernel.toolchain = TOOLCHAINS[ours.language]
    launch(CompiledKernel, rest)


if __name__ == "__main__":
    main()
