"""The compiled languages' toolchains: how to compile a program and how to run it.

Shared by the compiled-language kernel and the judge runner (:mod:`kernelspecs.judge`); it
imports nothing heavy, so the runner starts fast.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# C stdio buffers stdout fully on a pipe, so a prompt printed before scanf
# without fflush would sit in the buffer while the program waits for input.
# stdbuf (coreutils) preloads a shim that makes stdout/stderr unbuffered; where
# it is missing the program still runs, its prompts merely show up late.
_UNBUFFERED: Final = "stdbuf -o0 -e0 " if shutil.which("stdbuf") else ""
# JVM start-up dominates a small program's run time; these halve it.
JVM_FAST: Final = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto"

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


def _info(name: str, mimetype: str, extension: str, codemirror: str, lexer: str) -> dict[str, str]:
    """A kernel's ``language_info`` (Jupyter's kernel_info_reply)."""
    return {"name": name, "mimetype": mimetype, "file_extension": extension,
            "codemirror_mode": codemirror, "pygments_lexer": lexer}


TOOLCHAINS: Final[dict[str, Toolchain]] = {
    "c": Toolchain(
        language="c",
        binary="gcc",
        source=lambda _: "prog.c",
        compile="gcc -Wall -o main {src} -pthread -lm -lrt -ldl",
        run=f"exec {_UNBUFFERED}{{dir}}/main",
        language_info=_info("c", "text/x-csrc", ".c", "text/x-csrc", "c"),
    ),
    "cpp": Toolchain(
        language="cpp",
        binary="g++",
        source=lambda _: "prog.cpp",
        compile="g++ -Wall -std=c++17 -o main {src} -pthread -lm -lrt -ldl",
        run=f"exec {_UNBUFFERED}{{dir}}/main",
        language_info=_info("c++", "text/x-c++src", ".cpp", "text/x-c++src", "cpp"),
    ),
    "go": Toolchain(
        language="go",
        binary="go",
        source=lambda _: "main.go",
        compile="go build -o main {src}",
        run="exec {dir}/main",
        language_info=_info("go", "text/x-go", ".go", "go", "go"),
        env=_go_env,
    ),
    "rust": Toolchain(
        language="rust",
        binary="rustc",
        source=lambda _: "main.rs",
        # Default optimisation: a cell should compile fast, not run fast.
        compile="rustc --edition 2021 -o main {src}",
        run="exec {dir}/main",
        language_info=_info("rust", "text/x-rustsrc", ".rs", "rust", "rust"),
    ),
    "java": Toolchain(
        language="java",
        binary="javac",
        source=lambda code: java_main_class(code) + ".java",
        compile="javac " + " ".join(f"-J{flag}" for flag in JVM_FAST.split()) + " -d . {src}",
        run=f"exec java {JVM_FAST} -cp {{dir}} {{name}}",
        language_info=_info("java", "text/x-java", ".java", "text/x-java", "java"),
    ),
}
