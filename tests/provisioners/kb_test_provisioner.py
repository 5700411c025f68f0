"""A provisioner of an operator's own, for tests: jupyter_client's local provisioner that writes
down each launch (configured from its kernelspec: ``record_to``).

Registered by ``kb_test_provisioner-0.1.dist-info/entry_points.txt`` beside it: a process with
this directory on its PYTHONPATH finds it as an installed package would be found.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Unicode


class RecordingProvisioner(LocalProvisioner):
    record_to = Unicode("", config=True, help="A file each launch is appended to, as JSON.")

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        info = await super().launch_kernel(cmd, **kwargs)
        with open(self.record_to, "a") as f:
            f.write(json.dumps({"kernel_id": self.kernel_id, "pid": self.pid, "cmd": cmd}) + "\n")
        return info
