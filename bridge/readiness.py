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
from queue import Empty
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

IOPUB_PROOF_S = 0.2
SHELL_POLL_S = 1.0


async def wait_ready(client: AsyncKernelClient, timeout: float) -> None:
    """Return once the kernel answered ``kernel_info`` and iopub is connected.

    Raises RuntimeError if the kernel died or did not answer within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg_id = client.kernel_info()
        reply = await _shell_reply(client, msg_id, deadline)
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


async def _shell_reply(client: AsyncKernelClient, msg_id: str,
                       deadline: float) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return None
        try:
            msg: dict[str, Any] = await client.get_shell_msg(timeout=min(SHELL_POLL_S, left))
        except Empty:
            return None
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            return msg
