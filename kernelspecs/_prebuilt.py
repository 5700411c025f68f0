"""What the zygote's template works out once so that none of its kernels has to (issue 14).

* **Command lines.** ``IPKernelApp.parse_command_line`` builds a traitlets argparse loader over
  every configurable class on each start: about a fifth of a forked kernel's ``initialize()``.
  The command lines of the kernelspecs we ship are fixed but for the connection file, so the
  template parses each once
  (:func:`parse_shipped`) and a kernel started with one of them takes a copy of the result
  (:func:`use_parsed`). Any other command line (an operator's kernelspec) is parsed as before.
* **Module file names.** Every ``IPythonKernel`` lists the ``__file__`` of each loaded module
  (for its debugger). The template's ``__file__`` strings lie scattered over its heap, one on
  nearly every page of it, so that walk copied a page per module into each kernel (~0.7 MiB of
  its unique memory); :func:`pack_module_files` re-makes them one after another, on a few pages.
* **Regular expressions.** Modules compile most of their patterns lazily, through ``re``'s
  cache; the template compiles those its throwaway kernel compiled (:func:`learned_patterns`,
  :func:`compile_patterns`), so its kernels find them cached.

Runs in the template only before ``gc.freeze()``; creates no thread, zmq context or loop.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

SPECS = Path(__file__).resolve().parent / "specs"
CONNECTION_FILE = "{connection_file}"  # the placeholder as kernel.json spells it

# an app's arguments, CONNECTION_FILE for its connection file → the config they parse to
_PARSED: dict[tuple[str, ...], Any] = {}


def shipped_commands(modules: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(module, arguments) of each kernelspec we ship that runs one of ``modules`` with -m."""
    found = []
    for path in sorted(SPECS.glob("*/kernel.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            argv = json.loads(path.read_text())["argv"]
            if len(argv) > 3 and argv[1] == "-m" and argv[2] in modules:
                found.append((str(argv[2]), [str(a) for a in argv[3:]]))
    return found


def _key(args: list[str] | None) -> tuple[str, ...] | None:
    """The cache key of an app's command line: its connection file (the value of its one
    ``-f``) replaced by the placeholder. None without a single ``-f FILE``."""
    if args is None or args.count("-f") != 1 or args.index("-f") + 1 >= len(args):
        return None
    at = args.index("-f") + 1
    return (*args[:at], CONNECTION_FILE, *args[at + 1:])


def _assignments_only(key: tuple[str, ...]) -> bool:
    """Whether a command line holds only ``-f FILE`` and ``--Class.trait=value``: what the app
    parses alone (``--language c`` is the compiled kernel's own, which it strips first)."""
    at = key.index("-f")
    rest = key[:at] + key[at + 2:]
    return all(a.startswith("--") and "=" in a and "." in a.split("=", 1)[0] for a in rest)


def parse_shipped(modules: tuple[str, ...]) -> int:
    """Parse the shipped kernelspecs' command lines as their kernels' ``IPKernelApp`` would;
    → how many distinct ones."""
    from ipykernel.kernelapp import IPKernelApp

    for _module, args in shipped_commands(modules):
        key = _key(args)
        if key is None or key != tuple(args) or not _assignments_only(key) or key in _PARSED:
            continue  # kernel.json names the connection file by the placeholder
        app = IPKernelApp()  # type: ignore[no-untyped-call]  # a throwaway: the kernel makes its own
        try:
            app.parse_command_line(args)
        except (Exception, SystemExit):
            continue
        config = app.cli_config
        rest = copy.deepcopy(config)
        if rest.get("IPKernelApp", {}).pop("connection_file", None) != CONNECTION_FILE:
            continue
        if app.extra_args or CONNECTION_FILE in repr(rest):
            continue  # the placeholder must be the connection file and nothing else
        _PARSED[key] = config
    return len(_PARSED)


def use_parsed() -> None:
    """In a kernel, before its app starts: the app's ``parse_command_line`` takes a copy of
    the template's config when its command line is one the template parsed (once: any later
    call, and any other command line, parses as always)."""
    if not _PARSED:
        return
    from ipykernel.kernelapp import IPKernelApp

    def parse_command_line(self: IPKernelApp, argv: list[str] | None = None) -> None:
        del IPKernelApp.parse_command_line  # back to traitlets' own, for any later call
        if argv is None:  # as traitlets reads it (ipykernel_launcher passes none)
            argv = sys.argv[1:]
        key = _key(argv)
        config = _PARSED.get(key) if key is not None else None
        if config is None or type(self) is not IPKernelApp:
            self.parse_command_line(argv)
            return
        # What traitlets' Application.parse_command_line leaves behind for these arguments.
        self.argv = list(argv)
        self.cli_config = copy.deepcopy(config)
        self.cli_config.IPKernelApp.connection_file = argv[argv.index("-f") + 1]
        self.update_config(self.cli_config)
        self.extra_args = []

    IPKernelApp.parse_command_line = parse_command_line  # type: ignore[method-assign,assignment]


def pack_module_files() -> int:
    """Give each loaded module an equal copy of its ``__file__``, the copies made together so
    they share a few pages; → how many."""
    packed = 0
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        namespace = vars(module)
        name = namespace.get("__file__")
        if type(name) is str and name:
            namespace["__file__"] = (name + ".")[:-1]  # equal, but a new object
            packed += 1
    return packed


def learned_patterns(before: set[Any]) -> list[list[Any]]:
    """In the throwaway kernel: the patterns ``re`` compiled and cached since ``before`` (its
    cache's keys at the fork), as JSON-able ``[kind, pattern, flags]``."""
    found = []
    for key in list(getattr(re, "_cache", {})):
        if key in before or len(key) != 3:
            continue
        kind, pattern, flags = key
        if kind is str and isinstance(flags, int):
            found.append(["s", pattern, flags])
        elif kind is bytes and isinstance(flags, int):
            found.append(["b", pattern.decode("latin-1"), flags])
    return found


def compile_patterns(patterns: list[list[Any]]) -> int:
    """In the template: compile (and so cache) what the throwaway kernel did; → how many."""
    done = 0
    for kind, pattern, flags in patterns:
        with contextlib.suppress(Exception):
            re.compile(pattern if kind == "s" else pattern.encode("latin-1"), flags)
            done += 1
    return done
