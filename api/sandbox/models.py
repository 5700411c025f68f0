"""Bodies of the Sandbox dialect, field for field as Nadoo Sandbox's ``ExecuteRequest``,
``ExecuteResponse`` and ``ExecutionStatus`` (reference/seeds_origin.md, Document A)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, RootModel

from bridge import testcases
from bridge.executions import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S


class TestCase(BaseModel):
    """One input to judge the program on; it runs in a fresh process under its own limits."""

    model_config = ConfigDict(extra="forbid")
    __test__ = False  # not a pytest class, whatever its name

    stdin: str = Field("", description="the program's standard input")
    expected_output: str | None = Field(
        None, description="compared with stdout after trimming trailing whitespace of each "
        "line (and trailing empty lines); omitted: the case is 'ok' when it runs cleanly")
    timeout: float = Field(testcases.DEFAULT_CASE_TIMEOUT_S, gt=0,
                           le=testcases.MAX_CASE_TIMEOUT_S,
                           description="seconds of CPU time of the case's process tree (a "
                           "wall-clock guard of 3x + 1 s ends one that sleeps)")
    memory_mb: int = Field(testcases.DEFAULT_MEMORY_MB, ge=testcases.MIN_MEMORY_MB,
                           description="peak resident memory of the case's process tree, MiB")


class TestResult(BaseModel):
    status: str = Field(description="accepted, wrong_answer, time_limit_exceeded, "
                        "memory_limit_exceeded, runtime_error, compile_error, or ok (ran "
                        "cleanly, no expected output given)")
    stdout: str
    stderr: str
    exit_code: int | None = Field(description="the process's exit code (128 + n after signal "
                                  "n); null when the case did not run")
    signal: int | None = Field(None, description="the signal that ended the process, if any")
    time_ms: int = Field(description="CPU time (user + system) of the case's process tree")
    memory_kb: int = Field(description="peak resident memory of the case's process tree")


class ExecuteRequest(BaseModel):
    # FastAPI ignores fields it does not know; so do we.
    model_config = ConfigDict(extra="ignore")

    code: str
    language: str = Field(min_length=1)
    stdin: str | None = None
    environment: dict[str, str] | None = None
    # Seconds. Nadoo documents "default 30, max 300"; above the max is a body that does not
    # validate (422), as FastAPI answers for a `le=` bound. Fractions are accepted.
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S)
    session_id: str | None = Field(None, min_length=1, max_length=128)
    test_cases: list[TestCase] | None = Field(
        None, max_length=testcases.MAX_CASES,
        description="judge mode: build once, run once per case (at most "
        f"{testcases.MAX_CASES}); the result's test_results has one entry per case")


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
    reason: str = Field("completed", description="why it ended: completed, runtime_error, "
                        "compile_error, timeout, memory_limit (the memory cap's OOM killer) or "
                        "killed (a signal from outside, a dead kernel)")
    signal: int | None = Field(None, description="the signal that ended the program, if one "
                               "did")
    compile_stdout: str | None = Field(None, description="the compiler's stdout (compiled "
                                       "languages; empty when a cached build was reused)")
    compile_stderr: str | None = Field(None, description="the compiler's stderr; the run's "
                                       "stderr no longer carries it")
    test_results: list[TestResult] | None = Field(
        None, description="with test_cases: one result per case, in order. stdout, stderr "
        "and exit_code above are then the build's (empty and 0 for interpreted languages)")


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
