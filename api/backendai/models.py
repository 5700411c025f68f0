"""Request bodies of the Backend.AI dialect, as the real clients send them (backendai.md §3.3)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^\w[\w.-]*\w$"  # and 4–64 characters, as Backend.AI checks
MAX_MOUNTS = 5


class Loose(BaseModel):
    # Clients send many fields we do not use (domain, group, scalingGroup, …): accept them.
    model_config = ConfigDict(extra="allow")


class CreateLimits(Loose):
    maxMem: int | None = Field(None, ge=0, description="KiB")
    execTimeout: int | None = Field(None, ge=0, description="ms")
    timeout: int | None = Field(None, ge=0, description="ms (older clients)")


class CreateConfig(Loose):
    # What backend.ai-client 23.9 sends that a single-machine server has no use for.
    ignored_fields: ClassVar[frozenset[str]] = frozenset({
        "resource_opts", "scalingGroup", "scaling_group", "clusterSize", "cluster_size",
        "mount_map", "preopen_ports", "agentList", "instanceMemory", "instanceCores",
        "instanceGPUs", "instances"})
    mounts: list[str] | None = None
    environ: dict[str, str] | None = None
    resources: dict[str, Any] | None = None
    # Ask for network access (kernel-bridge's own field): granted only when the operator set
    # KB_ALLOW_NETWORK, refused with 400 otherwise. Without it a session has no network at all.
    network: bool = False


class CreateSession(Loose):
    # What backend.ai-client 23.9 (and older clients) send that this server ignores.
    ignored_fields: ClassVar[frozenset[str]] = frozenset({
        "tag", "type", "group", "groupName", "domain", "domainName", "owner_access_key",
        "enqueueOnly", "maxWaitSeconds", "startupCommand", "starts_at", "startsAt",
        "bootstrap_script", "bootstrapScript", "dependencies", "callback_url", "callbackURL",
        "architecture", "clusterSize", "clusterMode", "cluster_size", "cluster_mode",
        "resources", "resourceOpts", "scalingGroup", "sessionType", "batchTimeout"})
    lang: str | None = None
    image: str | None = None
    clientSessionToken: str | None = Field(None, pattern=NAME_PATTERN, min_length=4,
                                             max_length=64)
    name: str | None = Field(None, pattern=NAME_PATTERN, min_length=4, max_length=64)
    limits: CreateLimits | None = None
    mounts: list[str] | None = None
    config: CreateConfig | None = None
    reuseIfExists: bool = True

    @property
    def language(self) -> str | None:
        return self.image or self.lang

    @property
    def session_name(self) -> str | None:
        return self.name or self.clientSessionToken

    @property
    def all_mounts(self) -> list[str]:
        mounts = list(self.mounts or [])
        if self.config and self.config.mounts:
            mounts += self.config.mounts
        return mounts

    @field_validator("mounts")
    @classmethod
    def _few_mounts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) > MAX_MOUNTS:
            raise ValueError(f"at most {MAX_MOUNTS} mounts per session")
        return v


class BatchOptions(Loose):
    clean: str | None = None
    build: str | None = None
    exec: str | None = None
    buildLog: bool = False


class Execute(Loose):
    mode: Literal["query", "batch", "continue", "input", "complete"]
    code: str | None = ""
    runId: str | None = Field(None, max_length=64)
    options: dict[str, Any] | None = None


class CompleteOptions(Loose):
    row: int | None = None
    col: int | None = Field(None, ge=0)
    line: str | None = None
    post: str | None = None


class Complete(Loose):
    code: str = ""
    options: CompleteOptions | None = None


class ExecutionResult(BaseModel):
    runId: str
    status: Literal["continued", "waiting-input", "finished", "clean-finished",
                    "build-finished", "exec-timeout"]
    exitCode: int | None
    options: dict[str, Any] | None
    files: list[dict[str, str]]
    console: list[list[Any]]


class ExecuteResponse(BaseModel):
    result: ExecutionResult


class CreateResponse(BaseModel):
    kernelId: str
    sessionId: str
    sessionName: str
    status: str
    servicePorts: list[Any]
    created: bool


class SessionInfo(BaseModel):
    lang: str
    image: str
    status: str
    age: int
    idle: int
    queryTimeout: int
    idleTimeout: int
    maxCpuCredit: int
    numQueriesExecuted: int
    memoryLimit: int
    memoryUsed: int
    cpuCreditUsed: int


class ContainerStats(BaseModel):
    cpu_used: int
    mem_max_bytes: int
    mem_cur_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    io_max_scratch_size: int
    io_cur_scratch_size: int


class DestroyResponse(BaseModel):
    stats: ContainerStats
