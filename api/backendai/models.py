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
    maxMem: int | None = Field(default=None, ge=0, description="Memory cap in KiB.",
                               examples=[524288])
    execTimeout: int | None = Field(default=None, ge=0, description="Query timeout and CPU "
                                    "credit in ms.", examples=[30000])
    timeout: int | None = Field(default=None, ge=0, description="ms (older clients)",
                                examples=[30000])


class CreateConfig(Loose):
    # What backend.ai-client 23.9 sends that a single-machine server has no use for.
    ignored_fields: ClassVar[frozenset[str]] = frozenset({
        "resource_opts", "scalingGroup", "scaling_group", "clusterSize", "cluster_size",
        "mount_map", "preopen_ports", "agentList", "instanceMemory", "instanceCores",
        "instanceGPUs", "instances"})
    mounts: list[str] | None = Field(default=None, description="Virtual folders to mount: "
                                     "`name` or `name:alias` (at most 5).", examples=[["data"]])
    environ: dict[str, str] | None = Field(default=None, description="Environment variables of "
                                           "the session's kernels.", examples=[{"LANG": "C"}])
    resources: dict[str, Any] | None = Field(default=None, description="Accepted and ignored "
                                             "(kernels share the machine).",
                                             examples=[{"cpu": 1}])
    # Ask for network access (kernel-bridge's own field): granted only when the operator set
    # KB_ALLOW_NETWORK, refused with 400 otherwise. Without it a session has no network at all.
    network: bool = Field(default=False, description="Ask for the host network (granted only "
                          "when the server sets KB_ALLOW_NETWORK).", examples=[False])


class CreateSession(Loose):
    # What backend.ai-client 23.9 (and older clients) send that this server ignores.
    ignored_fields: ClassVar[frozenset[str]] = frozenset({
        "tag", "type", "group", "groupName", "domain", "domainName", "owner_access_key",
        "enqueueOnly", "maxWaitSeconds", "startupCommand", "starts_at", "startsAt",
        "bootstrap_script", "bootstrapScript", "dependencies", "callback_url", "callbackURL",
        "architecture", "clusterSize", "clusterMode", "cluster_size", "cluster_mode",
        "resources", "resourceOpts", "scalingGroup", "sessionType", "batchTimeout"})
    lang: str | None = Field(default=None, description="Language (API v2–v4 clients).",
                             examples=["python"])
    image: str | None = Field(default=None, description="Language as an image reference: "
                              "`python`, `lablup/python:3.9`, `python:3.6-ubuntu18.04`.",
                              examples=["python:3.9"])
    clientSessionToken: str | None = Field(default=None, pattern=NAME_PATTERN, min_length=4,
                                           max_length=64, description="The session's name "
                                           "(API ≤ v4).", examples=["demo"])
    name: str | None = Field(default=None, pattern=NAME_PATTERN, min_length=4, max_length=64,
                             description="The session's name (API v5+).", examples=["demo"])
    limits: CreateLimits | None = Field(default=None, description="Memory and time limits.")
    mounts: list[str] | None = Field(default=None, description="Virtual folders to mount "
                                     "(also under config).", examples=[["data:input"]])
    config: CreateConfig | None = Field(default=None, description="Mounts, environment, "
                                        "resources, network.")
    reuseIfExists: bool = Field(default=True, description="Answer 200 with the existing "
                                "session of that name instead of 409-ing.", examples=[True])

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
    clean: str | None = Field(default=None, description="Clean command; `*`: the language's "
                              "default.", examples=["*"])
    build: str | None = Field(default=None, description="Build command; `*`: the language's "
                              "default.", examples=["*"])
    exec: str | None = Field(default=None, description="Run command; `*`: the language's "
                             "default.", examples=["*"])
    buildLog: bool = Field(default=False, description="Show the build's output.",
                           examples=[True])


class Execute(Loose):
    mode: Literal["query", "batch", "continue", "input", "complete"] = Field(
        description="query: run code; batch: clean/build/exec; continue: more of a run; input: "
                    "answer a waiting-input run.", examples=["query"])
    code: str | None = Field(default="", description="Code (query), or the input line (input).",
                             examples=["print(6 * 7)"])
    runId: str | None = Field(default=None, max_length=64, description="The run's id; null on a "
                              "new run: the server makes one.", examples=[None])
    options: dict[str, Any] | None = Field(default=None, description="Batch options: clean, "
                                           "build, exec, buildLog.",
                                           examples=[{"build": "*", "exec": "*"}])


class CompleteOptions(Loose):
    row: int | None = Field(default=None, description="Cursor row.", examples=[0])
    col: int | None = Field(default=None, ge=0, description="Cursor column.", examples=[3])
    line: str | None = Field(default=None, description="The line at the cursor.",
                             examples=["pri"])
    post: str | None = Field(default=None, description="Text after the cursor.", examples=[""])


class Complete(Loose):
    code: str = Field(default="", description="Code up to the cursor.", examples=["pri"])
    options: CompleteOptions | None = Field(default=None, description="Cursor position.")


class ExecutionResult(BaseModel):
    runId: str = Field(description="The run's id: send it back to continue or answer input.",
                       examples=["5f0c9a3d2b1e4f6a8c7d9e0f1a2b3c4d"])
    status: Literal["continued", "waiting-input", "finished", "clean-finished",
                    "build-finished", "exec-timeout"] = Field(
        description="continued: more to come (send mode continue); waiting-input: send mode "
                    "input; finished; exec-timeout.", examples=["finished"])
    exitCode: int | None = Field(description="Set on finished and the batch steps.",
                                 examples=[0])
    options: dict[str, Any] | None = Field(description="waiting-input: {is_password}.",
                                           examples=[None])
    files: list[dict[str, str]] = Field(description="Always empty.", examples=[[]])
    console: list[list[Any]] = Field(description="Items: [stdout, text], [stderr, text], "
                                     "[media, [mime, data]], [html, text].",
                                     examples=[[["stdout", "42\n"]]])


class ExecuteResponse(BaseModel):
    result: ExecutionResult = Field(description="What the run did since the last call.")


class CreateResponse(BaseModel):
    kernelId: str = Field(description="The session's UUID (older clients' name for it).",
                          examples=["3f2b8c1e-0d4a-4e5b-9c6d-7e8f9a0b1c2d"])
    sessionId: str = Field(description="The session's UUID.",
                           examples=["3f2b8c1e-0d4a-4e5b-9c6d-7e8f9a0b1c2d"])
    sessionName: str = Field(description="The session's name.", examples=["demo"])
    status: str = Field(description="RUNNING.", examples=["RUNNING"])
    servicePorts: list[Any] = Field(description="Always empty.", examples=[[]])
    created: bool = Field(description="false: an existing session was reused.",
                          examples=[True])


class SessionInfo(BaseModel):
    lang: str = Field(description="Language.", examples=["python"])
    image: str = Field(description="Language as an image name.", examples=["python"])
    status: str = Field(description="RUNNING, RESTARTING or ERROR.", examples=["RUNNING"])
    age: int = Field(description="ms since creation.", examples=[12000])
    idle: int = Field(description="ms since the last run.", examples=[3000])
    queryTimeout: int = Field(description="ms per query (0: none).", examples=[0])
    idleTimeout: int = Field(description="ms of idleness before it is destroyed.",
                             examples=[600000])
    maxCpuCredit: int = Field(description="CPU ms it may spend (0: no limit).", examples=[0])
    numQueriesExecuted: int = Field(description="Runs so far.", examples=[2])
    memoryLimit: int = Field(description="KiB.", examples=[1048576])
    memoryUsed: int = Field(description="KiB, measured.", examples=[65536])
    cpuCreditUsed: int = Field(description="CPU ms spent, measured.", examples=[120])


class ContainerStats(BaseModel):
    cpu_used: int = Field(description="CPU ms used.", examples=[120])
    mem_max_bytes: int = Field(description="Peak memory.", examples=[70000000])
    mem_cur_bytes: int = Field(description="Memory at the end.", examples=[65000000])
    net_rx_bytes: int = Field(description="Bytes received (0: no network).", examples=[0])
    net_tx_bytes: int = Field(description="Bytes sent (0: no network).", examples=[0])
    io_read_bytes: int = Field(description="Bytes read from disk.", examples=[4096])
    io_write_bytes: int = Field(description="Bytes written to disk.", examples=[4096])
    io_max_scratch_size: int = Field(description="Always 0.", examples=[0])
    io_cur_scratch_size: int = Field(description="Always 0.", examples=[0])


class DestroyResponse(BaseModel):
    stats: ContainerStats = Field(description="The session's last usage figures.")
