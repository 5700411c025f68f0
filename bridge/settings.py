"""One typed settings object, read once from ``KB_*`` environment variables and passed down."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "kernel-bridge"


class Settings(BaseSettings):
    """Embedded defaults serve one machine; every field can be set as ``KB_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KB_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8002, ge=0, le=65535)
    data_dir: Path = Field(default_factory=_default_data_dir)
    server_name: str = "kernel-bridge"

    # Sandbox: "auto" uses bubblewrap when present and refuses to start without it;
    # "off" runs kernels unconfined (an explicit operator choice, warned about at start).
    sandbox: Literal["auto", "on", "off"] = "auto"
    allow_network: bool = False  # a session gets network only if this is set and it asks

    # Runs
    flush_interval: float = Field(2.0, gt=0)  # seconds before an execute call answers `continued`
    output_limit: int = Field(4 * 1024 * 1024, ge=1024)  # bytes of console kept per run
    kernel_start_timeout: float = Field(60.0, gt=0)
    # SIGTERM: stop accepting, let running runs finish this long, then stop (a second signal
    # stops at once).
    shutdown_grace_s: float = Field(30.0, ge=0)

    # Session limits (Backend.AI seed 001/002). Zero means "no limit".
    default_query_timeout_ms: int = Field(0, ge=0)
    default_mem_kib: int = Field(1024 * 1024, ge=0)
    idle_timeout_s: float = Field(600.0, gt=0)
    hard_max_mem_kib: int = Field(8 * 1024 * 1024, ge=0)
    hard_max_exec_timeout_ms: int = Field(3_600_000, ge=0)
    max_pids: int = Field(256, ge=8)
    default_concurrency: int = Field(5, ge=1)
    jupyter_concurrency: int = Field(16, ge=1)
    """Kernels in all a keypair may hold when it starts a Jupyter one (one per open notebook);
    the other dialects stay at the keypair's own concurrency."""
    reaper_interval_s: float = Field(1.0, gt=0)

    # Job sessions: an open session that never gets a job closes after this long
    job_open_ttl_s: float = Field(1800.0, gt=0)

    # Operations: `KB_LOG_FORMAT=json` writes one JSON object per log line. `GET /metrics`
    # asks for a key when `KB_METRICS_AUTH=on`, or with "auto" when the server listens beyond
    # loopback; "off" leaves it open (behind a scraper-only network).
    log_format: Literal["text", "json"] = "text"
    metrics_auth: Literal["auto", "on", "off"] = "auto"

    # Sandbox dialect
    rate_limit: int = Field(100, ge=1)  # executions per keypair per minute
    pool_python: int = Field(2, ge=0)
    # Other languages' pools, e.g. KB_POOL_SIZES='{"javascript": 1}'
    pool_sizes: dict[str, int] = Field(default_factory=dict)

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
