"""Abort only the cells queued *before* a failed cell's reply (``stop_on_error``).

Jupyter's contract: when a cell fails and its request had ``stop_on_error``
(the default), the execute requests already queued behind it are aborted, and
a request the client sends after it has seen the error reply runs normally.

ipykernel 7 gets the order wrong: it sends the ``execute_reply`` first and only
then sets its "aborting" flag and asks the shell-channel thread to queue the
marker that ends the abort window.  A client that answers the reply quickly
(interrupt a cell, then run the next one) can have its new request forwarded
ahead of that marker, and the new cell comes back ``aborted`` with no output
(ipykernel issue 609 describes the same window).  Here the window is closed
*before* the reply goes out: ``finish_metadata`` runs just before the reply is
sent, so it queues the marker there and waits until the shell-channel thread has
done so; ipykernel's own ``_abort_queues`` after the reply is then skipped.

Only ipykernel's shell-channel-thread design (7.x) needs this; with older
versions the base behaviour is kept.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from ipykernel.kernelbase import Kernel

# How long the shell thread waits for the shell-channel thread to queue the
# marker; it only has to run one callback, so this is never reached in practice.
_MARKER_TIMEOUT_SECONDS: Final = 5.0


class AbortBeforeReply(Kernel):
    """Mixin for kernels: end the stop_on_error abort window before the reply is sent."""

    _abort_window_closed = False

    def finish_metadata(
        self, parent: dict[str, Any], metadata: dict[str, Any], reply_content: dict[str, Any]
    ) -> dict[str, Any]:
        metadata = super().finish_metadata(parent, metadata, reply_content)  # type: ignore[no-untyped-call]
        content = parent.get("content", {})
        if (
            reply_content.get("status") == "error"
            and content.get("stop_on_error", True)
            and not content.get("silent", False)
        ):
            self._abort_window_closed = self._queue_abort_marker(
                parent.get("header", {}).get("subshell_id")
            )
        return metadata

    def _queue_abort_marker(self, subshell_id: str | None) -> bool:
        """Abort what is queued now, up to a marker queued now; False if not possible here."""
        channel = getattr(self, "shell_channel_thread", None)
        post = getattr(self, "_post_dummy_stop_aborting_message", None)
        if not channel or post is None:
            return False
        if subshell_id is None:
            self._aborting = True
        else:
            channel.manager.set_subshell_aborting(subshell_id, True)
        posted = threading.Event()

        def post_marker() -> None:
            try:
                post(subshell_id)
            finally:
                posted.set()

        channel.io_loop.add_callback(post_marker)
        posted.wait(_MARKER_TIMEOUT_SECONDS)
        return True

    def _abort_queues(self, subshell_id: str | None = None) -> None:
        if self._abort_window_closed:
            self._abort_window_closed = False  # done before the reply went out
            return
        super()._abort_queues(subshell_id)
