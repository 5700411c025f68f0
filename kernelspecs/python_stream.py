"""ipykernel's stdout/stderr, sent in pieces a kernel-bridge server accepts.

ipykernel sends everything a cell printed between two flushes as one ``stream`` message, so one
``print`` of 100 MB is one 100 MB message. The server refuses any kernel message over its size
cap (bridge/wire.py: it resets the connection rather than allocate it), which would lose that
output whole. Sent in pieces of ``CHUNK`` characters it arrives, and the run keeps what fits its
output limit, as before the cap existed. (Kernel side: imports neither ``api`` nor ``bridge``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ipykernel.iostream import OutStream

# At most 4 bytes a character in UTF-8, 6 once JSON-escaped: 6 MiB, well under the 16 MiB cap.
CHUNK = 1 << 20


class ChunkedOutStream(OutStream):
    def _flush_buffers(self) -> Iterator[tuple[Any, str]]:  # ipykernel 7; 6 sends whole
        for parent, data in super()._flush_buffers():  # type: ignore[no-untyped-call]
            for start in range(0, len(data), CHUNK):
                yield parent, data[start:start + CHUNK]
