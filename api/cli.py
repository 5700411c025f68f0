"""The ``kernel-bridge`` command: serve, doctor, keys, kernelspecs, run."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bridge.errors import AuthFailed
from bridge.keypairs import Keypairs
from bridge.sandbox import SandboxUnavailable
from bridge.settings import Settings
from bridge.store import Store


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    for name in ("host", "port", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_sandbox", False):
        overrides["sandbox"] = "off"
    return Settings(**overrides)


async def _keys(settings: Settings, action: str, as_json: bool, access_key: str = "") -> int:
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds secrets
    store = Store(settings.db_path)
    await store.open()
    try:
        keypairs = Keypairs(store, settings.default_concurrency)
        await keypairs.load()
        if action in ("activate", "deactivate"):
            await keypairs.set_active(access_key, action == "activate")
            print(f"{access_key}: {'active' if action == 'activate' else 'inactive'}")
        elif action == "create":
            kp = await keypairs.create()
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernel-bridge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--no-sandbox", action="store_true",
                       help="run kernels unconfined (unsafe; for machines without bubblewrap)")
    serve.add_argument("--unsafe", action="store_true",
                       help="start even when a `doctor` check fails (each is printed)")
    doctor = sub.add_parser("doctor", help="check that this machine can run the server safely")
    doctor.add_argument("--data-dir", type=Path)

    keys = sub.add_parser("keys", help="manage keypairs")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    for action in ("create", "list", "activate", "deactivate"):
        k = keys_sub.add_parser(action)
        k.add_argument("--data-dir", type=Path)
        k.add_argument("--json", action="store_true")
        if action in ("activate", "deactivate"):
            k.add_argument("access_key")
    specs = sub.add_parser("kernelspecs", help="install the shipped kernels into Jupyter")
    specs_sub = specs.add_subparsers(dest="action", required=True)
    inst = specs_sub.add_parser("install")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into ~/.local/share/jupyter")
    where.add_argument("--sys-prefix", action="store_true", help="into this environment")
    where.add_argument("--prefix", help="into PREFIX/share/jupyter")
    from .jupyter.run import add_parser as add_run_parser

    add_run_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"kernel-bridge: bad setting: {exc}", file=sys.stderr)
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
        return asyncio.run(_keys(settings, args.action, args.json,
                                 getattr(args, "access_key", "")))
    except AuthFailed:
        print(f"kernel-bridge: no keypair {args.access_key!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
