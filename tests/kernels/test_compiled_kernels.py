"""The compiled-language kernels (kb-c, kb-cpp, kb-go, kb-rust, kb-java) end to end."""

from __future__ import annotations

import shutil
import unittest
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jupyter_kernel_test
import pytest

from kernelspecs.compiled_kernel import java_main_class

if TYPE_CHECKING:
    from conftest import KernelDriver, KernelPool


@dataclass(frozen=True)
class Lang:
    spec: str
    tools: tuple[str, ...]
    hello: str
    compile_error: str
    compile_message: str  # a fragment of the compiler's diagnostic
    exit_4: str  # prints "out" to stdout and "err" to stderr, exits 4
    ask: str  # prints "n? ", reads an int, prints "got <n>"


LANGS: dict[str, Lang] = {
    "c": Lang(
        spec="kb-c",
        tools=("gcc",),
        hello='#include <stdio.h>\nint main(void) { printf("hello, world\\n"); return 0; }\n',
        compile_error="int main(void) { return undeclared; }\n",
        compile_message="prog.c:1:",
        exit_4='#include <stdio.h>\nint main(void) { puts("out"); fputs("err\\n", stderr);'
        " return 4; }\n",
        # No fflush before scanf: the kernel must make the prompt visible anyway.
        ask='#include <stdio.h>\nint main(void) { int n; printf("n? "); scanf("%d", &n);'
        ' printf("got %d\\n", n); return 0; }\n',
    ),
    "cpp": Lang(
        spec="kb-cpp",
        tools=("g++",),
        hello='#include <iostream>\nint main() { std::cout << "hello, world" << std::endl; }\n',
        compile_error="int main() { return undeclared; }\n",
        compile_message="prog.cpp:1:",
        exit_4='#include <iostream>\nint main() { std::cout << "out\\n"; std::cerr << "err\\n";'
        " return 4; }\n",
        ask='#include <iostream>\nint main() { int n; std::cout << "n? "; std::cin >> n;'
        ' std::cout << "got " << n << "\\n"; }\n',
    ),
    "go": Lang(
        spec="kb-go",
        tools=("go",),
        hello='package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello, world") }\n',
        compile_error="package main\n\nfunc main() { x := 1 }\n",
        compile_message="main.go:3:15: x declared",
        exit_4='package main\n\nimport (\n\t"fmt"\n\t"os"\n)\n\nfunc main() {\n'
        '\tfmt.Println("out")\n\tfmt.Fprintln(os.Stderr, "err")\n\tos.Exit(4)\n}\n',
        ask='package main\n\nimport "fmt"\n\nfunc main() {\n\tvar n int\n\tfmt.Print("n? ")\n'
        '\tfmt.Scan(&n)\n\tfmt.Println("got", n)\n}\n',
    ),
    "rust": Lang(
        spec="kb-rust",
        tools=("rustc",),
        hello='fn main() { println!("hello, world"); }\n',
        compile_error='fn main() { let x: i32 = "text"; }\n',
        compile_message="mismatched types",
        exit_4='fn main() { println!("out"); eprintln!("err"); std::process::exit(4); }\n',
        ask='use std::io::Write;\nfn main() {\n    print!("n? ");\n'
        "    std::io::stdout().flush().unwrap();\n    let mut s = String::new();\n"
        "    std::io::stdin().read_line(&mut s).unwrap();\n"
        '    println!("got {}", s.trim());\n}\n',
    ),
    "java": Lang(
        spec="kb-java",
        tools=("javac", "java"),
        hello="public class Hello {\n    public static void main(String[] args) {\n"
        '        System.out.println("hello, world");\n    }\n}\n',
        compile_error="public class Broken { void f( }\n",
        compile_message="Broken.java:1: error",
        exit_4="public class Main {\n    public static void main(String[] args) {\n"
        '        System.out.println("out");\n        System.err.println("err");\n'
        "        System.exit(4);\n    }\n}\n",
        ask="import java.util.Scanner;\nclass Helper {}\nclass Ask {\n"
        "    public static void main(String[] args) {\n"
        '        System.out.print("n? ");\n        int n = new Scanner(System.in).nextInt();\n'
        '        System.out.println("got " + n);\n    }\n}\n',
    ),
}


def _missing(lang: str) -> str | None:
    missing = [tool for tool in LANGS[lang].tools if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found on PATH" if missing else None


PARAMS = [
    pytest.param(
        lang, marks=pytest.mark.skipif(_missing(lang) is not None, reason=_missing(lang) or "")
    )
    for lang in LANGS
]


@pytest.fixture
def kernel(kernel_pool: KernelPool, lang: str) -> KernelDriver:
    """The module's shared kernel for the test's ``lang`` parameter."""
    return kernel_pool[LANGS[lang].spec]


@pytest.mark.parametrize("lang", PARAMS)
def test_hello_world(kernel: KernelDriver, lang: str) -> None:
    cell = kernel.run(LANGS[lang].hello)
    assert cell.text("stdout") == "hello, world\n"
    assert cell.reply["status"] == "ok"
    assert (cell.exit_code, cell.reply["stage"]) == (0, "run")
    assert cell.errors == []


@pytest.mark.parametrize("lang", PARAMS)
def test_compile_error_goes_to_stderr(kernel: KernelDriver, lang: str) -> None:
    cell = kernel.run(LANGS[lang].compile_error)
    assert cell.exit_code != 0
    assert cell.reply["stage"] == "compile"
    assert cell.reply["status"] == "error"
    assert cell.reply["evalue"] == str(cell.exit_code)
    assert LANGS[lang].compile_message in cell.text("stderr")
    assert cell.text("stdout") == ""


@pytest.mark.parametrize("lang", PARAMS)
def test_compile_output_apart_and_builds_cached(kernel: KernelDriver, lang: str) -> None:
    bad = kernel.run(LANGS[lang].compile_error)
    assert LANGS[lang].compile_message in bad.reply["compile_stderr"]
    assert bad.reply["cached"] is False
    # The same source again: the build is reused (unless it failed: that one is retried).
    code = LANGS[lang].hello + "\n" * 3  # a source no other test built in this kernel
    first, second = kernel.run(code), kernel.run(code)
    assert (first.reply["cached"], second.reply["cached"]) == (False, True)
    assert second.text("stdout") == "hello, world\n" and second.reply["stage"] == "run"
    assert second.reply["compile_stderr"] == "" and second.text("stderr") == ""
    again = kernel.run(LANGS[lang].compile_error)
    assert again.reply["cached"] is False and again.exit_code != 0


@pytest.mark.parametrize("lang", ["c"])  # the field comes from the runner all share
def test_signal_in_reply(kernel: KernelDriver, lang: str) -> None:
    cell = kernel.run("#include <signal.h>\nint main(void) { raise(SIGSEGV); return 0; }\n")
    assert (cell.exit_code, cell.reply["signal"]) == (139, 11)
    assert "signal" not in kernel.run(LANGS[lang].hello).reply


@pytest.mark.parametrize("lang", PARAMS)
def test_runtime_exit_code_and_streams(kernel: KernelDriver, lang: str) -> None:
    cell = kernel.run(LANGS[lang].exit_4)
    assert (cell.exit_code, cell.reply["stage"]) == (4, "run")
    assert cell.text("stdout") == "out\n"
    assert cell.text("stderr") == "err\n"
    assert cell.errors == [{"ename": "ExitCode", "evalue": "4", "traceback": []}]


@pytest.mark.parametrize("lang", PARAMS)
def test_stdin_read_is_answered_through_input_request(kernel: KernelDriver, lang: str) -> None:
    cell = kernel.run(LANGS[lang].ask, answers=["42"])
    assert len(cell.input_requests) == 1
    assert cell.text("stdout") == "n? got 42\n"
    assert cell.streams[0] == ("stdout", "n? ")  # the prompt came before the request
    assert cell.exit_code == 0


@pytest.mark.skipif(_missing("c") is not None, reason=_missing("c") or "")
def test_interrupt_kills_the_program(kernel_pool: KernelPool) -> None:
    code = "#include <unistd.h>\nint main(void) { if (fork() == 0) sleep(60); sleep(60); }\n"
    cell = kernel_pool["kb-c"].run(code, interrupt_after=1.0)
    assert cell.reply["interrupted"] is True
    assert cell.exit_code == 130
    assert cell.seconds < 5
    assert kernel_pool["kb-c"].run(LANGS["c"].hello).exit_code == 0


def test_java_main_class_is_found() -> None:
    assert java_main_class(LANGS["java"].hello) == "Hello"
    assert java_main_class(LANGS["java"].ask) == "Ask"
    assert java_main_class("class A { }\n") == "A"
    assert java_main_class("// nothing\n") == "Main"


class _Conformance(jupyter_kernel_test.KernelTests):
    __test__ = False  # a template; the subclasses below are the tests
    lang = ""
    code_generate_error = ""

    @classmethod
    def setUpClass(cls) -> None:
        missing = _missing(cls.lang)
        if missing:
            raise unittest.SkipTest(missing)
        sample = LANGS[cls.lang]
        cls.kernel_name = sample.spec
        cls.code_hello_world = sample.hello
        super().setUpClass()


class CConformance(_Conformance):
    __test__ = True
    lang, language_name, file_extension = "c", "c", ".c"
    code_stderr = '#include <stdio.h>\nint main(void) { fputs("oops\\n", stderr); }\n'
    code_generate_error = "int main(void) { return 1; }\n"


class CppConformance(_Conformance):
    __test__ = True
    lang, language_name, file_extension = "cpp", "c++", ".cpp"
    code_stderr = '#include <iostream>\nint main() { std::cerr << "oops\\n"; }\n'
    code_generate_error = "int main() { return 1; }\n"


class GoConformance(_Conformance):
    __test__ = True
    lang, language_name, file_extension = "go", "go", ".go"
    code_stderr = (
        'package main\n\nimport "os"\n\nfunc main() { os.Stderr.WriteString("oops\\n") }\n'
    )
    code_generate_error = 'package main\n\nimport "os"\n\nfunc main() { os.Exit(1) }\n'


class RustConformance(_Conformance):
    __test__ = True
    lang, language_name, file_extension = "rust", "rust", ".rs"
    code_stderr = 'fn main() { eprintln!("oops"); }\n'
    code_generate_error = "fn main() { std::process::exit(1); }\n"


class JavaConformance(_Conformance):
    __test__ = True
    lang, language_name, file_extension = "java", "java", ".java"
    code_stderr = (
        'class Main { public static void main(String[] a) { System.err.println("oops"); } }'
    )
    code_generate_error = "class Main { public static void main(String[] a) { System.exit(1); } }"
