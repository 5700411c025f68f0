"""Compiled-language kernel (specs ``kb-c``, ``kb-cpp``, ``kb-go``, ``kb-rust``, ``kb-java``).

One module for all five; ``--language {c,cpp,go,rust,java}`` picks the
toolchain.  Each cell is a whole program: it is compiled in a build directory
of the working dir's build cache (:mod:`kernelspecs.buildcache`; compiler
output goes to stderr and a failure ends the cell with the compiler's exit
status), then run with the kernel's cwd as working directory, its stdout and
stderr streamed apart.  A cell whose source was built before (same code, same
toolchain) runs that build again without compiling.

Besides the common ``exit_code`` the ``execute_reply`` says which step ended
the cell (``"stage": "compile" | "run"``), whether the build came from the
cache (``"cached"``), and the compiler's output stream by stream
(``"compile_stdout"``, ``"compile_stderr"``; empty for a cached build).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, ClassVar, Final

from ._kernel import ProcessKernel, launch
from ._subproc import RunResult, StreamName
from .buildcache import build_key, default_cache
from .toolchains import TOOLCHAINS, Toolchain, java_main_class

__all__ = ["TOOLCHAINS", "CompiledKernel", "Toolchain", "java_main_class", "main"]

# Compiler output kept apart per stream in the reply (it is shown in full on stderr).
COMPILE_OUTPUT_KEPT: Final = 256 * 1024


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
        cache = default_cache()
        key = build_key(chain.language, chain.compile, src, code)
        build_dir = cache.lookup(key)
        self.reply_extra.update(stage="compile", cached=build_dir is not None,
                                compile_stdout="", compile_stderr="")
        if build_dir is None:
            scratch = cache.scratch()
            built = await self._compile(code, src, scratch, env)
            if built.exit_code != 0 or built.interrupted:
                cache.discard(scratch)
                return built
            build_dir = cache.publish(key, scratch)
        self.reply_extra["stage"] = "run"
        run_script = chain.run.format(
            dir=shlex.quote(str(build_dir)), name=shlex.quote(Path(src).stem)
        )
        return await self.run_command(run_script, cwd=os.getcwd(), env=env)

    async def _compile(
        self, code: str, src: str, build_dir: Path, env: dict[str, str]
    ) -> RunResult:
        """Compile into ``build_dir``; compiler output is shown on stderr (as it always was)
        and also kept apart, stream by stream, in the reply (``compile_stdout``/``_stderr``)."""
        (build_dir / src).write_text(code)
        kept: dict[StreamName, list[str]] = {"stdout": [], "stderr": []}
        room: dict[StreamName, int] = {"stdout": COMPILE_OUTPUT_KEPT,
                                       "stderr": COMPILE_OUTPUT_KEPT}

        def capture(name: StreamName, text: str) -> None:
            # Compiler chatter belongs on stderr, whichever stream it used.
            self.write("stderr", text)
            if room[name] > 0:
                kept[name].append(text[: room[name]])
                room[name] -= len(text)

        script = self.toolchain.compile.format(src=shlex.quote(src))
        built = await self.run_command(
            script, cwd=str(build_dir), env=env, stdin=False, on_output=capture
        )
        self.reply_extra["compile_stdout"] = "".join(kept["stdout"])
        self.reply_extra["compile_stderr"] = "".join(kept["stderr"])
        return built


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
