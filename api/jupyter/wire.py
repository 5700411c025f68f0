"""The two WebSocket framings of Jupyter kernel messages.

Legacy (no subprotocol): a text frame holding the message as JSON with a ``channel`` key; a
message with binary buffers goes as a binary frame: a big-endian uint32 count n, n uint32 offsets
(the JSON first, then each buffer), then the parts.

``v1.kernel.websocket.jupyter.org``: one binary frame per message: a little-endian uint64 count n
of offsets, the n uint64 offsets, then the channel name, header, parent_header, metadata, content
(each JSON) and the buffers; the last offset is the frame's end.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from jupyter_client.jsonutil import json_default

from bridge.errors import InvalidRequest

from ..dialect import MalformedBody, check_encodable

V1 = "v1.kernel.websocket.jupyter.org"
_PARTS = ("header", "parent_header", "metadata", "content")


class BadFrame(InvalidRequest):
    pass


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=json_default, separators=(",", ":")).encode()


def _json_part(msg: dict[str, Any]) -> dict[str, Any]:
    body = {k: msg.get(k) or {} for k in _PARTS}
    body["msg_id"] = body["header"].get("msg_id")
    body["msg_type"] = body["header"].get("msg_type")
    return body


# -- legacy --------------------------------------------------------------------------------


def encode_legacy(channel: str, msg: dict[str, Any]) -> str | bytes:
    body = _json_part(msg)
    body["channel"] = channel
    buffers = [bytes(b) for b in msg.get("buffers") or []]
    if not buffers:
        return json.dumps(body, default=json_default)
    parts = [_dumps(body), *buffers]
    offsets, at = [], 4 * (1 + len(parts))
    for part in parts:
        offsets.append(at)
        at += len(part)
    return struct.pack(f">{1 + len(parts)}I", len(parts), *offsets) + b"".join(parts)


def decode_legacy(frame: str | bytes) -> tuple[str, dict[str, Any]]:
    """(channel, message). Raises BadFrame."""
    try:
        if isinstance(frame, str):
            msg = json.loads(frame)
            buffers: list[bytes] = []
        else:
            (n,) = struct.unpack_from(">I", frame)
            offsets = [*struct.unpack_from(f">{n}I", frame, 4), len(frame)]
            msg = json.loads(frame[offsets[0]:offsets[1]])
            buffers = [frame[offsets[i]:offsets[i + 1]] for i in range(1, n)]
    except (ValueError, struct.error) as exc:
        raise BadFrame(f"Not a Jupyter message frame: {exc}") from None
    if not isinstance(msg, dict):
        raise BadFrame("A message must be a JSON object.")
    _encodable(msg)
    msg["buffers"] = buffers
    return str(msg.pop("channel", "")), msg


# -- v1.kernel.websocket.jupyter.org -------------------------------------------------------


def encode_v1(channel: str, msg: dict[str, Any]) -> bytes:
    parts = [channel.encode(), *(_dumps(msg.get(k, {})) for k in _PARTS),
             *(bytes(b) for b in msg.get("buffers") or [])]
    count = len(parts) + 1
    offsets, at = [], 8 * (1 + count)
    for part in parts:
        offsets.append(at)
        at += len(part)
    offsets.append(at)
    return struct.pack(f"<{1 + count}Q", count, *offsets) + b"".join(parts)


def decode_v1(frame: bytes | str) -> tuple[str, dict[str, Any]]:
    """(channel, message). Raises BadFrame."""
    if isinstance(frame, str):
        raise BadFrame(f"The {V1} protocol sends binary frames only.")
    try:
        (count,) = struct.unpack_from("<Q", frame)
        if not 6 <= count <= 4096:
            raise ValueError(f"{count} offsets")
        offsets = struct.unpack_from(f"<{count}Q", frame, 8)
        chunks = [frame[offsets[i]:offsets[i + 1]] for i in range(count - 1)]
        channel = chunks[0].decode()
        msg: dict[str, Any] = {k: json.loads(c) for k, c in zip(_PARTS, chunks[1:5], strict=True)}
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise BadFrame(f"Not a {V1} frame: {exc}") from None
    _encodable(msg)
    msg["buffers"] = chunks[5:]
    return channel, msg


def _encodable(msg: dict[str, Any]) -> None:
    try:
        check_encodable(msg, "message")
    except MalformedBody as exc:
        raise BadFrame(exc.message) from None
