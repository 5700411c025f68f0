"""Jupyter output messages → Backend.AI-style console items.

``["stdout", s]`` / ``["stderr", s]`` (adjacent items of one stream merged), ``["media", [mime,
data]]`` with images as ``data:`` URIs and SVG as text, ``["html", s]``. Tracebacks go to stderr
without ANSI escapes.
"""

from __future__ import annotations

import re
from typing import Any

ConsoleItem = list[Any]  # [kind, value]; a list because that is what goes on the wire

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_TEXT_MEDIA = ("image/svg+xml", "application/json", "text/markdown", "text/latex")
_BINARY_MEDIA = ("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf")


# A traceback entry (one frame) inside the kernel's own machinery: ipykernel answering input()
# with end-of-file raises from its internals. Those frames tell the user nothing and show host
# paths, so they are dropped; the user's own frames stay.
_KERNEL_FRAME = re.compile(
    r"^File [^\n]*/(?:site|dist)-packages/(?:ipykernel|IPython|jupyter_client|comm)/[^\n]*\.py:")
_EOF_TEXT = "EOF when reading a line (no more input: send it as stdin)"


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _traceback(content: dict[str, Any]) -> str:
    entries = [strip_ansi(line) for line in content.get("traceback") or []]
    entries = [e for e in entries if not _KERNEL_FRAME.match(e.lstrip())]
    if content.get("ename") == "EOFError" and not content.get("evalue") and entries \
            and entries[-1].rstrip() == "EOFError:":
        entries[-1] = f"EOFError: {_EOF_TEXT}"
    return "\n".join(entries)


def from_message(msg_type: str, content: dict[str, Any]) -> list[ConsoleItem]:
    """The console items one iopub message contributes (none for status, input echo, …)."""
    if msg_type == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        return [[name, str(content.get("text", ""))]]
    if msg_type == "error":
        tb = content.get("traceback") or []
        text = _traceback(content) if tb else (
            f"{content.get('ename', 'Error')}: {content.get('evalue', '')}")
        if content.get("ename") == "ExitCode" and not tb:
            return []  # a process kernel's non-zero exit: the exit code says it, not the console
        return [["stderr", text if text.endswith("\n") else text + "\n"]]
    if msg_type in ("execute_result", "display_data", "update_display_data"):
        return _from_bundle(content.get("data") or {})
    return []


def _from_bundle(data: dict[str, Any]) -> list[ConsoleItem]:
    for mime in _BINARY_MEDIA:
        if mime in data:
            payload = str(data[mime]).replace("\n", "")
            return [["media", [mime, f"data:{mime};base64,{payload}"]]]
    for mime in _TEXT_MEDIA:
        if mime in data:
            return [["media", [mime, str(data[mime])]]]
    if "text/html" in data:
        return [["html", str(data["text/html"])]]
    if "text/plain" in data:
        text = strip_ansi(str(data["text/plain"]))
        return [["stdout", text + "\n"]]
    return []


def merge(items: list[ConsoleItem]) -> list[ConsoleItem]:
    """Merge adjacent stdout/stderr items, keeping the interleaving order."""
    out: list[ConsoleItem] = []
    for kind, value in items:
        if out and kind in ("stdout", "stderr") and out[-1][0] == kind:
            out[-1] = [kind, out[-1][1] + value]
        else:
            out.append([kind, value])
    return out
