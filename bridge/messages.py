"""Typed Jupyter wire messages (only the fields the core reads)."""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class Header(TypedDict, total=False):
    msg_id: str
    msg_type: str
    session: str
    username: str
    date: Any
    version: str


class Message(TypedDict):
    header: Header
    parent_header: Header
    metadata: dict[str, Any]
    content: dict[str, Any]
    msg_type: str


Channel = Literal["shell", "iopub", "stdin", "control"]

OUTPUT_TYPES = frozenset({"stream", "error", "execute_result", "display_data",
                          "update_display_data"})
