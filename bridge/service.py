"""The core assembled: one object the HTTP layer (or an embedded caller) starts and stops."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from typing import Any

from .errors import InvalidRequest, NotFound
from .kernels import Kernel, launch, spec_manager
from .keypairs import Keypair, Keypairs
from .runs import Run
from .sandbox import Confinement, Mount, Sandbox
from .sessions import Session, Sessions
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class Started:
    first_keypair: Keypair | None  # created on an empty data dir, to be shown once


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sandbox = Sandbox(settings.sandbox)  # raises SandboxUnavailable
        self.store = Store(settings.db_path)
        self.keypairs = Keypairs(self.store, settings.default_concurrency)
        self.kernelspecs = spec_manager()
        self.sessions = Sessions(settings, self.store, self.keypairs, self.start_kernel)

    async def start_kernel(self, spec: str, confinement: Confinement) -> Kernel:
        """The one launch function: every kernel of every dialect starts here."""
        return await launch(spec, confinement, self.sandbox, self.kernelspecs,
                            self.settings.kernel_start_timeout)

    async def mounts_for(self, access_key: str, specs: list[str]) -> tuple[Mount, ...]:
        """Resolve ``name`` / ``name:alias`` mount specs to this keypair's folders.

        Raises NotFound for a folder the keypair cannot see.
        """
        if not specs:
            return ()
        raise NotFound(f"No virtual folder {specs[0].split(':')[0]!r} for this keypair.")

    def batch_run(self, session: Session, options: dict[str, Any], run_id: str | None) -> Run:
        """A batch run (clean → build → exec) for ``session``."""
        raise InvalidRequest("Batch mode is not available yet.")

    async def start(self) -> Started:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The data dir holds HMAC secrets and every session's files: owner only.
        os.chmod(self.settings.data_dir, 0o700)
        self.settings.sessions_dir.mkdir(exist_ok=True)
        self.settings.folders_dir.mkdir(exist_ok=True)
        await self.store.open()
        await self.keypairs.load()
        first = None
        if not self.keypairs.all():
            first = await self.keypairs.create()
        await self.sessions.start()
        return Started(first_keypair=first)

    async def stop(self) -> None:
        await self.sessions.stop()
        await self.store.close()
