"""The ``kernel-bridge`` command: serve, doctor, keys, kernelspecs, settings, run."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bridge import __version__
from bridge.errors import AuthFailed, StartupRefused
from bridge.keypairs import Keypairs
from bridge.sandbox import SandboxUnavailable
from bridge.settings import Settings
from bridge.store import store_for

# Options that set a Settings field, by field name: settings errors name the flag the user gave.
_FLAGS = {"host": "--host", "port": "--port", "data_dir": "--data-dir"}


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_sandbox", False):
        overrides["sandbox"] = "off"
    if getattr(args, "keep_kernels", False):
        overrides["keep_kernels"] = True
    return Settings(**overrides)


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    action, as_json = args.action, getattr(args, "json", False)
    if not settings.database_url:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds secrets
    store = store_for(settings)  # PostgreSQL with KB_DATABASE_URL: what the replicas read
    await store.open()
    try:
        keypairs = Keypairs(store, settings.default_concurrency)
        await keypairs.load()
        if action in ("activate", "deactivate"):
            await keypairs.set_active(args.access_key, action == "activate")
            print(f"{args.access_key}: {'active' if action == 'activate' else 'inactive'}")
        elif action == "set-concurrency":
            await keypairs.set_concurrency(args.access_key, args.concurrency)
            print(f"{args.access_key}: concurrency={args.concurrency}")
        elif action == "create":
            kp = await keypairs.create(args.concurrency)
            if as_json:
                print(json.dumps({"access_key": kp.access_key, "secret_key": kp.secret_key}))
            else:
                print(f"access_key: {kp.access_key}\nsecret_key: {kp.secret_key}")
        else:
            rows = [{"accessKey": k.access_key, "isActive": k.is_active,
                     "concurrency": k.concurrency, "totalQueries": k.total_queries,
                     "created": k.created} for k in keypairs.all()]
            if as_json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    print(f"{r['accessKey']}  active={r['isActive']}  "
                          f"concurrency={r['concurrency']}  queries={r['totalQueries']}")
    finally:
        await store.close()
    return 0


async def _import_sqlite(settings: Settings, source: Path) -> int:
    from bridge.store.copy import import_sqlite

    if not source.is_file():
        print(f"kernel-bridge: {source}: no such file", file=sys.stderr)
        return 2
    store = store_for(settings)
    if not settings.database_url and source.resolve() == settings.db_path.resolve():
        print("kernel-bridge: that is this data dir's own database", file=sys.stderr)
        return 2
    await store.open()
    try:
        copied = await import_sqlite(source, store)
    except sqlite3.Error as exc:
        print(f"kernel-bridge: {source}: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()
    for table, (n, of) in copied.items():
        print(f"{table}: {n} copied of {of}")
    return 0


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _data_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="database, session dirs and folders (default: $KB_DATA_DIR, else "
                        "~/.local/share/kernel-bridge)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kernel-bridge",
        description="A code-execution server: runs code in sandboxed Jupyter kernels and speaks "
                    "the Backend.AI, Sandbox execute, job sessions and Jupyter APIs. Settings "
                    "come from KB_* environment variables (kernel-bridge settings lists them).",
        epilog="Run 'kernel-bridge COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"kernel-bridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="start the server (blocks until Ctrl-C)",
        description="Start the server. On an empty data dir it creates a keypair and prints it "
                    "once; later starts print how to make another.")
    serve.add_argument("--host", help="address to listen on (default: $KB_HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int,
                       help="TCP port to listen on (default: $KB_PORT, else 8002)")
    _data_dir_option(serve)
    serve.add_argument("--no-sandbox", action="store_true",
                       help="run kernels unconfined (unsafe; for machines without bubblewrap; "
                            "same as KB_SANDBOX=off)")
    serve.add_argument("--keep-kernels", action="store_true",
                       help="on stop, leave kernels running for the next server on this data "
                            "dir (upgrades; same as KB_KEEP_KERNELS=true)")
    serve.add_argument("--unsafe", action="store_true",
                       help="start even when a doctor check fails (each is printed)")
    doctor = sub.add_parser("doctor", help="check that this machine can run the server safely",
                            description="One line per check; exit 0 only when the server can "
                                        "run safely.")
    _data_dir_option(doctor)

    keys = sub.add_parser("keys", help="manage keypairs (create, list, activate, concurrency)",
                          description="Manage the keypairs that clients authenticate with. A "
                                      "running server sees changes within 5 seconds.")
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="make a keypair and print it (shown once)",
                                 description="Make a keypair and print its access and secret "
                                             "keys. The secret is not shown again.")
    create.add_argument("--concurrency", type=_positive, metavar="N",
                        help="sessions it may hold at once (default: $KB_DEFAULT_CONCURRENCY, "
                             "else 5)")
    listing = keys_sub.add_parser("list", help="list keypairs (no secrets)",
                                  description="List keypairs: access key, active, concurrency, "
                                              "queries run. Secrets are never listed.")
    for k in (create, listing):
        _data_dir_option(k)
        k.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (("activate", "let a deactivated keypair authenticate again"),
                         ("deactivate", "refuse the keypair everywhere (401); its sessions "
                                        "run on")):
        k = keys_sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        k.add_argument("access_key", metavar="ACCESS_KEY", help="the keypair's access key")
        _data_dir_option(k)
    conc = keys_sub.add_parser("set-concurrency", help="change how many sessions a keypair may "
                                                       "hold at once",
                               description="Change how many sessions a keypair may hold at "
                                           "once. Running sessions are not stopped.")
    conc.add_argument("access_key", metavar="ACCESS_KEY", help="the keypair's access key")
    conc.add_argument("concurrency", type=_positive, metavar="N",
                      help="sessions it may hold at once (at least 1)")
    _data_dir_option(conc)

    db = sub.add_parser("db", help="the database (KB_DATABASE_URL, else the data dir's SQLite)",
                        description="Work on the database the server uses.")
    db_sub = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = db_sub.add_parser(
        "import-sqlite", help="copy a SQLite file's keypairs and folders into this database",
        description="Copy the keypairs and folder records of a kernel-bridge SQLite file (an "
                    "old data dir's kernel-bridge.sqlite3) into the database the server uses "
                    "(PostgreSQL with KB_DATABASE_URL). Keys already there are kept as they "
                    "are; sessions, runs and history are not copied.")
    imp.add_argument("sqlite", type=Path, metavar="FILE", help="the SQLite file to read")
    _data_dir_option(imp)

    specs = sub.add_parser("kernelspecs", help="install the shipped kernels into Jupyter",
                           description="Install kernel-bridge's kernels into a Jupyter, so "
                                       "JupyterLab users get the same kernels.")
    specs_sub = specs.add_subparsers(dest="action", required=True, metavar="ACTION")
    inst = specs_sub.add_parser("install", help="write the kernelspecs",
                                description="Write the kernelspecs (default: --user).")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into ~/.local/share/jupyter")
    where.add_argument("--sys-prefix", action="store_true", help="into this environment")
    where.add_argument("--prefix", help="into PREFIX/share/jupyter")

    settings = sub.add_parser("settings", help="list the KB_* settings and their defaults",
                              description="List every KB_* setting with its default.")
    settings.add_argument("--markdown", action="store_true",
                          help="as the README's Markdown table (the default output)")
    from .jupyter.run import add_parser as add_run_parser

    add_run_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "settings":
        from .settings_doc import markdown_table

        sys.stdout.write(markdown_table())
        return 0
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        from .settings_doc import describe_error

        given = {f: flag for f, flag in _FLAGS.items() if getattr(args, f, None) is not None}
        print(f"kernel-bridge: bad setting: {describe_error(exc, given)}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, settings)
    except SandboxUnavailable as exc:  # serve, or run with an embedded bridge
        print(f"kernel-bridge: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        from .server import run

        return run(settings, unsafe=args.unsafe)
    if args.command == "doctor":
        from bridge import doctor

        report = doctor.run(settings)
        for check in report.checks:
            print(check.line())
        verdict = "safe to serve" if report.safe else \
            f"NOT safe to serve: {len(report.failures())} check(s) failed"
        print(f"{verdict} ({report.seconds:.2f} s)")
        return 0 if report.safe else 1
    if args.command == "run":
        from .jupyter.run import main as run_notebook

        return run_notebook(args)
    if args.command == "kernelspecs":
        from bridge.kernels import install_kernelspecs

        prefix = sys.prefix if args.sys_prefix else args.prefix
        for name, path in install_kernelspecs(user=args.user, prefix=prefix):
            print(f"installed {name} in {path}")
        return 0
    try:
        if args.command == "db":
            return asyncio.run(_import_sqlite(settings, args.sqlite))
        return asyncio.run(_keys(settings, args))
    except StartupRefused as exc:  # the database cannot be reached or is too new
        print(f"kernel-bridge: {exc}", file=sys.stderr)
        return 2
    except AuthFailed:
        print(f"kernel-bridge: no keypair {args.access_key!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
