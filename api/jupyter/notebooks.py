"""``POST /api/v1/notebooks/execute``: a notebook in, the executed notebook out.

The body is either ``{"notebook": …, "parameters": …, …}`` or a bare nbformat document
(``curl --data-binary @nb.ipynb``); either way, query arguments other than ``progress`` and
``token`` are parameters too (``?x=40&name=abc``), each value parsed as a Python literal where
it parses and kept as a string otherwise, and they win over the body's.

With ``?progress=1`` the answer is streamed as NDJSON: one ``{"event": "cell", …}`` line per
cell as it finishes, then ``{"event": "result", …}`` (or ``{"event": "error", …}`` for a failure
after the stream began). ``kernel-bridge run --url`` reads it to draw its progress bar.
"""

from __future__ import annotations

import ast
import asyncio
import json
from typing import Any

from nbformat import NotebookNode

from bridge.errors import BridgeError
from bridge.notebooks import NotebookResult, parse, run_notebook

from ..openapi import Operation
from .base import JupyterHandler
from .models import ExecuteNotebook, NotebookResponse


def result_body(result: NotebookResult) -> dict[str, Any]:
    return {"status": result.status, "notebook": result.notebook,
            "error": result.failure.as_dict() if result.failure else None,
            "errors": result.errors, "duration": round(result.duration, 3)}


# Query arguments that are not notebook parameters: the call's option, and the credential a
# browser or WebSocket client may send as ?token= (api/auth.py).
OPTIONS = frozenset({"progress", "token"})


def literal(text: str) -> Any:
    """A query value as papermill's ``-p`` reads it: a Python literal if it is one
    (``40``, ``2.5``, ``True``, ``[1, 2]``, ``'x'``), else the string itself (``abc``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def is_bare_notebook(data: Any) -> bool:
    """An nbformat document rather than our request object: it has cells, not a notebook."""
    return isinstance(data, dict) and "notebook" not in data and (
        "cells" in data or "nbformat" in data or "worksheets" in data)


class ExecuteNotebookHandler(JupyterHandler):
    admits = True

    async def post(self) -> None:
        """Execute a notebook: 200 with the executed notebook (status completed or failed).
        400 bad notebook or parameters, 403 over quota, 404 no such session."""
        data = self.json_object(allow_empty=False)
        body = self.parse(ExecuteNotebook, {"notebook": data} if is_bare_notebook(data) else data)
        query = {k: literal(self.get_query_argument(k))
                 for k in self.request.query_arguments if k not in OPTIONS}
        if query:
            body = body.model_copy(update={"parameters": {**body.parameters, **query}})
        nb = parse(body.notebook)
        stream = self.get_query_argument("progress", "") in ("1", "true")
        if not stream:
            result = await self._run(body, nb, None)
            self.send(result_body(result))
            return
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def progress(done: int, total: int, cell: NotebookNode) -> None:
            lines.put_nowait({"event": "cell", "done": done, "total": total,
                              "cell_type": cell.cell_type,
                              "execution_count": cell.get("execution_count")})

        task = asyncio.create_task(self._run(body, nb, progress))
        task.add_done_callback(lambda _: lines.put_nowait(None))
        started = False
        while (line := await lines.get()) is not None:
            if not started:
                self.set_header("Content-Type", "application/x-ndjson")
                started = True
            self.write(json.dumps(line) + "\n")
            await self.flush()
        exc = task.exception()
        if exc is not None:
            if not started:
                raise exc  # nothing sent yet: a plain error answer in the dialect's shape
            message = exc.message if isinstance(exc, BridgeError) else "internal error"
            self.finish(json.dumps({"event": "error", "message": message}) + "\n")
            return
        self.set_header("Content-Type", "application/x-ndjson")
        self.finish(json.dumps({"event": "result", **result_body(task.result())}) + "\n")

    async def _run(self, body: ExecuteNotebook, nb: NotebookNode,
                   progress: Any) -> NotebookResult:
        return await run_notebook(
            self.bridge.sessions, self.keypair.access_key, nb, parameters=body.parameters,
            language=body.language, session_id=body.session_id, timeout=body.timeout,
            allow_errors=body.allow_errors, progress=progress)


NOTEBOOK_OPERATIONS = [
    Operation("POST", "/api/v1/notebooks/execute", "Execute a notebook (papermill-style "
              "parameters; the body may also be a bare .ipynb with parameters in the query "
              "string, ?x=40&name=abc; ?progress=1 streams NDJSON per cell)", "jupyter",
              ExecuteNotebook,
              NotebookResponse, 200, (400, 401, 403, 404), query=("progress",)),
]
