"""Bodies of the Sandbox dialect, field for field as Nadoo Sandbox's ``ExecuteRequest``,
``ExecuteResponse`` and ``ExecutionStatus`` (reference/seeds_origin.md, Document A)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, RootModel

from bridge.executions import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S


class ExecuteRequest(BaseModel):
    # Closed: the seed's request model is complete and no client sends more, so a misspelt field
    # (`stdn` for `stdin`) is a 422 that names it rather than a silently ignored default.
    model_config = ConfigDict(extra="forbid")

    code: str
    language: str = Field(min_length=1)
    stdin: str | None = None
    environment: dict[str, str] | None = None
    # Seconds. Nadoo documents "default 30, max 300"; above the max is a body that does not
    # validate (422), as FastAPI answers for a `le=` bound. Fractions are accepted.
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S)
    session_id: str | None = Field(None, min_length=1, max_length=128)


class BatchRequest(RootModel[list[ExecuteRequest]]):
    """A JSON array of executions, run in order (at most 10: more is a 400)."""


class ExecuteResponse(BaseModel):
    execution_id: str
    stdout: str
    stderr: str
    exit_code: int = Field(description="The program's exit code; -1 if the run failed or "
                                        "timed out")
    execution_time: float = Field(description="seconds")
    language: str
    session_id: str | None = None


class BatchResponse(RootModel[list[ExecuteResponse]]):
    pass


class ExecutionStatus(BaseModel):
    execution_id: str
    status: str = Field(description="pending, running, completed or failed")
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    result: ExecuteResponse | None = None
    error: str | None = Field(None, description="why a failed execution failed")


class LanguageInfo(BaseModel):
    language: str
    available: bool = Field(description="whether this server has the language's toolchain")
    toolchain: list[str]
    kernelspec: str
    file_extension: str
    docker_image: str | None = Field(None, description="always null: kernels, not containers")
    default_execution_time: float
    max_execution_time: float
    max_memory: str
    max_cpu: float | None = None


class Message(BaseModel):
    message: str
