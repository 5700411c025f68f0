"""The language table: the single place that knows languages.

Each entry names the kernelspec that runs it, the aliases clients use for it (Backend.AI images
such as ``lablup/python:3.9`` or ``python:3.6-ubuntu18.04`` reduce to their base name), the
toolchain binaries that must exist, and the batch-mode defaults used for ``"*"``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UnknownLanguage


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
    version_cmd: tuple[str, ...] = ()
    # How one execution gets its own environment variables (and stdin, where the kernel's stdin
    # is not a real stream) in a kernel that keeps state: a key of _EXECUTION_SCRIPTS, or "" when
    # the kernel cannot take them per execution and must be started with them.
    per_execution: str = ""

    @property
    def available(self) -> bool:
        return all(shutil.which(tool) for tool in self.toolchain)


# A Makefile in the working dir wins over the build defaults (seed 002, Backend.AI runners).
_MAKE_FIRST = 'if [ -f Makefile ]; then make; else {}; fi'


def _sources(tests: str) -> str:
    # NUL-separated into an array: names with spaces survive, and hidden dirs (.git, caches)
    # are pruned. `find A -o B -print` would bind the action to B only, hence the parentheses.
    return f"mapfile -d '' srcs < <(find . -path './.*' -prune -o -type f \\( {tests} \\) -print0)"


LANGUAGES: tuple[Language, ...] = (
    Language(
        "python", "kb-python", ".py", ("python3",), ("python3", "py", "ipython"),
        build="if [ -f setup.py ] || [ -f pyproject.toml ]; then pip install --user -e .; fi",
        exec="python3 main.py", per_execution="python",
    ),
    Language(
        "javascript", "kb-javascript", ".js", ("node",), ("js", "node", "nodejs"),
        exec="node main.js", per_execution="javascript",
    ),
    Language(
        "c", "kb-c", ".c", ("gcc",), ("gcc",),
        build=_MAKE_FIRST.format(_sources("-name '*.c'") + ' && gcc -Wall -o ./main'
                                 ' "${srcs[@]}" -pthread -lm -lrt -ldl'),
        exec="./main",
        clean="if [ -f Makefile ]; then make clean; fi",
    ),
    Language(
        "cpp", "kb-cpp", ".cpp", ("g++",), ("c++", "cxx", "g++"),
        build=_MAKE_FIRST.format(_sources("-name '*.cpp' -o -name '*.cc' -o -name '*.cxx'")
                                 + ' && g++ -Wall -std=c++17 -o ./main "${srcs[@]}"'
                                 ' -pthread -lm -lrt -ldl'),
        exec="./main",
        clean="if [ -f Makefile ]; then make clean; fi",
    ),
    Language(
        "go", "kb-go", ".go", ("go",), ("golang",),
        build=_MAKE_FIRST.format("GO111MODULE=off go build -o ./main $(ls *.go)"),
        exec="./main",
    ),
    Language(
        "rust", "kb-rust", ".rs", ("rustc",), ("rs",),
        build=_MAKE_FIRST.format(
            "if [ -f Cargo.toml ]; then cargo build --offline; else rustc -o ./main main.rs; fi"),
        exec="if [ -f Cargo.toml ]; then cargo run --offline -q; else ./main; fi",
    ),
    Language(
        "java", "kb-java", ".java", ("javac", "java"), (),
        build=_MAKE_FIRST.format("javac -d . $(find . -name '*.java' -not -path './.*')"),
        exec="if [ -f main/Main.class ]; then java main.Main; else java Main; fi",
    ),
    Language(
        "ruby", "kb-ruby", ".rb", ("ruby",), ("rb",),
        exec="ruby main.rb", per_execution="ruby",
    ),
    Language(
        "bash", "kb-bash", ".sh", ("bash",), ("sh", "shell"),
        exec="bash main.sh", per_execution="bash",
    ),
)

_BY_NAME: dict[str, Language] = {}
for _lang in LANGUAGES:
    for _key in (_lang.name, *_lang.aliases):
        _BY_NAME[_key] = _lang

BATCH_KERNELSPEC = "kb-bash"


def names() -> list[str]:
    return [lang.name for lang in LANGUAGES]


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


# -- one execution's environment -------------------------------------------------------------
# Each pair is code run before and after the user's code, in the same kernel, so variables set
# for one execution are gone for the next one in the same session. None of it prints anything
# (a REPL host shows no result for undefined/nil; Python statements have no value).

def _python(env: Mapping[str, str], stdin: str | None) -> tuple[str, str]:
    # Saved on the os/sys modules, not in the user's globals. input() is answered from the same
    # text by the run itself (input_request); sys.stdin gets it as a stream.
    before = ("def __kb_enter(env, stdin, os=__import__('os'), sys=__import__('sys'),"
              " io=__import__('io')):\n"
              "    os._kb_saved = {k: os.environ.get(k) for k in env}\n"
              "    os.environ.update(env)\n"
              "    if stdin is not None:\n"
              "        sys._kb_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)\n"
              f"__kb_enter({dict(env)!r}, {stdin!r})\n"
              "del __kb_enter\n")
    after = ("def __kb_leave(os=__import__('os'), sys=__import__('sys')):\n"
             "    for k, v in os.__dict__.pop('_kb_saved', {}).items():\n"
             "        if v is None:\n"
             "            os.environ.pop(k, None)\n"
             "        else:\n"
             "            os.environ[k] = v\n"
             "    if hasattr(sys, '_kb_stdin'):\n"
             "        sys.stdin = sys.__dict__.pop('_kb_stdin')\n"
             "__kb_leave()\n"
             "del __kb_leave\n")
    return before, after


def _javascript(env: Mapping[str, str], stdin: str | None) -> tuple[str, str]:
    keys = json.dumps(list(env))
    before = (f"globalThis.__kb_saved = Object.fromEntries({keys}.map(k => [k, process.env[k]]));"
              f" Object.assign(process.env, {json.dumps(dict(env), ensure_ascii=False)});"
              " undefined")
    after = ("for (const [k, v] of Object.entries(globalThis.__kb_saved || {}))"
             " { if (v === undefined) delete process.env[k]; else process.env[k] = v; }"
             " delete globalThis.__kb_saved; undefined")
    return before, after


def _ruby_str(text: str) -> str:
    # A JSON string is a Ruby double-quoted literal once "#" cannot start an interpolation.
    return json.dumps(text, ensure_ascii=False).replace("#", "\\#")


def _ruby(env: Mapping[str, str], stdin: str | None) -> tuple[str, str]:
    pairs = ", ".join(f"{_ruby_str(k)} => {_ruby_str(v)}" for k, v in env.items())
    before = (f"$__kb_saved = {{{pairs}}}.to_h {{ |k, v| [k, ENV[k]] }}; ENV.update({{{pairs}}});"
              " nil")
    if stdin is not None:
        before = (f"require 'stringio'; $__kb_stdin = $stdin;"
                  f" $stdin = StringIO.new({_ruby_str(stdin)}); {before}")
    after = ("($__kb_saved || {}).each { |k, v| ENV[k] = v }; $__kb_saved = nil;"
             " ($stdin = $__kb_stdin; $__kb_stdin = nil) if $__kb_stdin; nil")
    return before, after


def _bash(env: Mapping[str, str], stdin: str | None) -> tuple[str, str]:
    import shlex

    names = " ".join(env)
    # The kb-bash kernel keeps exported variables between cells; its private state dir
    # ($__kb_dir) holds what the names were before, restored (or unset) afterwards.
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    before = (f'declare -p {names} >"$__kb_dir/env.saved" 2>/dev/null; export {exports}; true')
    after = (f'unset {names}; . "$__kb_dir/env.saved" 2>/dev/null; rm -f "$__kb_dir/env.saved";'
             " true")
    return before, after


_EXECUTION_SCRIPTS = {"python": _python, "javascript": _javascript, "ruby": _ruby, "bash": _bash}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def execution_scripts(lang: Language, env: Mapping[str, str],
                      stdin: str | None) -> tuple[str, str] | None:
    """Code to run before and after one execution so ``env`` applies to it alone.

    ("", "") when there is nothing to do; None when this language's kernel can only get ``env``
    at its start. Raises InvalidRequest for a variable name no shell could hold.
    """
    from .errors import InvalidRequest

    for name in env:
        if not _ENV_NAME.match(name):
            raise InvalidRequest(f"Invalid environment variable name {name!r}.")
    # Python's sys.stdin and Ruby's $stdin are not the kernel's stdin: give them the text too.
    wants_stdin = stdin is not None and lang.per_execution in ("python", "ruby")
    if not env and not wants_stdin:
        return "", ""
    make = _EXECUTION_SCRIPTS.get(lang.per_execution)
    if make is None:
        return None
    return make(env, stdin if wants_stdin else None)
