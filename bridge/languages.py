"""The language table: the single place that knows languages.

Each entry names the kernelspec that runs it, the aliases clients use for it (Backend.AI images
such as ``lablup/python:3.9`` or ``python:3.6-ubuntu18.04`` reduce to their base name), the
toolchain binaries that must exist, and the batch-mode defaults used for ``"*"``.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import sys
from dataclasses import dataclass

from .errors import LanguageUnavailable, UnknownLanguage


@dataclass(frozen=True)
class Language:
    name: str
    kernelspec: str
    suffix: str
    toolchain: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    build: str = ""  # the "*" build command ("" = nothing to build)
    exec: str = ""  # the "*" exec command
    clean: str = ""  # the "*" clean command: do-nothing by default (seed 002)
    version_cmd: tuple[str, ...] = ()  # prints the toolchain's version (see measure_versions)
    # How one execution gets its own environment variables (and stdin, where the kernel's stdin
    # is not a real stream) in a kernel that keeps state: a key of _EXECUTION_SCRIPTS, or "" when
    # the kernel cannot take them per execution and must be started with them.
    per_execution: str = ""

    @property
    def available(self) -> bool:
        """The one test of availability: every toolchain binary is on the server's PATH."""
        return not self.missing

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(tool for tool in self.toolchain if not shutil.which(tool))


# A Makefile in the working dir wins over the build defaults (seed 002, Backend.AI runners).
_MAKE_FIRST = 'if [ -f Makefile ]; then make; else {}; fi'


def _cached(command: str, inputs: str, outputs: str) -> str:
    # Skipped when the sources are those of the last successful build and its products are
    # untouched (kernelspecs/buildcache.py, run in the sandbox by the batch kernel).
    return (f"python3 -m kernelspecs.buildcache --inputs {inputs} --outputs {outputs}"
            f" -- {shlex.quote(command)}")


def _sources(tests: str) -> str:
    # NUL-separated into an array: names with spaces survive, and hidden dirs (.git, caches)
    # are pruned. `find A -o B -print` would bind the action to B only, hence the parentheses.
    return f"mapfile -d '' srcs < <(find . -path './.*' -prune -o -type f \\( {tests} \\) -print0)"


LANGUAGES: tuple[Language, ...] = (
    Language(
        "python", "kb-python", ".py", ("python3",), ("python3", "py", "ipython"),
        build="if [ -f setup.py ] || [ -f pyproject.toml ]; then pip install --user -e .; fi",
        exec="python3 main.py", per_execution="python", version_cmd=("python3", "--version"),
    ),
    Language(
        "javascript", "kb-javascript", ".js", ("node",), ("js", "node", "nodejs"),
        exec="node main.js", per_execution="javascript", version_cmd=("node", "--version"),
    ),
    Language(
        "c", "kb-c", ".c", ("gcc",), ("gcc",),
        build=_MAKE_FIRST.format(_cached(_sources("-name '*.c'") + ' && gcc -Wall -o ./main'
                                         ' "${srcs[@]}" -pthread -lm -lrt -ldl',
                                         "'*.c' '*.h'", "main")),
        exec="./main",
        clean="if [ -f Makefile ]; then make clean; fi", version_cmd=("gcc", "-dumpfullversion"),
    ),
    Language(
        "cpp", "kb-cpp", ".cpp", ("g++",), ("c++", "cxx", "g++"),
        build=_MAKE_FIRST.format(_cached(
            _sources("-name '*.cpp' -o -name '*.cc' -o -name '*.cxx'")
            + ' && g++ -Wall -std=c++17 -o ./main "${srcs[@]}" -pthread -lm -lrt -ldl',
            "'*.cpp' '*.cc' '*.cxx' '*.h' '*.hpp'", "main")),
        exec="./main",
        clean="if [ -f Makefile ]; then make clean; fi", version_cmd=("g++", "-dumpfullversion"),
    ),
    Language(
        "go", "kb-go", ".go", ("go",), ("golang",),
        build=_MAKE_FIRST.format(_cached("GO111MODULE=off go build -o ./main $(ls *.go)",
                                         "'*.go'", "main")),
        exec="./main", version_cmd=("go", "version"),
    ),
    Language(
        "rust", "kb-rust", ".rs", ("rustc",), ("rs",),
        build=_MAKE_FIRST.format(
            "if [ -f Cargo.toml ]; then cargo build --offline; else "
            + _cached("rustc -o ./main main.rs", "'*.rs'", "main") + "; fi"),
        exec="if [ -f Cargo.toml ]; then cargo run --offline -q; else ./main; fi",
        version_cmd=("rustc", "--version"),
    ),
    Language(
        "java", "kb-java", ".java", ("javac", "java"), (),
        build=_MAKE_FIRST.format(_cached("javac -d . $(find . -name '*.java' -not -path './.*')",
                                         "'*.java'", "'*.class'")),
        exec="if [ -f main/Main.class ]; then java main.Main; else java Main; fi",
        version_cmd=("javac", "-version"),
    ),
    Language(
        "ruby", "kb-ruby", ".rb", ("ruby",), ("rb",),
        exec="ruby main.rb", per_execution="ruby", version_cmd=("ruby", "--version"),
    ),
    Language(
        "bash", "kb-bash", ".sh", ("bash",), ("sh", "shell"),
        exec="bash main.sh", per_execution="bash", version_cmd=("bash", "--version"),
    ),
)

_BY_NAME: dict[str, Language] = {}
for _lang in LANGUAGES:
    for _key in (_lang.name, *_lang.aliases):
        _BY_NAME[_key] = _lang

BATCH_KERNELSPEC = "kb-bash"


def names() -> list[str]:
    return [lang.name for lang in LANGUAGES]


def available() -> list[Language]:
    """The languages this server can run now (their toolchains are installed)."""
    return [lang for lang in LANGUAGES if lang.available]


def require_available(lang: Language) -> Language:
    """``lang``, if this server can run it. Raises LanguageUnavailable (the one message)."""
    missing = lang.missing
    if missing:
        raise LanguageUnavailable(lang.name, missing)
    return lang


def resolve(name_or_image: str) -> Language:
    """Find a language by name, alias or Backend.AI image reference. Raises UnknownLanguage."""
    key = name_or_image.strip().lower()
    if key not in _BY_NAME:
        # "lablup/python:3.9", "python:3.6-ubuntu18.04", "index.docker.io/lablup/c:9" → base name
        key = re.split(r"[:@]", key.rsplit("/", 1)[-1], maxsplit=1)[0]
        key = re.sub(r"[-_.]?\d+(\.\d+)*$", "", key)  # python3.9 → python
    lang = _BY_NAME.get(key)
    if lang is None:
        raise UnknownLanguage(name_or_image, names())
    return lang


_VERSION = re.compile(r"\d+\.\d+(?:\.\d+)?")
VERSION_TIMEOUT_S = 10.0


async def _version(lang: Language) -> str:
    argv = list(lang.version_cmd)
    if lang.name == "python":
        argv[0] = sys.executable  # kernels run on the server's interpreter
    try:
        # Niced: asked while the server starts its first kernels, which should not wait on a JVM.
        proc = await asyncio.create_subprocess_exec(
            "nice", "-n", "19", *argv, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(VERSION_TIMEOUT_S):
            out, _ = await proc.communicate()
    except (OSError, TimeoutError):
        return "unknown"
    found = _VERSION.search(out.decode(errors="replace"))
    return found.group(0) if found else "unknown"


async def measure_versions() -> dict[str, str]:
    """Each available language's toolchain version ("3.11.7"), asking one toolchain at a time."""
    return {lang.name: await _version(lang) for lang in available() if lang.version_cmd}
