"""One typed settings object, read once from ``KB_*`` environment variables and passed down."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .admission import parse_budget


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "kernel-bridge"


class Settings(BaseSettings):
    """Embedded defaults serve one machine; every field can be set as ``KB_<NAME>``.

    Each field's docstring is its description: ``kernel-bridge settings --markdown`` prints the
    README's table of settings from them.
    """

    model_config = SettingsConfigDict(env_prefix="KB_", extra="ignore", frozen=True,
                                      use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address the server listens on."""
    port: int = Field(8002, ge=0, le=65535)
    """TCP port the server listens on."""
    data_dir: Path = Field(default_factory=_default_data_dir)
    """SQLite database (unless `KB_DATABASE_URL`), session working dirs and virtual folders
    (default `~/.local/share/kernel-bridge`); replicas share one on shared storage."""
    database_url: str | None = None
    """`postgresql://user:password@host:port/dbname`: keep state (keypairs, sessions, runs, jobs,
    executions, folders) in PostgreSQL, which replicas share; unset: SQLite in the data dir."""
    server_name: str = "kernel-bridge"
    """This server's name (the job sessions' `backend_name`)."""

    # Replicas (API.md "Second release"): several servers on one database and one storage root.
    advertise_url: str | None = None
    """This replica's internal URL, where other replicas forward requests for the sessions it
    owns (default: `http://<host>:<port>`; set it when the host is `0.0.0.0` or behind NAT)."""
    lease_s: float = Field(15.0, gt=0)
    """Seconds a replica's lease lasts: a replica that has not renewed it for this long is
    dead, and another adopts its sessions."""

    # Sandbox: "auto" uses bubblewrap when present and refuses to start without it;
    # "off" runs kernels unconfined (an explicit operator choice, warned about at start).
    sandbox: Literal["auto", "on", "off"] = "auto"
    """`auto`/`on`: kernels run in bubblewrap, and the server refuses to start without it;
    `off`: unconfined (unsafe)."""
    allow_network: bool = False
    """Let a session that asks (`config.network: true`) use the host network."""
    # The host uid (and gid) user code runs as; no host account should use it (SECURITY.md).
    sandbox_uid: int = Field(60000, ge=1, le=2**32 - 2)
    """The host uid (and gid) kernels run as; no host account should use it."""

    # Runs
    flush_interval: float = Field(2.0, gt=0)
    """Seconds before a Backend.AI execute call answers `continued` with the output so far."""
    output_limit: int = Field(4 * 1024 * 1024, ge=1024)
    """Bytes of output kept per run; past it the run is interrupted and the result says
    `truncated`."""
    kernel_start_timeout: float = Field(60.0, gt=0)
    """Seconds a kernel may take to start."""
    zygote: Literal["on", "off"] = "on"
    """Python kernels (kb-python, bash, compiled languages) forked from a pre-imported zygote
    into the same sandbox a cold kernel gets (bridge/zygote.py); "off": every kernel cold."""
    zygote_max_forks: int = Field(500, ge=1)
    """Forks after which a fresh zygote takes over (its kernels share one hash secret and
    address layout)."""
    # SIGTERM: stop accepting, let running runs finish this long, then stop (a second signal
    # stops at once).
    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM, seconds running runs may take to finish before the server stops (a second
    signal stops it at once)."""
    keep_kernels: bool = False
    """On stop (after the drain), leave every session's kernel running for the next server on
    this data dir, which adopts them (`serve --keep-kernels`; for upgrades). Off: stop shuts
    kernels down. A killed server's kernels are adopted either way."""

    # Session limits (Backend.AI seed 001/002). Zero means "no limit".
    default_query_timeout_ms: int = Field(0, ge=0)
    """A session's query timeout and CPU credit when the create names none (0: no CPU credit,
    and queries end at `KB_QUERY_TIMEOUT_S`)."""
    default_mem_kib: int = Field(1024 * 1024, ge=0)
    """A kernel's memory cap in KiB when the create names none (0: none)."""
    idle_timeout_s: float = Field(600.0, gt=0)
    """Seconds without a run before a session is destroyed."""
    hard_max_mem_kib: int = Field(8 * 1024 * 1024, ge=0)
    """The most memory (KiB) a create may ask for; more is 406 (0: no limit)."""
    hard_max_exec_timeout_ms: int = Field(3_600_000, ge=0)
    """The longest execTimeout (ms) a create may ask for; more is 406 (0: no limit)."""
    max_pids: int = Field(256, ge=8)
    """Processes and threads a kernel's cgroup may hold."""
    default_concurrency: int = Field(5, ge=1)
    """Concurrent sessions of a new keypair (`keys create --concurrency N` overrides it)."""
    host_memory_budget: str = "75%"
    """The most the memory caps of all running kernels may add up to: bytes (`12G` too) or a
    percentage of the host's RAM. A create past it waits (one-shots) or is refused."""
    query_timeout_s: float = Field(600.0, gt=0)
    """The deadline of a Backend.AI query or batch run whose session set no execTimeout; the
    session is then destroyed, which frees its place."""
    jupyter_concurrency: int = Field(16, ge=1)
    """Kernels in all a keypair may hold when it starts a Jupyter one (one per open notebook);
    the other dialects stay at the keypair's own concurrency."""
    reaper_interval_s: float = Field(1.0, gt=0)
    """Seconds between checks for idle and expired sessions."""

    # Disk (bridge/disk.py)
    session_disk_mb: int = Field(1024, ge=0)
    """Each session's /home/work is a filesystem of this many MiB (a sparse, loop-mounted ext4
    image): past it, ENOSPC inside. 0: no disk quota (refused in the sandbox unless set so)."""
    session_inodes: int = Field(100_000, ge=1024)
    """Files and dirs a session (or a folder) may hold: its filesystem's inode count."""
    folder_disk_mb: int = Field(1024, ge=0)
    """Each virtual folder is a filesystem of this many MiB. 0: folders without a quota."""
    disk_reserve_mb: int = Field(512, ge=0)
    """Below this much free space in the data dir, new sessions and folders get 507."""

    # Job sessions: an open session that never gets a job closes after this long
    job_open_ttl_s: float = Field(1800.0, gt=0)
    """Seconds a job session that never got a job stays open, from when it could take one."""

    # Operations: `KB_LOG_FORMAT=json` writes one JSON object per log line. `GET /metrics`
    # asks for a key when `KB_METRICS_AUTH=on`, or with "auto" when the server listens beyond
    # loopback; "off" leaves it open (behind a scraper-only network).
    log_format: Literal["text", "json"] = "text"
    """`text`, or `json`: one JSON object per log line."""
    metrics_auth: Literal["auto", "on", "off"] = "auto"
    """`GET /metrics` asks for a key: `on`; `auto`: when listening beyond loopback; `off`: never."""

    # Sandbox dialect
    rate_limit: int = Field(100, ge=1)
    """Sandbox executions per keypair per minute (a batch counts each item)."""
    pool_python: int = Field(2, ge=0)
    """Warm Python kernels kept ready for one-shot executions, at least (demand raises the
    stock up to 4 times this, within the host memory budget)."""
    pool_sizes: dict[str, int] = Field(default_factory=dict)
    """Warm kernels of other languages, as JSON: `{"javascript": 1}`."""

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, url: str | None) -> str | None:
        if not url:
            return None
        if not url.startswith(("postgresql://", "postgres://")):
            # Only the scheme: the URL may hold a password.
            raise ValueError(f"must start with postgresql:// (not {url.split(':', 1)[0]}:)")
        return url

    @field_validator("host_memory_budget")
    @classmethod
    def _budget_parses(cls, value: str) -> str:
        parse_budget(value)  # raises ValueError naming the value
        return value

    @property
    def host_memory_budget_bytes(self) -> int:
        return parse_budget(self.host_memory_budget)
    python_env: Path | None = None
    """A venv or conda env with ipykernel (and numpy, pandas, …) that Python kernels run in,
    bound read-only into every sandbox (`make datascience-env` makes one); unset: the server's
    own interpreter."""

    @field_validator("python_env")
    @classmethod
    def _python_env_has_ipykernel(cls, env: Path | None) -> Path | None:
        if env is None:
            return None
        env = env.expanduser().absolute()
        python = env / "bin" / "python"
        if not python.exists():
            raise ValueError(f"{env} is not a Python environment: it has no bin/python")
        probe = subprocess.run([str(python), "-c", "import ipykernel"], capture_output=True,
                               timeout=60, check=False)
        if probe.returncode != 0:
            raise ValueError(f"{env} has no ipykernel; install it with "
                             f"{env}/bin/python -m pip install ipykernel")
        return env

    @property
    def python_interpreter(self) -> str | None:
        """The interpreter Python kernels start with, if not the server's own."""
        return str(self.python_env / "bin" / "python") if self.python_env else None

    def concurrency_for(self, origin: str, keypair_concurrency: int) -> int:
        """How many kernels in all a keypair may hold when it asks for one more from ``origin``:
        its own concurrency, raised to ``jupyter_concurrency`` for Jupyter kernels. Every
        kernel counts against the limit, so notebooks never squeeze other dialects below the
        keypair's concurrency, and a person's notebooks are not refused at the sixth tab."""
        if origin == "jupyter":
            return max(keypair_concurrency, self.jupyter_concurrency)
        return keypair_concurrency

    @property
    def db_path(self) -> Path:
        return self.data_dir / "kernel-bridge.sqlite3"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def folders_dir(self) -> Path:
        return self.data_dir / "vfolders"

    def pool_size(self, language: str) -> int:
        if language in self.pool_sizes:
            return self.pool_sizes[language]
        return self.pool_python if language == "python" else 0
