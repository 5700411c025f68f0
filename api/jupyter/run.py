"""``kernel-bridge run NOTEBOOK [-o OUT] [-p name=value …] [--url URL --api-key KEY]``.

With ``--url`` the notebook runs on that server (``POST /api/v1/notebooks/execute?progress=1``,
whose NDJSON lines drive the progress bar); without, on an embedded bridge in a throw-away data
dir, with the same sandbox and the same core code. Exit 0 when every cell ran, 1 when a cell
failed (named, with its traceback, on stderr), 2 for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import BridgeError

if TYPE_CHECKING:
    from tqdm import tqdm

# nbclient, tqdm and the core load only when a notebook runs: `kernel-bridge serve` and
# `keys` parse the same command line and should not pay for them.


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="execute a notebook (embedded, or on a server with --url)")
    run.add_argument("notebook", type=Path, help="the .ipynb file to execute")
    run.add_argument("-o", "--output", help="where to write the executed notebook ('-' for "
                     "stdout; default NOTEBOOK.executed.ipynb)")
    run.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                     help="injected after the cell tagged 'parameters' (repeatable)")
    run.add_argument("--url", help="a running kernel-bridge, e.g. http://127.0.0.1:8002")
    run.add_argument("--api-key", default=os.environ.get("KB_API_KEY"),
                     help="the secret key for --url (default: $KB_API_KEY)")
    run.add_argument("--timeout", type=float, help="seconds per cell (default: no limit)")
    run.add_argument("--allow-errors", action="store_true", help="keep going after a cell error")
    run.add_argument("--language", help="override the notebook's kernelspec")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)


def value_of(raw: str) -> Any:
    """A ``-p`` value as papermill reads it: int, float, bool, None, else the string."""
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"True": True, "true": True, "False": False, "false": False,
            "None": None, "none": None}.get(raw, raw)


def parameters_of(pairs: list[str]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"-p {pair!r}: expected NAME=VALUE")
        params[name.strip()] = value_of(raw)
    return params


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        params = parameters_of(args.parameter)
        nb_json = json.loads(args.notebook.read_text())
    except (OSError, ValueError) as exc:
        print(f"kernel-bridge run: {exc}", file=sys.stderr)
        return 2
    bar = tqdm(total=len(nb_json.get("cells", [])), unit="cell", desc=args.notebook.name,
               disable=args.no_progress, file=sys.stderr)
    try:
        if args.url:
            body = _remote(args, nb_json, params, bar)
        else:
            body = _with_stdout_on_stderr(
                lambda: asyncio.run(_embedded(args, nb_json, params, bar)))
    except (BridgeError, RemoteError) as exc:
        bar.close()
        print(f"kernel-bridge run: {exc}", file=sys.stderr)
        return 2
    bar.close()
    out = json.dumps(body["notebook"], indent=1, ensure_ascii=False) + "\n"
    target = args.output or str(args.notebook.with_suffix(".executed.ipynb"))
    if target == "-":
        sys.stdout.write(out)
    else:
        Path(target).write_text(out)
    error = body.get("error")
    if error:
        print(f"Cell {error['cell_index']} failed: {error['ename']}: {error['evalue']}",
              file=sys.stderr)
        print("\n".join(error["traceback"]), file=sys.stderr)
        return 1
    return 0


async def _embedded(args: argparse.Namespace, nb_json: dict[str, Any], params: dict[str, Any],
                    bar: tqdm[Any]) -> dict[str, Any]:
    from api.jupyter.notebooks import result_body
    from bridge.notebooks import parse, run_notebook
    from bridge.service import Bridge
    from bridge.settings import Settings

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kb-run-") as tmp:
        # A throw-away data dir and no warm pool: one session, then gone.
        overrides: dict[str, Any] = {"data_dir": args.data_dir or Path(tmp) / "data",
                                     "pool_python": 0}
        settings = Settings(**overrides)
        bridge = Bridge(settings)
        started = await bridge.start()
        try:
            kp = started.first_keypair or bridge.keypairs.all()[0]
            result = await run_notebook(
                bridge.sessions, kp.access_key, parse(nb_json), parameters=params,
                language=args.language, timeout=args.timeout, allow_errors=args.allow_errors,
                progress=lambda done, total, cell: _advance(bar, done, total))
        finally:
            await bridge.stop()
    return dict(json.loads(json.dumps(result_body(result), default=str)))


def _advance(bar: tqdm[Any], done: int, total: int) -> None:
    bar.total = total  # the injected parameters cell counts too
    bar.update(done - bar.n)


def _with_stdout_on_stderr(fn: Any) -> Any:
    """Kernel processes inherit fd 1 and print banners there; keep stdout for ``-o -``."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return fn()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class RemoteError(Exception):
    pass


def _remote(args: argparse.Namespace, nb_json: dict[str, Any], params: dict[str, Any],
            bar: tqdm[Any]) -> dict[str, Any]:
    payload = {"notebook": nb_json, "parameters": params, "allow_errors": args.allow_errors}
    if args.timeout:
        payload["timeout"] = args.timeout
    if args.language:
        payload["language"] = args.language
    req = urllib.request.Request(
        args.url.rstrip("/") + "/api/v1/notebooks/execute?progress=1",
        data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": args.api_key or ""})
    try:
        with urllib.request.urlopen(req) as resp:
            for raw in resp:
                line = json.loads(raw)
                if line["event"] == "cell":
                    _advance(bar, line["done"], line["total"])
                elif line["event"] == "error":
                    raise RemoteError(line["message"])
                elif line["event"] == "result":
                    return dict(line)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError):
            detail = json.loads(detail)["message"]
        raise RemoteError(f"{exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise RemoteError(f"cannot reach {args.url}: {exc.reason}") from None
    raise RemoteError("the server ended the answer without a result")
