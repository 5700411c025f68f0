"""The zygote template's pre-parsed command lines (kernelspecs/_prebuilt.py): a kernel started
with a shipped kernelspec's command line gets exactly the config traitlets would have parsed;
any other command line is parsed as always."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from ipykernel.kernelapp import IPKernelApp

from kernelspecs import _prebuilt
from kernelspecs._zygote import KERNEL_MODULES

KB_PYTHON = ["-f", "/tmp/kernel-1.json", "--IPCompleter.use_jedi=False",
             "--HistoryManager.hist_file=:memory:",
             "--IPKernelApp.outstream_class=kernelspecs.python_stream.ChunkedOutStream"]


LOADERS: list[list[str]] = []  # the command lines traitlets built an argparse loader for


@pytest.fixture(autouse=True)
def loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    create = IPKernelApp._create_loader
    LOADERS.clear()

    def counted(self: IPKernelApp, argv: list[str], *args: Any, **kwargs: Any) -> Any:
        LOADERS.append(list(argv))
        return create(self, argv, *args, **kwargs)

    monkeypatch.setattr(IPKernelApp, "_create_loader", counted)


@pytest.fixture(autouse=True)
def parsed(loaders: None) -> Iterator[None]:
    _prebuilt._PARSED.clear()
    assert _prebuilt.parse_shipped(KERNEL_MODULES) >= 2  # kb-python's, the process kernels'
    LOADERS.clear()
    yield
    _prebuilt._PARSED.clear()
    if "parse_command_line" in vars(IPKernelApp):
        del IPKernelApp.parse_command_line


def parse(argv: list[str] | None, *, prebuilt: bool) -> IPKernelApp:
    if prebuilt:
        _prebuilt.use_parsed()
    app = IPKernelApp()
    app.parse_command_line(argv)  # type: ignore[no-untyped-call]
    return app


def same(a: IPKernelApp, b: IPKernelApp) -> None:
    assert repr(a.cli_config) == repr(b.cli_config)
    assert repr(a.config) == repr(b.config)
    assert a.argv == b.argv and a.extra_args == b.extra_args
    assert a.connection_file == b.connection_file


def test_shipped_command_lines_are_the_ones_parsed() -> None:
    commands = dict((tuple(a), m) for m, a in _prebuilt.shipped_commands(KERNEL_MODULES))
    assert commands[(KB_PYTHON[0], "{connection_file}", *KB_PYTHON[2:])] == "ipykernel_launcher"
    assert ("-f", "{connection_file}") in commands  # kb-bash
    # kb-c's "--language c" is the compiled kernel's own: never parsed as an app's.
    assert not any(k for k in _prebuilt._PARSED if "--language" in k)


def test_kb_python_gets_what_traitlets_would_parse() -> None:
    fast = parse(KB_PYTHON, prebuilt=True)
    assert not LOADERS  # no argparse
    assert "parse_command_line" not in vars(IPKernelApp)  # used once, then gone
    same(fast, parse(KB_PYTHON, prebuilt=False))
    assert fast.connection_file == "/tmp/kernel-1.json"
    assert fast.config.HistoryManager.hist_file == ":memory:"


def test_argv_from_sys_argv_like_ipykernel_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["ipykernel_launcher", *KB_PYTHON])
    fast = parse(None, prebuilt=True)
    assert not LOADERS
    same(fast, parse(None, prebuilt=False))


def test_each_kernel_has_its_own_copy() -> None:
    first = parse(KB_PYTHON, prebuilt=True)
    first.cli_config.IPCompleter.use_jedi = "True"
    other = [KB_PYTHON[0], "/tmp/kernel-2.json", *KB_PYTHON[2:]]
    second = parse(other, prebuilt=True)
    assert second.connection_file == "/tmp/kernel-2.json"
    assert repr(second.cli_config.IPCompleter.use_jedi) == repr(
        parse(other, prebuilt=False).cli_config.IPCompleter.use_jedi)


@pytest.mark.parametrize("argv", [
    ["-f", "/tmp/k.json", "--IPCompleter.use_jedi=True"],  # an operator's kernelspec
    ["--IPKernelApp.connection_file=/tmp/k.json"],
    ["-f", "/tmp/k.json", "--debug"],
])
def test_other_command_lines_are_parsed_as_always(argv: list[str]) -> None:
    same(parse(argv, prebuilt=True), parse(argv, prebuilt=False))
    assert [argv, argv] == LOADERS
    assert "parse_command_line" not in vars(IPKernelApp)


def test_patterns_learned_and_compiled() -> None:
    before = set(re._cache)  # type: ignore[attr-defined]
    re.compile(r"kb-prebuilt-(\d+)")
    re.compile(b"kb-prebuilt-\xff", re.I)
    learned = _prebuilt.learned_patterns(before)
    assert ["s", r"kb-prebuilt-(\d+)", 0] in learned
    assert ["b", "kb-prebuilt-\xff", int(re.I)] in learned
    re.purge()
    assert _prebuilt.compile_patterns(learned) == len(learned)
    assert (str, r"kb-prebuilt-(\d+)", 0) in re._cache  # type: ignore[attr-defined]


def test_module_files_are_equal_copies() -> None:
    before = {name: m.__file__ for name, m in list(sys.modules.items())
              if isinstance(m, types.ModuleType) and isinstance(getattr(m, "__file__", None), str)}
    assert _prebuilt.pack_module_files() >= len(before)
    for name, file in before.items():
        module = sys.modules[name]
        assert module.__file__ == file and module.__file__ is not file
