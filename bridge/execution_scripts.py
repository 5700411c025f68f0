"""Code run before and after one execution so its environment variables (and, where the
language reads it in-process, its stdin text) apply to that execution alone.

Each pair runs in the same kernel as the user's code, so variables set for one execution are gone
for the next one in the same session. None of it prints anything (a REPL host shows no result for
undefined/nil; Python statements have no value). Which generator a language uses is the language
table's ``per_execution`` field.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping

from .errors import InvalidRequest
from .languages import Language

PY_LITERAL_LINE = 4096


def _python_text(text: str | None) -> str:
    """A Python literal of ``text`` in lines of at most ~4 KiB. IPython tokenizes a cell line by
    line, and one 6 MB line cost it 1.4 GB (the kernel was OOM-killed by a 2M-line stdin)."""
    if text is None or len(text) <= PY_LITERAL_LINE:
        return repr(text)
    pieces = (repr(text[i:i + PY_LITERAL_LINE]) for i in range(0, len(text), PY_LITERAL_LINE))
    return "(\n" + "\n".join(pieces) + "\n)"


def _python(env: Mapping[str, str], stdin: str | None) -> tuple[str, str]:
    # Saved on the os/sys modules, not in the user's globals. input() is answered from the same
    # text by the run itself (input_request); sys.stdin gets it as a stream.
    before = ("def __kb_enter(env, stdin, os=__import__('os'), sys=__import__('sys'),"
              " io=__import__('io')):\n"
              "    os._kb_saved = {k: os.environ.get(k) for k in env}\n"
              "    os.environ.update(env)\n"
              "    if stdin is not None:\n"
              "        sys._kb_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)\n"
              f"__kb_enter({dict(env)!r}, {_python_text(stdin)})\n"
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
              f" Object.assign(process.env, {json.dumps(dict(env), ensure_ascii=False)});")
    after = ("for (const [k, v] of Object.entries(globalThis.__kb_saved || {}))"
             " { if (v === undefined) delete process.env[k]; else process.env[k] = v; }"
             " delete globalThis.__kb_saved;")
    if stdin is not None:
        # The Node host's own stdin is /dev/null. The two ways programs read all of stdin,
        # fs.readFileSync(0 | '/dev/stdin') and the process.stdin stream (readline, 'data'
        # events), are pointed at the text for this execution and restored afterwards.
        text = json.dumps(stdin, ensure_ascii=False)
        before += (
            " { const fs = require('fs'), { Readable } = require('stream');"
            " const text = " + text + ";"
            " globalThis.__kb_stdin = [fs.readFileSync,"
            " Object.getOwnPropertyDescriptor(process, 'stdin')];"
            " fs.readFileSync = function (p, ...rest) {"
            " if (p === 0 || p === '/dev/stdin') { const o = rest[0];"
            " const enc = typeof o === 'string' ? o : o && o.encoding;"
            " return enc ? text : Buffer.from(text); }"
            " return globalThis.__kb_stdin[0].call(this, p, ...rest); };"
            " Object.defineProperty(process, 'stdin', {configurable: true, enumerable: true,"
            " get: () => { const s = Readable.from([text]); Object.defineProperty(process,"
            " 'stdin', {value: s, configurable: true, enumerable: true}); return s; }}); }")
        after += (" if (globalThis.__kb_stdin) { require('fs').readFileSync ="
                  " globalThis.__kb_stdin[0];"
                  " Object.defineProperty(process, 'stdin', globalThis.__kb_stdin[1]);"
                  " delete globalThis.__kb_stdin; }")
    return before + " undefined", after + " undefined"


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
    for name in env:
        if not _ENV_NAME.match(name):
            raise InvalidRequest(f"Invalid environment variable name {name!r}.")
    # Python's sys.stdin, Ruby's $stdin and Node's process.stdin read in-process, not from the
    # kernel's stdin: give them the text too.
    wants_stdin = stdin is not None and lang.per_execution in ("python", "ruby", "javascript")
    if not env and not wants_stdin:
        return "", ""
    make = _EXECUTION_SCRIPTS.get(lang.per_execution)
    if make is None:
        return None
    return make(env, stdin if wants_stdin else None)
