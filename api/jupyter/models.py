"""Request and response bodies of the Jupyter dialect."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Loose(BaseModel):
    # jupyter_server and JupyterLab send more than we read (path, type, kernel ids): accept it.
    model_config = ConfigDict(extra="allow")


class StartKernel(Loose):
    # jupyter_server's own POST /api/kernels body has these; a gateway has no use for them.
    ignored_fields: ClassVar[frozenset[str]] = frozenset({"path", "type", "id"})

    name: str | None = Field(
        default=None, description="kernelspec name (python3, kb-python, kb-bash, …); default "
        "python3", examples=["python3"])
    env: dict[str, Any] | None = Field(
        default=None, description="environment for the kernel; only KERNEL_* and JPY_* pass",
        examples=[{"KERNEL_USERNAME": "ada"}])


class KernelModel(BaseModel):
    id: str = Field(description="The kernel's id (its session's id).",
                    examples=["3f2b8c1e-0d4a-4e5b-9c6d-7e8f9a0b1c2d"])
    name: str = Field(description="Its kernelspec.", examples=["kb-python"])
    last_activity: str = Field(description="Last message (ISO 8601, UTC).",
                               examples=["2026-12-01T00:00:00.000000Z"])
    execution_state: str = Field(description="idle, busy, starting, restarting or dead.",
                                 examples=["idle"])
    connections: int = Field(description="Open WebSocket connections.", examples=[1])


class ExecuteNotebook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    notebook: dict[str, Any] = Field(description="an nbformat 4 notebook", examples=[{
        "nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
            {"cell_type": "code", "source": "print(1)", "metadata": {}, "outputs": [],
             "execution_count": None}]}])
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="injected after the cell tagged 'parameters'",
        examples=[{"x": 40}])
    timeout: float | None = Field(default=None, gt=0, le=3600, description="seconds per cell",
                                  examples=[60])
    allow_errors: bool = Field(default=False, description="Run on after a cell's error.",
                               examples=[False])
    language: str | None = Field(default=None, description="overrides the notebook's "
                                 "kernelspec", examples=["python"])
    session_id: str | None = Field(default=None, description="run in this existing session",
                                   examples=[None])


class CellError(BaseModel):
    cell_index: int = Field(description="The failing cell's index.", examples=[2])
    ename: str = Field(description="Exception name.", examples=["ZeroDivisionError"])
    evalue: str = Field(description="Exception value.", examples=["division by zero"])
    traceback: list[str] = Field(description="Traceback lines, without ANSI codes.",
                                 examples=[["ZeroDivisionError: division by zero"]])


class NotebookResponse(BaseModel):
    status: str = Field(description="completed or failed", examples=["completed"])
    notebook: dict[str, Any] = Field(description="The executed notebook, outputs filled in.",
                                     examples=[{"nbformat": 4, "nbformat_minor": 5,
                                                "metadata": {}, "cells": []}])
    error: CellError | None = Field(description="The cell that stopped the run, if any.")
    errors: list[int] = Field(description="cells with an error output", examples=[[]])
    duration: float = Field(description="Seconds the run took.", examples=[1.2])
