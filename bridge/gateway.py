"""The core side of the Jupyter pass-through: kernelspecs, kernel models, and per-connection relays.

A Jupyter client (JupyterLab through jupyter_server's GatewayClient, or any WebSocket client)
speaks the kernel's own messaging protocol. Each connection gets a :class:`Relay` with its own
jupyter_client channels to the session's kernel: its own session id, so its shell and stdin
sockets have their own ZMQ identity and the kernel routes ``input_request``s and replies to it and
to nobody else. Messages pass through unchanged except for the signature, which is made again with
the kernel's key on the way in (the client never sees the key) and checked on the way out.

What a Jupyter kernel model shows (``execution_state``, ``last_activity``, ``connections``) is
tracked here per session, from the status messages the relays see and the session's own runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .channels import Channels, Sink
from .errors import InvalidRequest, KernelDied, NotFound, UnsafePath
from .kernels import Kernel
from .languages import LANGUAGES, Language, available, resolve
from .messages import Channel, Message
from .session import Hold, Session
from .sessions import Sessions
from .tasks import spawn
from .wire import harden

log = logging.getLogger(__name__)

# Names other Jupyters give the Python kernel. Almost every notebook carries "python3"; it is
# listed (and the default) so a notebook opened through us keeps its kernelspec when saved:
# JupyterLab writes back the name of the kernel it runs, and an ordinary Jupyter has no kb-python.
SPEC_ALIASES = {"python3": "kb-python", "python": "kb-python"}
DEFAULT_SPEC = "python3"
CLIENT_CHANNELS: frozenset[str] = frozenset({"shell", "stdin", "control"})
RELAYED_CHANNELS: tuple[Channel, ...] = ("shell", "iopub", "stdin", "control")
NUDGE_S = 0.3  # the first nudge's wait for its answer (see connect())
# Only these variables of a POSTed env reach the kernel (as Kernel Gateway does): a client must
# not set PATH, LD_PRELOAD or the like inside the sandbox.
ENV_PREFIXES = ("KERNEL_", "JPY_")
# What jupyter_server's GatewayClient adds to every start request: its own launch timeout, and
# the notebook's directory or path on its host. None means anything inside our sandbox (the
# kernel's cwd is /home/work), and a kernel asked for with any environment cannot be a
# pre-started one from the pool (bridge/pool.py): keeping them made every notebook wait for a
# cold kernel start (2–7 s on a busy machine), during which JupyterLab silently drops a cell that
# is run (it has no kernel to send it to until the start request answers).
GATEWAY_ENV = frozenset({"KERNEL_LAUNCH_TIMEOUT", "KERNEL_WORKING_DIR", "JPY_SESSION_NAME"})
# Bounds Activity.requests: a request the kernel never said idle after is dropped past this.
MAX_PENDING_REQUESTS = 1000


class NoSuchKernelspec(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"No such kernelspec {name!r}.")


async def open_client(kernel: Kernel, timeout: float = 10.0) -> AsyncKernelClient:
    """A client of ``kernel`` for a caller that reads its sockets itself (nbclient); see
    :func:`connect`."""
    channels = await connect(kernel, timeout=timeout)
    await channels.stop()
    return channels.client


async def connect(kernel: Kernel, default: Sink | None = None,
                  timeout: float = 10.0) -> Channels:
    """Pumped channels of a new client of ``kernel`` with its own session id (hence its own ZMQ
    identity), whose iopub subscription is known to be live; ``default`` gets every message
    that is not an answer to the nudges below.

    ``KernelManager.client()`` would share the manager's Session object, and two DEALERs with one
    identity on the kernel's ROUTER lose each other's replies. A fresh SUB socket misses what is
    published before its subscription reaches the kernel, so nudge with ``kernel_info_request``s
    on the control channel (answered even while a cell runs) until one's idle status comes back
    on iopub. The nudges' answers, late ones included, are nobody else's.
    """
    client = AsyncKernelClient()
    harden(client.context)  # bounded whatever the kernel sends (bridge/wire.py)
    client.load_connection_info(kernel.manager.get_connection_info())
    client.start_channels(shell=True, iopub=True, stdin=True, hb=False, control=True)
    channels = Channels(client, RELAYED_CHANNELS, default=default)
    channels.start()
    try:
        if not await until_live(channels, timeout):
            log.warning("kernel %s: iopub did not answer within %.0f s", kernel.id, timeout)
    except BaseException:
        await _shut(channels)  # cancelled (the client left), or the sockets failed
        raise
    return channels


async def until_live(channels: Channels, timeout: float) -> bool:
    """Nudge until a nudge's idle comes back on iopub (the subscription is live); False if
    none did within ``timeout``. Each nudge gets longer to answer: a loaded machine is slow."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wait = NUDGE_S
    while loop.time() < deadline:
        try:
            async with asyncio.timeout(min(wait, deadline - loop.time())):
                await channels.request("kernel_info_request", {}, channel="control",
                                       iopub_grace=None, linger=True)
            return True
        except TimeoutError:
            wait = min(wait * 2, 2.0)
    return False


def language_of_spec(name: str) -> Language:
    """The language a kernelspec name (``kb-c``, ``python3``) or language name runs. Raises
    UnknownLanguage."""
    spec = SPEC_ALIASES.get(name, name)
    for lang in LANGUAGES:
        if lang.kernelspec == spec:
            return lang
    return resolve(name)


def wall_clock(monotonic: float) -> str:
    """A monotonic instant as an ISO 8601 UTC time, as Jupyter's ``last_activity``."""
    ts = time.time() - (time.monotonic() - monotonic)
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Activity:
    """What one session shows as a Jupyter kernel."""

    execution_state: str = "idle"
    relays: set[Relay] = field(default_factory=set)
    hold: Hold | None = None  # the kernel is busy for a relayed request: keep the reaper off
    # Ids of the requests clients sent through the relays, until the kernel is idle after them.
    # Only their statuses are the client's: the server's own requests (readiness probes after a
    # start or restart, the relays' connect-time nudges) make the kernel busy for a moment too.
    requests: set[str] = field(default_factory=set)


class Gateway:
    def __init__(self, sessions: Sessions, kernelspecs: KernelSpecManager) -> None:
        self.sessions = sessions
        self.ksm = kernelspecs
        self._activity: dict[str, Activity] = {}
        self._specs: dict[str, dict[str, Any]] | None = None
        self._operators: list[str] = []
        sessions.on_terminated.append(self._terminated)

    # -- kernelspecs -----------------------------------------------------------------------

    def kernelspecs(self) -> dict[str, dict[str, Any]]:
        """Every shipped kernelspec whose toolchain is installed, as Jupyter's spec models, and
        the Python kernel again under each of its aliases."""
        # Read once: the gateway polls this, and neither spec files nor toolchains change while
        # the server runs.
        if self._specs is None:
            specs = {}
            for lang in available():
                with contextlib.suppress(NoSuchKernel):
                    specs[lang.kernelspec] = self._spec_model(lang.kernelspec)
            for alias, spec in SPEC_ALIASES.items():
                if spec in specs:
                    specs[alias] = self._spec_model(spec, alias)
            self._operators = self._operator_specs()
            for name in self._operators:
                specs.setdefault(name, self._spec_model(name))
            self._specs = specs
        return self._specs

    def _operator_specs(self) -> list[str]:
        """Kernelspecs an operator installed where Jupyter looks (JUPYTER_PATH, a prefix) that
        name a ``metadata.kernel_provisioner``: offered under their own names and started
        through that provisioner (ours confines them; another one's confinement is its own).
        One without the stanza (ipykernel's python3) stays hidden behind our aliases."""
        names = []
        for name in sorted(self.ksm.find_kernel_specs()):
            if name in SPEC_ALIASES or any(lang.kernelspec == name for lang in LANGUAGES):
                continue
            with contextlib.suppress(Exception):  # a broken spec is not offered
                stanza = self.ksm.get_kernel_spec(name).metadata.get("kernel_provisioner")
                if isinstance(stanza, dict) and stanza.get("provisioner_name"):
                    names.append(name)
        return names

    def kernelspec(self, name: str) -> dict[str, Any]:
        """One spec model. Raises NoSuchKernelspec."""
        model = self.kernelspecs().get(name)
        if model is None:
            raise NoSuchKernelspec(name)
        return model

    def _spec_model(self, spec_name: str, name: str | None = None) -> dict[str, Any]:
        """The model of kernelspec ``spec_name``, listed as ``name`` (an alias) if given."""
        name = name or spec_name
        ks = self.ksm.get_kernel_spec(spec_name)
        resources = {p.stem: f"/kernelspecs/{name}/{p.name}"
                     for p in sorted(Path(ks.resource_dir).iterdir())
                     if p.name.startswith("logo-")}
        spec = ks.to_dict()
        spec["interrupt_mode"] = "message"  # what kernels in bwrap get, whatever kernel.json says
        return {"name": name, "spec": spec, "resources": resources}

    def resource(self, name: str, resource: str) -> Path:
        """A file of a kernelspec's directory (its logos). Raises NoSuchKernelspec, UnsafePath,
        NotFound."""
        if name not in self.kernelspecs():
            raise NoSuchKernelspec(name)
        spec = SPEC_ALIASES.get(name, name)
        base = Path(self.ksm.get_kernel_spec(spec).resource_dir).resolve()
        path = (base / resource).resolve()
        if base not in path.parents:
            raise UnsafePath(resource, "it is not in the kernelspec's directory")
        if resource == "kernel.json" or not path.is_file():
            raise NotFound(f"Kernelspec {name!r} has no resource {resource!r}.")
        return path

    # -- kernels (sessions seen as Jupyter kernels) ----------------------------------------

    async def create(self, access_key: str, name: str | None,
                     env: dict[str, str] | None = None) -> Session:
        """Start a session for kernelspec ``name`` (default python). Raises NoSuchKernelspec,
        QuotaExceeded, KernelStartFailed."""
        name = name or DEFAULT_SPEC
        if name in self.kernelspecs() and name in self._operators:
            # The operator's kernelspec runs under its own name; its language is its own.
            language = Language(name, name, "", ())
        else:
            try:
                language = language_of_spec(name)
            except InvalidRequest:
                raise NoSuchKernelspec(name) from None
        if not language.available:  # a Jupyter client asked for a spec we do not list
            raise NoSuchKernelspec(name)
        environ = {k: str(v) for k, v in (env or {}).items()
                   if k.startswith(ENV_PREFIXES) and k not in GATEWAY_ENV}
        return await self.sessions.create(access_key, language, origin="jupyter",
                                          environ=environ, kernelspec=name)

    def kernels(self, access_key: str) -> list[Session]:
        return self.sessions.all(access_key)

    def get(self, access_key: str, kernel_id: str) -> Session:
        """Raises SessionNotFound."""
        return self.sessions.get(access_key, kernel_id)

    def model(self, session: Session) -> dict[str, Any]:
        act = self._activity.get(session.id)
        state = act.execution_state if act is not None else "idle"
        if session.busy:
            state = "busy"
        if session.state.value == "RESTARTING":
            state = "restarting"
        elif session.state.value == "ERROR":
            state = "dead"
        return {"id": session.id,
                "name": session.kernelspec or session.language.kernelspec,
                "last_activity": wall_clock(session.last_activity),
                "execution_state": state,
                "connections": len(act.relays) if act is not None else 0}

    async def restart(self, session: Session) -> None:
        """A requested restart. Open connections see ``starting`` and then ``idle``, never
        ``restarting``: that state means the kernel died and is being auto-restarted, and
        JupyterLab answers it with a "kernel appears to have died" dialog (jupyter_server and
        Kernel Gateway send nothing of their own on a requested restart)."""
        act = self._activity_of(session)
        self._release(session, act)
        act.execution_state = "starting"
        for relay in list(act.relays):
            relay.status("starting")
        try:
            await self.sessions.restart(session)
            # Each relay's sockets were connected to the old kernel: zmq connects them again on
            # its own, but a SUB socket's subscription reaches the new kernel some time later
            # (what is published before is lost) and a DEALER may stay paired with nothing. So
            # give every relay a new client, known live like the first (see connect()).
            kernel = session.main_kernel
            if kernel is not None:
                for relay in list(act.relays):
                    await relay.reconnect(kernel)
        finally:
            act.requests.clear()  # the old kernel will not say idle after them
            act.execution_state = "idle" if session.main is not None else "dead"
            for relay in list(act.relays):
                relay.status(act.execution_state)

    # -- relays ----------------------------------------------------------------------------

    async def connect(self, session: Session, deliver: Callable[[Channel, Message], None],
                      on_close: Callable[[], None]) -> Relay:
        """A relay between one client connection and the session's kernel. Raises KernelDied."""
        kernel = session.require_main().kernel
        session.touch()
        relay = Relay(self, session, deliver, on_close)
        await relay.open(kernel)
        self._activity_of(session).relays.add(relay)
        return relay

    def _activity_of(self, session: Session) -> Activity:
        act = self._activity.get(session.id)
        if act is None:
            act = self._activity[session.id] = Activity()
        return act

    def observe(self, session: Session, msg: Message) -> None:
        session.touch()
        if msg["header"].get("msg_type") != "status":
            return
        act = self._activity_of(session)
        parent = msg["parent_header"].get("msg_id")
        if parent not in act.requests:
            return  # the server's own request, not one of the client's (see Activity.requests)
        act.execution_state = str(msg["content"].get("execution_state", act.execution_state))
        # A cell running for a Jupyter client is not idleness: hold the session while busy.
        if act.execution_state == "busy" and act.hold is None:
            act.hold = session.hold()
        elif act.execution_state == "idle":
            act.requests.discard(parent)
            if not act.requests:
                self._release(session, act)

    def sent(self, session: Session, msg_id: str) -> None:
        """A client sent request ``msg_id`` through a relay; its statuses are the client's."""
        act = self._activity_of(session)
        if len(act.requests) >= MAX_PENDING_REQUESTS:  # requests a kernel never answered
            act.requests.clear()
        act.requests.add(msg_id)

    @staticmethod
    def _release(session: Session, act: Activity) -> None:
        if act.hold is not None:
            act.hold.release()
            act.hold = None

    def detach(self, relay: Relay) -> None:
        act = self._activity.get(relay.session.id)
        if act is not None:
            act.relays.discard(relay)
            if not act.relays:
                self._release(relay.session, act)

    def _terminated(self, session: Session) -> None:
        act = self._activity.pop(session.id, None)
        if act is not None:
            for relay in list(act.relays):
                spawn(relay.close())


class Relay:
    """One client connection's channels to a kernel."""

    def __init__(self, gateway: Gateway, session: Session,
                 deliver: Callable[[Channel, Message], None], on_close: Callable[[], None]) -> None:
        self.gateway = gateway
        self.session = session
        self._deliver = deliver
        self._on_close = on_close
        self._channels: Channels | None = None
        self._closed = False

    async def open(self, kernel: Kernel) -> None:
        """Connect to ``kernel``. Raises KernelDied if the client left meanwhile."""
        channels = await connect(kernel, self._receive)
        if self._closed:
            await _shut(channels)
            raise KernelDied("This connection is closed.")
        self._channels = channels

    async def reconnect(self, kernel: Kernel) -> None:
        """Talk to ``kernel`` (the session's kernel after a restart) through a new client."""
        if self._channels is None:
            return  # closed meanwhile
        channels = await connect(kernel, self._receive)
        old = self._channels
        if old is None:  # closed while connecting
            await _shut(channels)
            return
        self._channels = channels  # swapped at once: a close() from now on closes the new one
        await _shut(old)

    def send(self, channel: str, msg: dict[str, Any]) -> None:
        """Forward a client's message, signed with the kernel's key. Raises InvalidRequest."""
        if self._channels is None:
            raise KernelDied("This connection is closed.")
        if channel not in CLIENT_CHANNELS:
            raise InvalidRequest(f"Clients may not send on channel {channel!r}.")
        header = msg.get("header")
        if not isinstance(header, dict) or not header.get("msg_type") or not header.get("msg_id"):
            raise InvalidRequest("A message needs a header with msg_id and msg_type.")
        wire = {"header": header, "parent_header": msg.get("parent_header") or {},
                "metadata": msg.get("metadata") or {}, "content": msg.get("content") or {},
                "buffers": msg.get("buffers") or []}
        self.session.touch()
        self.gateway.sent(self.session, str(header["msg_id"]))
        getattr(self._channels.client, f"{channel}_channel").send(wire)

    def status(self, state: str) -> None:
        """A synthesized iopub status, for what the kernel itself cannot say (a restart)."""
        if self._channels is not None:
            msg = self._channels.client.session.msg("status", {"execution_state": state})
            msg["channel"] = "iopub"
            self._deliver("iopub", msg)

    def _receive(self, channel: Channel, msg: Message) -> None:
        """Every message of the kernel but the nudges' answers (the channel pump's default)."""
        if channel == "iopub":
            self.gateway.observe(self.session, msg)
        try:
            self._deliver(channel, msg)
        except Exception:
            spawn(self.close())  # the client is gone

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = self._channels, None
        if channels is None:
            return
        await _shut(channels)
        self.gateway.detach(self)
        with contextlib.suppress(Exception):
            self._on_close()


async def _shut(channels: Channels) -> None:
    await channels.stop()
    channels.client.stop_channels()
