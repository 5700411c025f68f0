"""The Jupyter dialect's base handler."""

from __future__ import annotations

from bridge.session import Session

from ..base import BaseHandler
from .errors import JUPYTER


class JupyterHandler(BaseHandler):
    dialect = JUPYTER

    def kernel(self, kernel_id: str) -> Session:
        """The keypair's kernel (session) by id. Raises SessionNotFound."""
        s = self.bridge.gateway.get(self.keypair.access_key, kernel_id)
        self.session_id = s.id
        return s

    def set_default_headers(self) -> None:
        super().set_default_headers()
        # Jupyter Server never lets a proxy cache API answers; the gateway polls them.
        self.set_header("Cache-Control", "no-store")
