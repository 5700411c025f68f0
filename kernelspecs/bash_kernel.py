"""Bash kernel (spec ``kb-bash``): each cell is one ``bash -c`` run in the cwd.

Unlike PyPI's bash_kernel (bash on a pty) stdout and stderr stay apart, the
cell's exact exit status is reported (``exit 3`` ends the cell, not the
kernel), a ``read`` becomes an ``input_request``, and an interrupt stops the
cell's whole process group.

Shell state survives between cells without a long-lived shell: an EXIT trap
dumps variables (``declare -p``), functions (``declare -f``), the exported
names and ``$PWD`` into a private state directory, and the next cell sources
that dump first.  Not kept: aliases, shell options, traps the cell sets, and
background jobs, which die with the cell's process group.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

from ._kernel import ProcessKernel, launch
from ._subproc import CommandRun, RunResult, StreamName

# Bash-managed or read-only variables that must not be restored by assignment.
_UNSAVED: Final = (
    "BASH*|EUID|PPID|UID|SHELLOPTS|FUNCNAME|GROUPS|PIPESTATUS|RANDOM|SRANDOM|SECONDS|"
    "LINENO|SHLVL|HISTCMD|EPOCHREALTIME|EPOCHSECONDS|_|__kb_*|PWD|OLDPWD|DIRSTACK|"
    "COMP_*|OPTIND|OPTARG|COLUMNS|LINES"
)

# Sourced at the start of every cell.  `set +eu` in the trap: a cell's
# `set -e`/`set -u` must not abort the dump and change the exit status.
_PRELUDE: Final = """\
[ -f "$__kb_dir/vars.sh" ] && . "$__kb_dir/vars.sh" 2>/dev/null
__kb_save() {
  __kb_rc=$?
  set +eu
  {
    compgen -v | while IFS= read -r __kb_n; do
      case $__kb_n in @UNSAVED@) continue ;; esac
      declare -p "$__kb_n" 2>/dev/null
    done
    declare -f
    printf 'cd -- %q 2>/dev/null\\n' "$PWD"
  } >"$__kb_dir/vars.new" && mv -f "$__kb_dir/vars.new" "$__kb_dir/vars.sh"
  compgen -e >"$__kb_dir/exported"
  printf '%s' "$PWD" >"$__kb_dir/cwd"
  exit "$__kb_rc"
}
trap __kb_save EXIT
""".replace("@UNSAVED@", _UNSAVED)

_WORD_BREAKS: Final = re.compile(r"[^\s;|&()<>`'\"=]*$")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _bash_version() -> str:
    try:
        out = subprocess.run(
            ["bash", "-c", "echo $BASH_VERSION"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


class BashKernel(ProcessKernel):
    language = "bash"
    banner = "kernel-bridge bash kernel"
    _version: Final = _bash_version()

    @property
    def language_info(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "name": "bash",
            "version": self._version,
            "mimetype": "text/x-sh",
            "file_extension": ".sh",
            "codemirror_mode": "shell",
            "pygments_lexer": "bash",
        }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_dir = Path(tempfile.mkdtemp(prefix="kb-bash-"))
        (self._state_dir / "prelude.sh").write_text(_PRELUDE)
        self._start_cwd = str(Path.cwd())

    def _cwd(self) -> str:
        saved = self._state_dir / "cwd"
        return saved.read_text() if saved.is_file() else self._start_cwd

    def _env(self) -> dict[str, str]:
        env = self.child_env({"__kb_dir": str(self._state_dir)})
        exported = self._state_dir / "exported"
        if exported.is_file():
            # Honour `unset` of inherited variables: keep only names the last
            # cell still exported (non-identifiers are invisible to bash).
            keep = set(exported.read_text().split()) | {"__kb_dir"}
            env = {k: v for k, v in env.items() if k in keep or not _IDENTIFIER.match(k)}
        return env

    def _script(self, code: str) -> str:
        # The cell starts on line 1 so bash's "line N" messages match the cell.
        return f". {shlex.quote(str(self._state_dir / 'prelude.sh'))}; {code}"

    async def run_cell(self, code: str) -> RunResult:
        return await self.run_command(self._script(code), cwd=self._start_cwd, env=self._env())

    async def _capture(self, script: str) -> str:
        chunks: list[str] = []

        def sink(name: StreamName, text: str) -> None:
            if name == "stdout":
                chunks.append(text)

        run = CommandRun(script, cwd=self._cwd(), env=self._env(), on_output=sink, ask_input=None)
        await run.run()
        return "".join(chunks)

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        text = code[:cursor_pos]
        match = _WORD_BREAKS.search(text)
        token = match.group(0) if match else ""
        start = cursor_pos - len(token)
        before = text[:start].rstrip()
        if token.startswith("$"):
            script = f"compgen -P '$' -v -- {shlex.quote(token[1:])}"
        elif (not before or before[-1] in ";|&(`{") and "/" not in token:
            script = f"compgen -c -- {shlex.quote(token)}"
        else:
            script = f"compgen -f -- {shlex.quote(token)}"
        vars_file = shlex.quote(str(self._state_dir / "vars.sh"))
        out = await self._capture(f"[ -f {vars_file} ] && . {vars_file} 2>/dev/null; {script}")
        matches = sorted(set(out.splitlines()))
        return {
            "matches": matches,
            "cursor_start": start,
            "cursor_end": cursor_pos,
            "metadata": {},
            "status": "ok",
        }

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        check = await self._capture(f'bash -n -c {shlex.quote(code)} 2>&1 >/dev/null; echo "rc=$?"')
        if check.rstrip().endswith("rc=0"):
            return {"status": "complete"}
        if "unexpected end of file" in check:
            return {"status": "incomplete", "indent": ""}
        return {"status": "invalid"}

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        reply = await super().do_shutdown(restart)
        shutil.rmtree(self._state_dir, ignore_errors=True)
        return reply


if __name__ == "__main__":
    launch(BashKernel)
