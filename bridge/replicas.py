"""Replicas: who this server is in a cluster, who owns a session, and the cluster's trust.

Several servers (replicas) share one database and one storage root. Each has an id (new at
every start: a restarted replica is a new member, and what its previous life owned is adopted
like any dead replica's) and an internal URL other replicas reach it at. A session's kernels
live on the replica that started them; a request for that session reaching another replica is
forwarded to the owner (``api/forward.py`` does the HTTP).

The forwarding replica has already authenticated the client, so it tells the owner who the
client is in a header signed with the cluster secret, a random key kept in the shared database
(:func:`sign_identity`, :func:`verify_identity`). A client cannot make that header: it never
sees the secret, and the signature covers the method, the URI and the time, so a header seen on
one request is worthless for another route and stale after :data:`IDENTITY_MAX_AGE_S`.

Nothing here speaks HTTP; the owner lookup reads the store.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from .errors import AuthFailed
from .store import Store

log = logging.getLogger(__name__)

# A signed identity older (or newer) than this is refused: the forwarding replica signs it just
# before it sends the request, so this only needs to cover clock skew between hosts.
IDENTITY_MAX_AGE_S = 60.0
IDENTITY_VERSION = "v1"
# What a route names, for the owner lookup: a session by name or id (Backend.AI), a Jupyter
# kernel id, a Sandbox session_id, a job session, a job, an async execution.
OwnerKind = Literal["session", "kernel", "sandbox_session", "job_session", "job", "execution"]


class BadIdentity(AuthFailed):
    def __init__(self, why: str) -> None:
        super().__init__(f"Forwarded identity refused: {why}.")


@dataclass(frozen=True)
class Identity:
    """Who a forwarded request acts as, and which replica vouched for it."""

    replica: str
    access_key: str


def _mac(secret: str, replica: str, access_key: str, stamp: str, method: str, uri: str) -> str:
    text = "\n".join((IDENTITY_VERSION, replica, access_key, stamp, method.upper(), uri))
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign_identity(secret: str, replica: str, access_key: str, method: str, uri: str,
                  now: float | None = None) -> str:
    """The header value that tells an owner ``access_key`` sent ``method uri`` through
    ``replica``."""
    stamp = f"{now if now is not None else time.time():.3f}"
    sig = _mac(secret, replica, access_key, stamp, method, uri)
    return ";".join((IDENTITY_VERSION, replica, access_key, stamp, sig))


def verify_identity(secret: str | None, value: str, method: str, uri: str,
                    now: float | None = None) -> Identity:
    """The identity in a forwarded request's header. Raises BadIdentity (401)."""
    if not secret:
        raise BadIdentity("this server is not part of a cluster")
    parts = value.split(";")
    if len(parts) != 5 or parts[0] != IDENTITY_VERSION:
        raise BadIdentity("malformed header")
    _, replica, access_key, stamp, sig = parts
    try:
        when = float(stamp)
    except ValueError:
        raise BadIdentity("malformed timestamp") from None
    expected = _mac(secret, replica, access_key, stamp, method, uri)
    if not hmac.compare_digest(expected, sig):
        raise BadIdentity("bad signature")
    if abs((now if now is not None else time.time()) - when) > IDENTITY_MAX_AGE_S:
        raise BadIdentity("too old")
    return Identity(replica=replica, access_key=access_key)


class Replicas:
    """This replica's identity and the cluster's secret; later, leases and owners.

    ``advertise_url`` is how other replicas reach this one; it is known once the server has
    its port (:meth:`listening`).
    """

    def __init__(self, store: Store, advertise_url: str | None) -> None:
        self._store = store
        self.id = uuid.uuid4().hex[:16]
        self.advertise_url = advertise_url
        self.secret: str | None = None

    async def start(self) -> None:
        # The first replica to start makes the secret; the others (and restarts) read it.
        await self._store.execute(
            "INSERT INTO cluster (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            ("secret", secrets.token_urlsafe(32)))
        row = await self._store.fetchone("SELECT value FROM cluster WHERE name=?", ("secret",))
        assert row is not None  # written just above
        self.secret = str(row["value"])

    def listening(self, url: str) -> None:
        """The server listens at ``url``: the advertised URL unless the operator set one."""
        if self.advertise_url is None:
            self.advertise_url = url
        log.info("replica %s advertises %s", self.id, self.advertise_url)

    @property
    def clustered(self) -> bool:
        """Other replicas may share this store (not yet: the shared store is PostgreSQL)."""
        return False

    async def owner(self, kind: OwnerKind, access_key: str, ident: str) -> str | None:
        """The URL of the live replica that owns ``ident`` (of ``access_key``) when that is
        not this one; None when it is this one, nobody's, or there is no cluster."""
        if not self.clustered:
            return None
        return None

    def sign(self, access_key: str, method: str, uri: str) -> str:
        """A forwarded request's identity header. Raises RuntimeError before start()."""
        if self.secret is None:
            raise RuntimeError("Replicas.start() has not run")
        return sign_identity(self.secret, self.id, access_key, method, uri)

    def verify(self, value: str, method: str, uri: str) -> Identity:
        """Raises BadIdentity."""
        return verify_identity(self.secret, value, method, uri)
