"""Waiting for a new kernel to answer, without jupyter_client's fixed costs.

``KernelClient.wait_for_ready`` ends with a 0.2 s "flush" of iopub on every start, and restarts
its loop with another 0.2 s wait when the first iopub message raced the subscription. For a
forked kernel that starts in ~50 ms of CPU this was most of the start (issue 14). Here: a
``kernel_info`` answered on shell, and one iopub message (ipykernel's ``iopub_welcome`` or the
status of that request) proving the subscription is live. Messages left on iopub have no
request of ours as parent; the channel pump drops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from queue import Empty
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

IOPUB_PROOF_S = 0.2
SHELL_POLL_S = 1.0


async def wait_ready(client: AsyncKernelClient, timeout: float, *,
                     control: bool = False) -> None:
    """Return once the kernel answered ``kernel_info`` and iopub is connected.

    ``control``: ask on the control channel, which a kernel answers while a cell runs (a kernel
    re-adopted mid-cell is ready for us long before its shell is).
    Raises RuntimeError if the kernel died or did not answer within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if control:
            msg = client.session.msg("kernel_info_request")
            client.control_channel.send(msg)
            reply = await _reply(client.get_control_msg, msg["header"]["msg_id"], deadline)
        else:
            reply = await _reply(client.get_shell_msg, client.kernel_info(), deadline)
        if reply is not None:
            try:
                await client.get_iopub_msg(timeout=IOPUB_PROOF_S)
            except Empty:
                pass
            else:
                client._handle_kernel_info_reply(reply)
                return
        if not await client._async_is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info")
        if loop.time() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:.0f} seconds")


async def _reply(get: Callable[..., Awaitable[dict[str, Any]]], msg_id: str,
                 deadline: float) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return None
        try:
            msg: dict[str, Any] = await get(timeout=min(SHELL_POLL_S, left))
        except Empty:
            return None
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            return msg
