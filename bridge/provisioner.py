"""The jupyter_client kernel provisioner that starts every kernel inside the sandbox.

The core sets ``sandbox`` and ``confinement`` before ``start_kernel``; restarts reuse them and the
kernel's cgroup, so a restarted kernel is confined and capped like the first. What runs on the
host comes from :meth:`Sandbox.host_launch` alone; this class only hands it to jupyter_client.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from .cgroups import KernelCgroup
from .kernel_logs import StderrRelay
from .sandbox import Confinement, HostLaunch, Sandbox

log = logging.getLogger(__name__)


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner that launches the kernel command inside the sandbox."""

    sandbox: Sandbox
    confinement: Confinement
    cgroup: KernelCgroup | None = None
    stderr: StderrRelay | None = None
    _pending: HostLaunch | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        conf = self.confinement
        kwargs["env"] = self.sandbox.kernel_environ(conf)
        # Writes the connection file and applies the kernelspec's env substitutions.
        kwargs = await super().pre_launch(**kwargs)
        connection_file = getattr(self.parent, "connection_file", "")
        self.sandbox.hand_over(conf, Path(connection_file) if connection_file else None)
        # Fails closed: a kernel whose caps cannot be set does not start.
        if self.cgroup is None:
            self.cgroup = self.sandbox.new_cgroup(str(self.kernel_id), conf)
        else:  # a restart: same cgroup, CPU time goes on
            self.cgroup.ensure(conf.mem_bytes, conf.pids or self.sandbox.default_pids)
        self._close_pending()
        launch = self._pending = self.sandbox.host_launch(kwargs["cmd"], conf, kwargs["env"])
        kwargs.update(cmd=launch.argv, env=launch.env, executable=launch.executable,
                      pass_fds=tuple(launch.fds), cwd="/" if self.sandbox.enabled
                      else str(conf.workdir))
        kwargs["preexec_fn"] = self.sandbox.preexec(conf, self.cgroup)
        # A kernel's own stdout is banners ("To connect another client…"), not user output
        # (that travels on iopub); its stderr goes to the server's log for diagnosis, line by
        # line as records (bridge/kernel_logs.py), so a JSON log stays one object per line.
        kwargs["stdout"] = subprocess.DEVNULL
        if self.stderr is not None:  # a restart: the old process's pipe
            self.stderr.close()
        self.stderr = StderrRelay(str(self.kernel_id))
        kwargs["stderr"] = self.stderr.write_fd
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        try:
            return await super().launch_kernel(cmd, **kwargs)
        finally:  # the child has its copies (or there is no child)
            self._close_pending()
            if self.stderr is not None:
                self.stderr.launched()

    def _close_pending(self) -> None:
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    async def cleanup(self, restart: bool = False) -> None:
        self._close_pending()
        await super().cleanup(restart=restart)
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
        if restart:
            if self.cgroup is not None:  # leftovers must not eat the new kernel's caps
                self.cgroup.kill()
        else:
            await self.release_cgroup()

    async def release_cgroup(self) -> None:
        """Kill what is left in the kernel's cgroup and remove it (idempotent)."""
        cg, self.cgroup = self.cgroup, None
        if cg is None:
            return
        for _ in range(60):
            if cg.remove():
                return
            await asyncio.sleep(0.05)  # killed processes are reaped asynchronously
        log.warning("cgroup of kernel %s still busy; left behind", self.kernel_id)
