"""Notebook execution in the core: parameters injected papermill-style, cells run by nbclient
against a session's kernel, a per-cell timeout, and a progress callback per cell.

nbclient's own kernel set-up (``async_setup_kernel``) installs SIGINT/SIGTERM handlers on the
running loop, which would take the server's shutdown signals away; so the kernel and client are
handed in ready, and cells are executed one by one with ``async_execute_cell``.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbformat import NotebookNode
from nbformat.warnings import MissingIDFieldWarning

from .errors import InvalidRequest
from .gateway import language_of_spec, open_client
from .languages import Language, require_available
from .session import Session
from .sessions import Sessions
from .wire import guard

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# (done, total, cell): called after every cell, executed or not.
Progress = Callable[[int, int, NotebookNode], None]


class InvalidNotebook(InvalidRequest):
    pass


@dataclass
class CellFailure:
    index: int
    ename: str
    evalue: str
    traceback: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"cell_index": self.index, "ename": self.ename, "evalue": self.evalue,
                "traceback": self.traceback}


@dataclass
class NotebookResult:
    notebook: NotebookNode
    failure: CellFailure | None
    duration: float
    errors: list[int] = field(default_factory=list)  # cells with an error output (allow_errors)

    @property
    def status(self) -> str:
        return "failed" if self.failure is not None else "completed"


def parse(data: Any) -> NotebookNode:
    """A notebook from its JSON (a dict or a string), upgraded to nbformat 4 and validated.

    Raises InvalidNotebook.
    """
    try:
        text = data if isinstance(data, str) else json.dumps(data)
        with warnings.catch_warnings():  # missing ids are added just below
            warnings.simplefilter("ignore", MissingIDFieldWarning)
            nb: NotebookNode = nbformat.reads(text, as_version=4)  # type: ignore[no-untyped-call]
        # Cell ids are required from nbformat 4.5 on; older notebooks get them, as Jupyter does.
        if any("id" not in cell for cell in nb.cells):
            nb.nbformat_minor = max(nb.nbformat_minor, 5)
            for cell in nb.cells:
                cell.setdefault("id", uuid.uuid4().hex[:12])
        nbformat.validate(nb)
    except Exception as exc:
        raise InvalidNotebook(f"Not a valid notebook: {str(exc).splitlines()[0]}") from None
    return nb


def language_of(nb: NotebookNode, override: str | None = None) -> Language:
    """The language to run ``nb`` in: ``override``, else its kernelspec, else python.

    Raises UnknownLanguage.
    """
    meta = nb.metadata
    name = override or meta.get("kernelspec", {}).get("name") \
        or meta.get("language_info", {}).get("name") or "python"
    return language_of_spec(str(name))


def literal(value: Any, language: str) -> str:
    """``value`` as a literal of ``language``. Raises InvalidRequest."""
    if language == "python":
        return repr(value)
    if language == "javascript":
        return json.dumps(value)
    if language == "bash":
        if isinstance(value, bool):
            value = "true" if value else "false"
        return shlex.quote("" if value is None else str(value))
    raise InvalidRequest(f"Parameters are not supported for {language} notebooks.")


def parameters_cell(parameters: dict[str, Any], language: Language) -> NotebookNode:
    lines = ["# Parameters"]
    for name, value in parameters.items():
        if not name.isidentifier():
            raise InvalidRequest(f"Parameter name {name!r} is not an identifier.")
        lit = literal(value, language.name)
        if language.name == "javascript":
            lines.append(f"var {name} = {lit};")
        elif language.name == "bash":
            lines.append(f"{name}={lit}")
        else:
            lines.append(f"{name} = {lit}")
    source = "\n".join(lines)
    cell: NotebookNode = nbformat.v4.new_code_cell(source)  # type: ignore[no-untyped-call]
    cell.metadata["tags"] = [INJECTED_TAG]
    return cell


def inject_parameters(nb: NotebookNode, parameters: dict[str, Any],
                      language: Language) -> NotebookNode:
    """Put a cell assigning ``parameters`` after the cell tagged ``parameters`` (else first),
    replacing a previously injected one, as papermill does. Raises InvalidRequest."""
    if not parameters:
        return nb
    cell = parameters_cell(parameters, language)
    cells = [c for c in nb.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    at = next((i + 1 for i, c in enumerate(cells)
               if PARAMETERS_TAG in c.metadata.get("tags", [])), 0)
    cells.insert(at, cell)
    nb.cells = cells
    nb.metadata.setdefault("kernel_bridge", {})["parameters"] = parameters
    return nb


def _error_output(cell: NotebookNode) -> NotebookNode | None:
    return next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)


def _failure(index: int, cell: NotebookNode, exc: Exception) -> CellFailure:
    out = _error_output(cell)
    if out is not None:
        return CellFailure(index, out.ename, out.evalue,
                           [_ANSI.sub("", line) for line in out.traceback])
    if isinstance(exc, CellExecutionError):
        return CellFailure(index, exc.ename, exc.evalue, _ANSI.sub("", str(exc)).splitlines())
    return CellFailure(index, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                       [])


async def execute(nb: NotebookNode, session: Session, *, timeout: float | None = None,
                  allow_errors: bool = False, progress: Progress | None = None) -> NotebookResult:
    """Run every cell of ``nb`` on the session's kernel (in place). A cell error stops the run
    unless ``allow_errors``; a cell past ``timeout`` seconds is interrupted and ends the run.

    Raises KernelDied when the session has no running kernel.
    """
    kernel = session.require_main().kernel  # Raises KernelDied
    started = time.monotonic()
    kc = await open_client(kernel)
    guards = guard(kc, ("shell", "iopub", "stdin", "control"))  # see bridge/wire.py
    # nbclient's timeout is a whole number of seconds (an Integer trait): round a fraction up.
    cell_timeout = None if timeout is None else max(1, math.ceil(timeout))
    client = NotebookClient(nb, km=kernel.manager, timeout=cell_timeout,
                            allow_errors=allow_errors,
                            interrupt_on_timeout=False, record_timing=True)
    client.kc = kc
    client.reset_execution_trackers()
    failure: CellFailure | None = None
    try:
        with session.hold():  # a long notebook is not idleness
            total = len(nb.cells)
            for index, cell in enumerate(nb.cells):
                session.touch()
                try:
                    await client.async_execute_cell(cell, index,
                                                    execution_count=client.code_cells_executed + 1)
                except CellTimeoutError as exc:
                    await kernel.interrupt()
                    failure = CellFailure(index, "CellTimeoutError",
                                          f"Cell {index} did not finish within {timeout} s.",
                                          [str(exc).splitlines()[0]])
                except (CellExecutionError, DeadKernelError) as exc:
                    failure = _failure(index, cell, exc)
                if progress is not None:
                    progress(index + 1, total, cell)
                if failure is not None:
                    break
    finally:
        for task in guards:
            task.cancel()
        kc.stop_channels()
    errors = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and _error_output(c)]
    return NotebookResult(nb, failure, time.monotonic() - started, errors)


async def run_notebook(sessions: Sessions, access_key: str, nb: NotebookNode, *,
                       parameters: dict[str, Any] | None = None, language: str | None = None,
                       session_id: str | None = None, timeout: float | None = None,
                       allow_errors: bool = False,
                       progress: Progress | None = None) -> NotebookResult:
    """Inject ``parameters`` and execute ``nb``: in the keypair's session ``session_id``, or in a
    new session of the notebook's language that ends with the run.

    Raises UnknownLanguage, SessionNotFound, QuotaExceeded, KernelStartFailed, KernelDied.
    """
    if session_id is not None:
        session = sessions.get(access_key, session_id)
        inject_parameters(nb, parameters or {}, session.language)
        return await execute(nb, session, timeout=timeout, allow_errors=allow_errors,
                             progress=progress)
    lang = require_available(language_of(nb, language))
    inject_parameters(nb, parameters or {}, lang)
    session = await sessions.create(access_key, lang, origin="notebook")
    try:
        return await execute(nb, session, timeout=timeout, allow_errors=allow_errors,
                             progress=progress)
    finally:
        await sessions.discard(session, "notebook-finished")  # unless culled meanwhile
