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

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from . import metrics
from .datadir import PRESENCE_PREFIX
from .errors import AuthFailed, RateLimited, StartupRefused, StoreUnavailable
from .store import Store

log = logging.getLogger(__name__)

# A signed identity older (or newer) than this is refused: the forwarding replica signs it just
# before it sends the request, so this only needs to cover clock skew between hosts.
IDENTITY_MAX_AGE_S = 60.0
IDENTITY_VERSION = "v1"
LIVE_CACHE_S = 1.0
# What a route names, for the owner lookup: a session by name or id (Backend.AI), a Jupyter
# kernel id, a Sandbox session_id, a job session, a job, an async execution.
OwnerKind = Literal["session", "kernel", "sandbox_session", "job_session", "job", "execution"]


def owned_by(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """An SQL condition (`` AND …``) for the rows ``owner`` owns; with one server (no owner
    ids), every row is its own."""
    if owner is None:
        return "", ()
    return " AND owner = ?", (owner,)


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


# One query per kind: the owner of what the route names (of this keypair, still live), with the
# owner's URL when its presence lease (bridge/datadir.py ReplicaPresence) still holds.
_OWNER_SQL: dict[str, str] = {
    "session": "SELECT owner FROM sessions WHERE access_key = ? AND (id = ? OR name = ?)"
               " AND state != 'TERMINATED'",
    "kernel": "SELECT owner FROM sessions WHERE access_key = ? AND id = ? AND id = ?"
              " AND state != 'TERMINATED'",
    "sandbox_session": "SELECT owner FROM sessions WHERE access_key = ? AND name = ?"
                       " AND name = ? AND origin = 'sandbox' AND state != 'TERMINATED'",
    # A job session, or another dialect's session shown as one (GET /api/v1/sessions/{id}).
    "job_session": "SELECT owner FROM job_sessions WHERE access_key = ? AND id = ? AND id = ?"
                   " UNION ALL SELECT owner FROM sessions WHERE access_key = ? AND id = ?"
                   " AND id = ? AND state != 'TERMINATED'",
    "job": "SELECT js.owner FROM jobs j JOIN job_sessions js ON js.id = j.session_id"
           " WHERE j.access_key = ? AND j.id = ? AND j.id = ?",
    "execution": "SELECT owner FROM executions WHERE access_key = ? AND id = ? AND id = ?",
}


# What a replica owns until it is finished; a dead replica's unfinished rows are adopted.
_UNFINISHED = {
    "sessions": "state != 'TERMINATED'",
    "job_sessions": "state != 'closed'",
    "executions": "status IN ('pending', 'running')",
}


class Replicas:
    """This replica's identity, the cluster's secret, and who owns what.

    ``advertise_url`` is how other replicas reach this one: the operator's
    ``KB_ADVERTISE_URL``, else the address the server listens on (:meth:`listening`).
    ``replica_id`` is the presence lease's id when the store is shared (PostgreSQL); a
    server alone on SQLite is never forwarded to and forwards nothing.
    """

    def __init__(self, store: Store, advertise_url: str | None,
                 replica_id: str | None = None) -> None:
        self._store = store
        self.clustered = replica_id is not None
        self.id = replica_id or uuid.uuid4().hex[:16]
        self.advertise_url = advertise_url
        self.secret: str | None = None
        self._elsewhere: dict[str, int] = {}
        # Whether a kind's ident names something this replica runs (its registries, in
        # memory): the owner lookup then costs no database trip (Bridge sets it).
        self.runs_here: Callable[[OwnerKind, str, str], bool] = lambda kind, key, ident: False
        self._live: tuple[float, dict[str, str]] = (0.0, {})

    async def start(self) -> None:
        # The first replica to start makes the secret; the others (and restarts) read it.
        await self._store.execute(
            "INSERT INTO cluster (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            ("secret", secrets.token_urlsafe(32)))
        row = await self._store.fetchone("SELECT value FROM cluster WHERE name=?", ("secret",))
        if row is None:
            raise RuntimeError("the cluster secret was not stored")
        self.secret = str(row["value"])
        if self.clustered:
            if self.advertise_url is None:
                raise RuntimeError("Replicas.listening() must come before start()")
            await self._store.execute(
                f"INSERT INTO replicas (id, url, started_at) VALUES (?, ?, {self._store.now_sql})"
                " ON CONFLICT (id) DO UPDATE SET url = excluded.url",
                (self.id, self.advertise_url))
            log.info("replica %s advertises %s", self.id, self.advertise_url)

    def listening(self, url: str) -> None:
        """The server listens at ``url``: the advertised URL unless the operator set one.
        Raises StartupRefused for a wildcard address other replicas cannot reach."""
        if self.advertise_url is None:
            host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            if self.clustered and host in ("0.0.0.0", "::", ""):
                raise StartupRefused(
                    f"listening on {url}, other replicas cannot reach this one: set "
                    "KB_ADVERTISE_URL to its address (e.g. http://$(POD_IP):8002)")
            self.advertise_url = url

    async def live(self, max_age: float = 0.0) -> dict[str, str]:
        """The replicas whose presence lease holds, this one included: id → URL; as read at
        most ``max_age`` seconds ago (0: read now)."""
        if not self.clustered:
            return {self.id: self.advertise_url or ""}
        read_at, known = self._live
        if max_age and time.monotonic() - read_at < max_age:
            return known
        rows = await self._store.fetchall(
            "SELECT r.id, r.url FROM replicas r JOIN leases l ON l.name = ? || r.id"
            f" WHERE l.expires > {self._store.now_sql}", (PRESENCE_PREFIX,))
        known = {str(r["id"]): str(r["url"]) for r in rows}
        self._live = (time.monotonic(), known)
        return known

    async def others(self) -> list[str]:
        """The other live replicas' ids (whose sessions, jobs and executions are theirs)."""
        return [rid for rid in await self.live() if rid != self.id]

    async def others_on_this_host(self) -> list[str]:
        """Other live replicas on this host (presence ids begin with the host's name)."""
        if not self.clustered:
            return []
        host = self.id.split(":", 1)[0] + ":"
        with contextlib.suppress(Exception):  # stopping: a database gone says nothing
            return [r for r in await self.others() if r.startswith(host)]
        return []

    async def owner(self, kind: OwnerKind, access_key: str, ident: str) -> str | None:
        """The URL of the live replica that owns ``ident`` (of ``access_key``) when that is
        not this one; None when it is this one, nobody's, a dead replica's (served here, so
        the failover decides), or there is no cluster."""
        if not self.clustered or self.runs_here(kind, access_key, ident):
            return None
        params: tuple[str, ...] = (access_key, ident, ident)
        if kind == "job_session":
            params = params * 2
        owners = {r["owner"] for r in await self._store.fetchall(_OWNER_SQL[kind], params)}
        owners.discard(None)
        if not owners or self.id in owners:
            return None
        # Liveness as read within a second: a replica found dead since is forwarded to at most
        # that long (a 503), and the failover takes over within the lease anyway.
        live = await self.live(max_age=LIVE_CACHE_S)
        for rid in sorted(str(o) for o in owners):
            if rid in live:
                return live[rid]
        return None

    # -- places held elsewhere: a keypair's concurrency counts its kernels on every replica --

    def held_elsewhere(self, access_key: str) -> int:
        """Kernels ``access_key`` holds on other replicas, as last counted."""
        return self._elsewhere.get(access_key, 0)

    async def count_elsewhere(self, access_key: str | None = None) -> None:
        """Count the live sessions other replicas hold, for one keypair (before it is admitted
        here) or for all (the periodic count)."""
        if not self.clustered:
            return
        sql = ("SELECT access_key, COUNT(*) AS n FROM sessions WHERE state != 'TERMINATED'"
               " AND owner IS NOT NULL AND owner != ?")
        params: tuple[str, ...] = (self.id,)
        if access_key is not None:
            sql += " AND access_key = ?"
            params += (access_key,)
        rows = await self._store.fetchall(sql + " GROUP BY access_key", params)
        counts = {str(r["access_key"]): int(r["n"]) for r in rows}
        if access_key is not None:
            self._elsewhere[access_key] = counts.get(access_key, 0)
        else:
            self._elsewhere = counts

    # -- scheduled work, once in the cluster -------------------------------------------------------

    async def turn(self, name: str, every: float) -> bool:
        """Whether this replica does the periodic work ``name`` this round: the replica that
        holds the lease ``timer:<name>`` does, and keeps it by doing it every ``every``
        seconds; once it stops (dies), the next replica to try takes it over. Always True
        without replicas."""
        if not self.clustered:
            return True
        return await self._store.try_lease(f"timer:{name}", self.id, every * 1.5)

    # -- the rate limit, across replicas ---------------------------------------------------------

    async def count_rate(self, access_key: str, n: int, limit: int) -> None:
        """Count ``n`` executions of ``access_key`` in the cluster's minute, or none of them.

        A sliding minute estimated from two fixed ones (this minute's count plus the last
        one's, weighted by how much of it still lies in the window), as every replica adds
        to the same rows. Raises RateLimited."""
        if not self.clustered:
            return
        now = time.time()
        minute = int(now // 60)
        row = await self._store.fetchone(
            "INSERT INTO rate_counts (access_key, minute, n) VALUES (?, ?, ?)"
            " ON CONFLICT (access_key, minute) DO UPDATE SET n = rate_counts.n + excluded.n"
            " RETURNING n", (access_key, minute, n))
        before = await self._store.fetchone(
            "SELECT n FROM rate_counts WHERE access_key = ? AND minute = ?",
            (access_key, minute - 1))
        last = int(before["n"]) if before else 0
        estimate = int(row["n"] if row else n) + last * (1 - (now % 60) / 60)
        if estimate > limit:
            await self._store.execute(
                "UPDATE rate_counts SET n = n - ? WHERE access_key = ? AND minute = ?",
                (n, access_key, minute))
            raise RateLimited(limit)

    async def _prune_rates(self) -> None:
        await self._store.execute("DELETE FROM rate_counts WHERE minute < ?",
                                  (int(time.time() // 60) - 2,))

    async def claim_orphans(self) -> int:
        """Make this replica the owner of every unfinished session, job session and execution
        whose owner is no live replica (a dead one, or none recorded); returns how many rows
        it took. Two replicas claiming at once each take a row at most once: the database
        re-checks the condition on a row another claim has just changed."""
        if not self.clustered:
            return 0
        live = list(await self.live())
        if self.id not in live:
            return 0  # our own lease lapsed: we are the one others are adopting from
        marks = ", ".join("?" * len(live))
        taken = 0
        for table, unfinished in _UNFINISHED.items():
            taken += await self._store.execute(
                f"UPDATE {table} SET owner = ? WHERE {unfinished}"
                f" AND (owner IS NULL OR owner NOT IN ({marks}))", (self.id, *live))
        if taken:
            metrics.ADOPTED.inc(taken)
            log.warning("replica %s adopted %d sessions, job sessions and executions of "
                        "replicas that are gone", self.id, taken)
        return taken

    async def watch(self, interval: float, adopt: Callable[[], Awaitable[None]]) -> None:
        """Every ``interval`` seconds, count what other replicas hold, claim what replicas
        whose lease ran out owned, and have ``adopt`` take it up. A failed round is retried at
        the next."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.count_elsewhere()
                if await self.turn("prune-rates", interval):
                    await self._prune_rates()
                if await self.claim_orphans():
                    await adopt()
            except StoreUnavailable:  # the store logged why; no traceback for an outage
                log.warning("failover round skipped: the database is unavailable; retrying in "
                            "%.0f s", interval)
            except Exception:
                log.exception("failover round failed; retrying in %.0f s", interval)

    def sign(self, access_key: str, method: str, uri: str) -> str:
        """A forwarded request's identity header. Raises RuntimeError before start()."""
        if self.secret is None:
            raise RuntimeError("Replicas.start() has not run")
        return sign_identity(self.secret, self.id, access_key, method, uri)

    def verify(self, value: str, method: str, uri: str) -> Identity:
        """Raises BadIdentity."""
        return verify_identity(self.secret, value, method, uri)
