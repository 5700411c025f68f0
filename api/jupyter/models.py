"""Request and response bodies of the Jupyter dialect."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Loose(BaseModel):
    # jupyter_server and JupyterLab send more than we read (path, type, kernel ids): accept it.
    model_config = ConfigDict(extra="allow")


class StartKernel(Loose):
    name: str | None = Field(
        None, description="kernelspec name (python3, kb-python, kb-bash, …); default python3")
    env: dict[str, Any] | None = Field(
        None, description="environment for the kernel; only KERNEL_* and JPY_* pass")


class KernelModel(BaseModel):
    id: str
    name: str
    last_activity: str
    execution_state: str
    connections: int


class ExecuteNotebook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    notebook: dict[str, Any] = Field(description="an nbformat 4 notebook")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="injected after the cell tagged 'parameters'")
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds per cell")
    allow_errors: bool = False
    language: str | None = Field(None, description="overrides the notebook's kernelspec")
    session_id: str | None = Field(None, description="run in this existing session")


class CellError(BaseModel):
    cell_index: int
    ename: str
    evalue: str
    traceback: list[str]


class NotebookResponse(BaseModel):
    status: str = Field(description="completed or failed")
    notebook: dict[str, Any]
    error: CellError | None
    errors: list[int] = Field(description="cells with an error output")
    duration: float
