"""Bodies of the Sandbox dialect, field for field as Nadoo Sandbox's ``ExecuteRequest``,
``ExecuteResponse`` and ``ExecutionStatus`` (reference/seeds_origin.md, Document A)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, RootModel

from bridge import testcases
from bridge.executions import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S


class TestCase(BaseModel):
    """One input to judge the program on; it runs in a fresh process under its own limits."""

    model_config = ConfigDict(extra="forbid", title="SandboxTestCase")
    __test__ = False  # not a pytest class, whatever its name

    stdin: str = Field("", description="The program's standard input for this case.",
                       examples=["2 3\n"])
    expected_output: str | None = Field(
        None, description="Compared with stdout after trimming trailing whitespace of each "
        "line (and trailing empty lines); omitted: the case is 'ok' when it runs cleanly.",
        examples=["5\n"])
    timeout: float = Field(testcases.DEFAULT_CASE_TIMEOUT_S, gt=0,
                           le=testcases.MAX_CASE_TIMEOUT_S,
                           description="Seconds of CPU time of the case's process tree (a "
                           "wall-clock guard of 3x + 1 s ends one that sleeps).", examples=[2])
    memory_mb: int = Field(testcases.DEFAULT_MEMORY_MB, ge=testcases.MIN_MEMORY_MB,
                           description="Peak resident memory of the case's process tree, MiB.",
                           examples=[64])


class TestResult(BaseModel):
    """How one test case went."""

    model_config = ConfigDict(title="SandboxTestResult")
    __test__ = False

    status: str = Field(description="accepted, wrong_answer, time_limit_exceeded, "
                        "memory_limit_exceeded, runtime_error, compile_error, or ok (ran "
                        "cleanly, no expected output given).", examples=["accepted"])
    stdout: str = Field(description="What the case's process wrote to stdout.",
                        examples=["5\n"])
    stderr: str = Field(description="What it wrote to stderr.", examples=[""])
    exit_code: int | None = Field(description="The process's exit code (128 + n after signal "
                                  "n); null when the case did not run.", examples=[0])
    signal: int | None = Field(None, description="The signal that ended the process, if any.",
                               examples=[None])
    time_ms: int = Field(description="CPU time (user + system) of the case's process tree.",
                         examples=[2])
    memory_kb: int = Field(description="Peak resident memory of the case's process tree.",
                           examples=[1340])


class ExecuteRequest(BaseModel):
    # Closed: the seed's request model is complete and no client sends more, so a misspelt field
    # (`stdn` for `stdin`) is a 422 that names it rather than a silently ignored default.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"code": "print(input())", "language": "python", "stdin": "hello\n"}]})

    code: str = Field(description="The program to run.", examples=["print(6 * 7)"])
    language: str = Field(min_length=1, description="A language name or alias "
                          "(GET /api/v1/execute/languages).", examples=["python"])
    stdin: str | None = Field(None, description="Input for the program, read line by line by "
                              "input() and whole by sys.stdin; past its end programs read "
                              "end-of-file.", examples=["3\n4\n"])
    environment: dict[str, str] | None = Field(
        None, description="Environment variables for this execution only.",
        examples=[{"GREETING": "hi"}])
    # Seconds. Nadoo documents "default 30, max 300"; above the max is a body that does not
    # validate (422), as FastAPI answers for a `le=` bound. Fractions are accepted.
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S,
                           description="Seconds before the execution is stopped and fails.",
                           examples=[10])
    session_id: str | None = Field(
        None, min_length=1, max_length=128, description="Run in this keypair's session of that "
        "name (created on first use, state kept); none: a fresh kernel for this execution.",
        examples=["my-session"])
    test_cases: list[TestCase] | None = Field(
        None, max_length=testcases.MAX_CASES,
        description="Judge mode: build once, run once per case (at most "
        f"{testcases.MAX_CASES}); the result's test_results has one entry per case.")


class BatchRequest(RootModel[list[ExecuteRequest]]):
    """A JSON array of executions, run in order (at most 10: more is a 400)."""


class ExecuteResponse(BaseModel):
    """The result of one execution."""

    model_config = ConfigDict(title="SandboxExecuteResponse")

    execution_id: str = Field(description="This execution's id (UUID).",
                              examples=["0b5e4c7e-6a55-4f57-9d4e-1f2b3c4d5e6f"])
    stdout: str = Field(description="What the program wrote to stdout (up to KB_OUTPUT_LIMIT).",
                        examples=["42\n"])
    stderr: str = Field(description="What the program wrote to stderr, tracebacks and "
                        "kernel-bridge's notices included.", examples=[""])
    exit_code: int = Field(description="The program's exit code; -1 if the run failed or "
                                       "timed out", examples=[0])
    execution_time: float = Field(description="Seconds the execution ran.", examples=[0.012])
    language: str = Field(description="The language's canonical name.", examples=["python"])
    session_id: str | None = Field(None, description="The session it ran in, if one was named.",
                                   examples=[None])
    truncated: bool = Field(False, description="Output passed the server's output limit: the "
                            "rest was dropped, the run interrupted, and a notice added to "
                            "stderr.", examples=[False])
    reason: str = Field("completed", description="Why it ended: completed, runtime_error, "
                        "compile_error, timeout, memory_limit (the memory cap's OOM killer) or "
                        "killed (a signal from outside, a dead kernel).",
                        examples=["completed"])
    signal: int | None = Field(None, description="The signal that ended the program, if one "
                               "did.", examples=[None])
    compile_stdout: str | None = Field(None, description="The compiler's stdout (compiled "
                                       "languages; empty when a cached build was reused; null "
                                       "for interpreted ones).", examples=[None])
    compile_stderr: str | None = Field(None, description="The compiler's stderr; the run's "
                                       "stderr does not repeat it.", examples=[None])
    test_results: list[TestResult] | None = Field(
        None, description="With test_cases: one result per case, in order. stdout, stderr "
        "and exit_code above are then the build's (empty and 0 for interpreted languages).")


class BatchResponse(RootModel[list[ExecuteResponse]]):
    """The results, in the order of the request."""


class ExecutionStatus(BaseModel):
    """An asynchronous execution's state, and its result once it ended."""

    execution_id: str = Field(description="The execution's id (UUID).",
                              examples=["0b5e4c7e-6a55-4f57-9d4e-1f2b3c4d5e6f"])
    status: str = Field(description="pending, running, completed or failed",
                        examples=["completed"])
    created_at: str = Field(description="When it was accepted (ISO 8601, UTC).",
                            examples=["2026-12-01T00:00:00+00:00"])
    started_at: str | None = Field(None, description="When it started running.",
                                   examples=["2026-12-01T00:00:00.010000+00:00"])
    completed_at: str | None = Field(None, description="When it ended.",
                                     examples=["2026-12-01T00:00:00.050000+00:00"])
    result: ExecuteResponse | None = Field(None, description="The result, once it ended.")
    error: str | None = Field(None, description="why a failed execution failed",
                              examples=["Execution timed out after 30 s."])


class LanguageInfo(BaseModel):
    """One language's limits, and whether this server can run it now."""

    language: str = Field(description="The canonical name.", examples=["python"])
    available: bool = Field(description="whether this server has the language's toolchain",
                            examples=[True])
    version: str = Field(description="The toolchain's version, measured at start (unknown: "
                         "not installed).", examples=["3.11.7"])
    aliases: list[str] = Field(description="Other names this server accepts for it.",
                               examples=[["python3", "py"]])
    toolchain: list[str] = Field(description="The programs it needs.", examples=[["python3"]])
    kernelspec: str = Field(description="The Jupyter kernelspec that runs it.",
                            examples=["kb-python"])
    file_extension: str = Field(description="Source file suffix.", examples=[".py"])
    docker_image: str | None = Field(None, description="always null: kernels, not containers",
                                     examples=[None])
    default_execution_time: float = Field(description="Default timeout in seconds.",
                                          examples=[30])
    max_execution_time: float = Field(description="Largest timeout in seconds.", examples=[300])
    max_memory: str = Field(description="A kernel's memory cap.", examples=["1024m"])
    max_cpu: float | None = Field(default=None, examples=[None],
                                  description="CPU cap (none: kernels share the CPU).")


class Language(BaseModel):
    """A language this server runs, Piston-style."""

    language: str = Field(description="The canonical name.", examples=["python"])
    version: str = Field(description="The toolchain's version, measured at start.",
                         examples=["3.11.7"])
    aliases: list[str] = Field(description="Other names this server accepts for it.",
                               examples=[["python3", "py"]])


class LanguageList(RootModel[list[Language]]):
    """Every language whose toolchain is installed here."""


class Message(BaseModel):
    message: str = Field(description="What was done.", examples=["Session abc cleaned up"])
